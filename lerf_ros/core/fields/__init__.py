"""Neural fields: hash encoding (tcnn / torch), MLPs, scene box, radiance and language fields."""

from .hash_encoding import HashEncoding, HashEncodingConfig
from .language_field import LanguageField, LanguageFieldConfig
from .mlp import MLP, MLPConfig
from .radiance_field import (
    DensityField,
    DensityFieldConfig,
    RadianceField,
    RadianceFieldConfig,
)
from .scene_box import SceneBox

__all__ = [
    "MLP",
    "DensityField",
    "DensityFieldConfig",
    "HashEncoding",
    "HashEncodingConfig",
    "LanguageField",
    "LanguageFieldConfig",
    "MLPConfig",
    "RadianceField",
    "RadianceFieldConfig",
    "SceneBox",
]
