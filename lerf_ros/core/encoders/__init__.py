"""Encoder plugins: protocols and ``"module:factory"`` loading (``base``), OpenCLIP (``openclip``),
DINO via timm (``dino``) and the deterministic DEMO colour encoders (``demo``).

The heavy back-ends are imported only when their factory is loaded, so importing this package
does not import open_clip or timm.
"""

from .base import (
    DenseEncoder,
    EncoderSpec,
    MissingWeightsError,
    VisionLanguageEncoder,
    checked_encode_dense,
    checked_encode_images,
    checked_encode_texts,
    load_encoder,
)

DEFAULT_CLIP = "lerf_ros.core.encoders.openclip:openclip_encoder"
DEFAULT_DINO = "lerf_ros.core.encoders.dino:dino_encoder"
DEMO_CLIP = "lerf_ros.core.encoders.demo:colour_name_encoder"
DEMO_DENSE = "lerf_ros.core.encoders.demo:colour_dense_encoder"
#: Encoders from this module match colour names, not language (tests and the CPU demo only).
DEMO_ENCODER_MODULE = "lerf_ros.core.encoders.demo"


def is_demo_encoder(encoder) -> bool:
    """True for the deterministic DEMO encoders (``demo``): colour names, not language."""
    return type(encoder).__module__ == DEMO_ENCODER_MODULE

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "DEMO_CLIP",
    "DEMO_DENSE",
    "DEMO_ENCODER_MODULE",
    "DenseEncoder",
    "EncoderSpec",
    "MissingWeightsError",
    "VisionLanguageEncoder",
    "checked_encode_dense",
    "checked_encode_images",
    "checked_encode_texts",
    "is_demo_encoder",
    "load_encoder",
]
