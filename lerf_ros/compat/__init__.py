"""Substitutes and adapters for ROS pieces a machine may lack (tf2_ros, cv_bridge).

The ROS-free names (``TfBuffer`` and its errors, the image conversions) import eagerly. The ROS
adapter names from ``lerf_ros.compat.tf`` (``make_tf_buffer``, ``lookup_matrix``, the exported
tf2 exception classes, ...) load on first access, so ``import lerf_ros.compat`` never probes for
tf2_ros or rclpy until a caller asks for them.
"""

from importlib import import_module

from lerf_ros.compat.image import (
    ENCODINGS,
    PlainCompressedImage,
    PlainImage,
    bytes_per_pixel,
    compressed_depth_to_metres,
    compressed_to_rgb,
    depth_to_metres,
    image_to_numpy,
    image_to_rgb,
    numpy_to_image,
    rgb_to_compressed,
)
from lerf_ros.compat.tf_buffer import DEFAULT_CACHE_TIME_S, TfBuffer

# Names served lazily from lerf_ros.compat.tf. The exception classes are tf2_ros's own when it is
# installed, else the substitute's (lerf_ros.compat.tf_buffer).
_TF_NAMES = (
    "HAVE_TF2_ROS",
    "TF_ERRORS",
    "ConnectivityException",
    "ExtrapolationException",
    "InvalidArgumentException",
    "LookupException",
    "TfBufferSubstitute",
    "TfListenerSubstitute",
    "TransformException",
    "close_tf_listener",
    "lookup_matrix",
    "make_tf_buffer",
    "matrix_to_transform_msg",
    "ns_to_time_msg",
    "stamp_to_ns",
    "transform_to_matrix",
)


def __getattr__(name: str):
    if name in _TF_NAMES:
        return getattr(import_module("lerf_ros.compat.tf"), name)
    raise AttributeError(f"module 'lerf_ros.compat' has no attribute {name!r}")


__all__ = [
    "DEFAULT_CACHE_TIME_S",
    "ENCODINGS",
    "PlainCompressedImage",
    "PlainImage",
    "TfBuffer",
    "bytes_per_pixel",
    "compressed_depth_to_metres",
    "compressed_to_rgb",
    "depth_to_metres",
    "image_to_numpy",
    "image_to_rgb",
    "numpy_to_image",
    "rgb_to_compressed",
    *_TF_NAMES,
]
