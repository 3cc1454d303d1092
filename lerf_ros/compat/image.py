"""sensor_msgs Image / CompressedImage <-> numpy, without cv_bridge.

Messages are read through attribute access only (``height``, ``width``, ``encoding``,
``is_bigendian``, ``step``, ``data``; ``format`` and ``data`` for CompressedImage), so rclpy
messages, rosbags-deserialised messages and ``PlainImage`` all work. Decoding is vectorised: one
strided numpy view over the message buffer (rows ``step`` bytes apart, padding skipped, byte order
from ``is_bigendian``), then one copy into a native-endian array the caller owns.

Every bad input raises ``ValueError`` naming the problem: an unknown encoding, a zero size, ``step``
smaller than a row, ``len(data) != height * step``, undecodable compressed data.
"""

from __future__ import annotations

import array as pyarray
import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: encoding -> (numpy dtype kind without byte order, channels). Depth per REP-118.
ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
    "mono8": ("u1", 1),
    "mono16": ("u2", 1),
    "16UC1": ("u2", 1),
    "32FC1": ("f4", 1),
}
#: Channel order that turns each colour encoding into RGB.
_TO_RGB: dict[str, slice] = {
    "rgb8": slice(0, 3), "bgr8": slice(None, None, -1), "rgba8": slice(0, 3), "bgra8": slice(2, None, -1),
}
_MILLIMETRE_ENCODINGS = ("16UC1", "mono16")
#: compressed_depth_image_transport's ConfigHeader: int32 format, float32 depthParam[2].
_DEPTH_HEADER = struct.Struct("<iff")


@dataclass
class PlainImage:
    """The fields of sensor_msgs/Image, for machines (or tests) without sensor_msgs."""

    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: bytes
    header: Any = None


@dataclass
class PlainCompressedImage:
    """The fields of sensor_msgs/CompressedImage."""

    format: str
    data: bytes
    header: Any = None


def bytes_per_pixel(encoding: str) -> int:
    """Bytes per pixel of a supported encoding; ValueError for an unknown one."""
    kind, channels = _lookup_encoding(encoding)
    return np.dtype(kind).itemsize * channels


def _lookup_encoding(encoding) -> tuple[str, int]:
    try:
        return ENCODINGS[encoding]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}"
        ) from None


def _data_as_uint8(data) -> np.ndarray:
    """Message ``data`` (bytes, array.array('B'), numpy uint8, list of ints) -> 1-D uint8 view."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a plain sequence of ints (some message implementations use lists)
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _strided_view(msg) -> np.ndarray:
    """Validated (H, W, C) view over the message buffer in the message's byte order (no copy)."""
    kind, channels = _lookup_encoding(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size: height {height}, width {width}")
    itemsize = np.dtype(kind).itemsize
    row_bytes = width * itemsize * channels
    if step < row_bytes:
        raise ValueError(
            f"image step {step} is smaller than one row: width {width} x {itemsize * channels} bytes "
            f"per pixel ({msg.encoding}) = {row_bytes}"
        )
    buf = _data_as_uint8(msg.data)
    if buf.size != height * step:
        raise ValueError(
            f"image data has {buf.size} bytes but height {height} x step {step} = {height * step}"
        )
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    # Rows `step` bytes apart: the row padding is never read.
    return np.ndarray(
        shape=(height, width, channels), dtype=dtype, buffer=buf,
        strides=(step, itemsize * channels, itemsize),
    )


def image_to_numpy(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W) or (H, W, C) array in native byte order (a fresh copy).

    dtype follows the encoding: uint8 (rgb8, bgr8, rgba8, bgra8, mono8), uint16 (mono16, 16UC1),
    float32 (32FC1). Channels keep the message's order (bgr8 stays BGR; see ``image_to_rgb``).
    """
    view = _strided_view(msg)
    out = view.astype(view.dtype.newbyteorder("="), copy=True)
    return out[..., 0] if out.shape[2] == 1 else out


def image_to_rgb(msg) -> np.ndarray:
    """Colour or mono8 sensor_msgs/Image -> (H, W, 3) uint8 RGB, a fresh writeable copy.

    Alpha is dropped, mono8 repeated into three channels.
    """
    if msg.encoding == "mono8":
        return np.repeat(_strided_view(msg), 3, axis=2)
    if msg.encoding not in _TO_RGB:
        _lookup_encoding(msg.encoding)  # unknown encodings get the generic message
        raise ValueError(
            f"image encoding {msg.encoding!r} is not a colour encoding; "
            f"image_to_rgb accepts {', '.join([*_TO_RGB, 'mono8'])}"
        )
    # Basic slicing keeps a view, so the reorder and the copy happen in one pass; always a copy,
    # never an alias of the message buffer.
    return np.array(_strided_view(msg)[..., _TO_RGB[msg.encoding]], order="C", copy=True)


def depth_to_metres(msg) -> np.ndarray:
    """Depth sensor_msgs/Image -> (H, W) float32 metres along the optical axis; invalid = NaN.

    16UC1 / mono16 hold millimetres (REP-118), 0 = invalid; 32FC1 holds metres, and 0, negative
    or non-finite values are invalid.
    """
    if msg.encoding in _MILLIMETRE_ENCODINGS:
        return _millimetres_to_metres(image_to_numpy(msg))
    if msg.encoding == "32FC1":
        depth = image_to_numpy(msg)
        depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
        return depth
    _lookup_encoding(msg.encoding)
    raise ValueError(
        f"image encoding {msg.encoding!r} is not a depth encoding; "
        "depth_to_metres accepts 16UC1, mono16, 32FC1"
    )


def _millimetres_to_metres(depth_mm: np.ndarray) -> np.ndarray:
    depth_m = depth_mm.astype(np.float32) * np.float32(0.001)
    depth_m[depth_mm == 0] = np.nan
    return depth_m


def numpy_to_image(array: np.ndarray, encoding: str, header=None, ros: bool | None = None):
    """(H, W[, C]) array -> sensor_msgs/Image, little-endian, unpadded (``step = W * bytes/pixel``).

    The array's dtype and channel count must match the encoding (uint8 (H, W, 3) for rgb8/bgr8,
    (H, W, 4) for rgba8/bgra8, (H, W) uint8 for mono8, uint16 for mono16/16UC1, float32 for 32FC1).
    ``ros=None`` returns an rclpy ``sensor_msgs.msg.Image`` when sensor_msgs is importable, else a
    ``PlainImage``; ``True`` requires sensor_msgs, ``False`` always gives ``PlainImage``.
    ``header`` (std_msgs/Header) is copied onto the message when given.
    """
    kind, channels = _lookup_encoding(encoding)
    arr = np.asarray(array)
    expected_shape = "(H, W)" if channels == 1 else f"(H, W, {channels})"
    shape_ok = arr.ndim == 2 if channels == 1 else (arr.ndim == 3 and arr.shape[2] == channels)
    if not shape_ok or arr.dtype.kind + str(arr.dtype.itemsize) != kind:
        raise ValueError(
            f"encoding {encoding} needs a {expected_shape} {np.dtype(kind)} array, "
            f"got {arr.dtype} {arr.shape}"
        )
    height, width = arr.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image has zero size: {arr.shape}")
    data = np.ascontiguousarray(arr, dtype=np.dtype(kind).newbyteorder("<")).tobytes()
    step = width * channels * arr.dtype.itemsize
    fields = {"height": height, "width": width, "encoding": encoding, "is_bigendian": 0, "step": step}
    msg_type = _ros_type("Image", ros)
    if msg_type is None:
        return PlainImage(data=data, header=header, **fields)
    msg = msg_type(**fields)
    msg.data = pyarray.array("B", data)  # array.array is rclpy's fast path for uint8[]
    if header is not None:
        msg.header = header
    return msg


def _ros_type(name: str, ros: bool | None):
    """sensor_msgs.msg.<name> class, or None for the plain dataclass."""
    if ros is False:
        return None
    try:
        from sensor_msgs import msg as sensor_msgs
    except ImportError:
        if ros:
            raise
        return None
    return getattr(sensor_msgs, name)


def _open_compressed(raw: bytes, what: str):
    """Decode a JPEG / PNG byte string with Pillow; ValueError when it cannot."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) == 0:
        raise ValueError(f"compressed {what} has zero size (no data)")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"undecodable compressed {what} data ({len(raw)} bytes): {exc}") from exc
    if img.width == 0 or img.height == 0:
        raise ValueError(f"compressed {what} decodes to zero size {img.size}")
    return img


def compressed_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (H, W, 3) uint8 RGB.

    ``msg.format`` is image_transport's ("rgb8; jpeg compressed bgr8", "png", ...). The compressed
    stream itself is a standard colour (or greyscale) JPEG/PNG whatever the "compressed bgr8" tag
    says, so decoding yields RGB directly; greyscale expands to 3 channels.
    """
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise ValueError(f"format {msg.format!r} is compressed depth; use compressed_depth_to_metres")
    img = _open_compressed(bytes(_data_as_uint8(msg.data)), "image")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(
            f"compressed image ({msg.format!r}) decodes to {img.mode} (16-bit or float), not a colour image"
        )
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def compressed_depth_to_metres(msg) -> np.ndarray:
    """compressed_depth_image_transport message -> (H, W) float32 metres; invalid = NaN.

    ``msg.format`` is "16UC1; compressedDepth[ png]" or "32FC1; compressedDepth[ png]"; ``data`` is
    a 12-byte header (int32 format, float32 quantisation A, B) then a 16-bit PNG. 16UC1 holds
    millimetres; 32FC1 holds quantised inverse depth q with depth = A / (q - B), q = 0 invalid.
    The newer RVL codec is not supported.
    """
    fmt = str(msg.format)
    parts = [p.strip() for p in fmt.split(";")]
    if len(parts) != 2 or not parts[1].lower().startswith("compresseddepth"):
        raise ValueError(f"format {fmt!r} is not compressedDepth ('16UC1; compressedDepth png')")
    if "rvl" in parts[1].lower():
        raise ValueError(f"compressedDepth RVL encoding is not supported (format {fmt!r})")
    encoding = parts[0]
    if encoding not in ("16UC1", "32FC1"):
        raise ValueError(f"compressedDepth encoding {encoding!r} unsupported; expected 16UC1 or 32FC1")
    raw = bytes(_data_as_uint8(msg.data))
    if len(raw) <= _DEPTH_HEADER.size:
        raise ValueError(
            f"compressedDepth data has {len(raw)} bytes; needs a {_DEPTH_HEADER.size}-byte header and a PNG"
        )
    _, quant_a, quant_b = _DEPTH_HEADER.unpack_from(raw)
    img = _open_compressed(raw[_DEPTH_HEADER.size:], "depth")
    if img.mode not in ("I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"compressedDepth PNG has mode {img.mode}; expected 16-bit greyscale")
    values = np.asarray(img).astype(np.uint16)
    if encoding == "16UC1":
        return _millimetres_to_metres(values)
    q = values.astype(np.float32)
    with np.errstate(divide="ignore"):
        depth = np.float32(quant_a) / (q - np.float32(quant_b))
    depth[values == 0] = np.nan
    return depth.astype(np.float32)


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90, header=None,
                      ros: bool | None = None):
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage ("rgb8; jpeg compressed bgr8" or png).

    The format string follows image_transport; ``ros`` as in ``numpy_to_image``.
    """
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ValueError(f"rgb must be a non-empty (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"compressed format must be 'jpeg' or 'png', got {fmt!r}")
    out = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(arr).save(out, format="JPEG", quality=int(quality))
    else:
        Image.fromarray(arr).save(out, format="PNG")
    format_str = f"rgb8; {fmt} compressed bgr8"
    msg_type = _ros_type("CompressedImage", ros)
    if msg_type is None:
        return PlainCompressedImage(format=format_str, data=out.getvalue(), header=header)
    msg = msg_type(format=format_str)
    msg.data = pyarray.array("B", out.getvalue())
    if header is not None:
        msg.header = header
    return msg
