"""sensor_msgs Image / CompressedImage <-> numpy: cv_bridge where installed, else a numpy substitute.

``image_to_rgb``, ``depth_to_metres`` and ``compressed_to_rgb`` hand a real rclpy
``sensor_msgs.msg`` message to ``cv_bridge.CvBridge`` when it imports (``HAVE_CV_BRIDGE``, probed
once on first use, since importing it loads OpenCV). Everything else (rosbags messages, ``PlainImage``,
machines without cv_bridge, or ``prefer_cv_bridge=False``) goes through the substitute below. Both
paths validate the message first and give the same outputs and the same ``ValueError`` wording.

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
import logging
import struct
import sys
from dataclasses import dataclass
from functools import lru_cache
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

_log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------- cv_bridge (optional)
@dataclass(frozen=True)
class _Bridge:
    """A CvBridge instance and the exceptions its conversions raise (CvBridgeError, cv2.error)."""

    bridge: Any
    errors: tuple[type[BaseException], ...]


#: Why cv_bridge is unavailable ("ModuleNotFoundError: ..."), set by the probe; None = not probed / imports.
_cv_bridge_reason: str | None = None


@lru_cache(maxsize=1)
def _cv_bridge() -> _Bridge | None:
    """The real cv_bridge when it imports and works with this numpy, else None. Probed once."""
    global _cv_bridge_reason
    try:
        from cv_bridge import CvBridge, CvBridgeError
    except (ImportError, AttributeError, RuntimeError, ValueError) as exc:
        _cv_bridge_reason = f"{type(exc).__name__}: {exc}"
        # ImportError: not installed. The other three are how a cv_bridge / cv2 binary built against
        # a different numpy ABI fails while importing (a numpy 1.x build under numpy 2 prints
        # "AttributeError: _ARRAY_API not found", or raises "RuntimeError: module compiled against
        # API version ..." or "ValueError: numpy.dtype size changed"). The library is unusable
        # then, so the substitute takes over; any other error is a real bug and propagates.
        # Not installed is normal (debug); installed but broken is worth a warning, once (cached).
        level = logging.DEBUG if isinstance(exc, ModuleNotFoundError) else logging.WARNING
        _log.log(level, "cv_bridge unavailable (%s: %s); using the numpy substitute", type(exc).__name__, exc)
        return None
    errors: list[type[BaseException]] = [CvBridgeError]
    cv2 = sys.modules.get("cv2")  # cv_bridge imports cv2 itself; its error class is cv2.error
    cv2_error = getattr(cv2, "error", None)
    if isinstance(cv2_error, type) and issubclass(cv2_error, BaseException):
        errors.append(cv2_error)
    return _Bridge(CvBridge(), tuple(errors))


def have_cv_bridge() -> bool:
    """True when ``cv_bridge.CvBridge`` imports (the first call probes; the answer is cached)."""
    return _cv_bridge() is not None


def cv_bridge_unavailable_reason() -> str | None:
    """None when cv_bridge imports, else why not (probes on the first call). On a machine with ROS 2
    installed the nodes refuse to start without it (``lerf_ros.compat.ros_install``)."""
    return None if _cv_bridge() is not None else (_cv_bridge_reason or "not importable")


def __getattr__(name: str):
    # HAVE_CV_BRIDGE is computed on first access (PEP 562) so importing this module never loads OpenCV.
    if name == "HAVE_CV_BRIDGE":
        return have_cv_bridge()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bridge_for(msg, type_name: str, prefer_cv_bridge: bool) -> _Bridge | None:
    """The bridge when allowed, installed and ``msg`` is an rclpy ``sensor_msgs.msg.<type_name>``."""
    # Cheap module-name filter first: rosbags / plain messages never import sensor_msgs or probe cv2.
    if not prefer_cv_bridge or not type(msg).__module__.startswith("sensor_msgs."):
        return None
    msg_type = _ros_type(type_name, None)
    if msg_type is None or not isinstance(msg, msg_type):
        return None
    return _cv_bridge()


def _bridge_call(bridge: _Bridge, method: str, msg, desired_encoding: str, what: str):
    try:
        return getattr(bridge.bridge, method)(msg, desired_encoding=desired_encoding)
    except bridge.errors as exc:
        raise ValueError(f"cv_bridge cannot convert {what} to {desired_encoding}: {exc}") from exc


def _bridge_result(out, shape: tuple[int, ...], dtype, what: str) -> np.ndarray:
    """cv_bridge's array, checked against the shape/dtype the message promised (a view, not copied)."""
    arr = None if out is None else np.asarray(out)
    if arr is None or arr.shape != shape or arr.dtype != np.dtype(dtype):
        got = "None" if arr is None else f"{arr.dtype} {arr.shape}"
        raise ValueError(f"cv_bridge returned {got} for {what}; expected {np.dtype(dtype)} {shape}")
    return arr


def _decoded_bgr_to_rgb(decoded: np.ndarray, fmt) -> np.ndarray:
    """cv2.imdecode output ((H, W) grey, (H, W, 3) BGR or (H, W, 4) BGRA uint8) -> fresh (H, W, 3) RGB."""
    arr = np.asarray(decoded)
    if arr.dtype == np.uint8 and arr.ndim == 2 and 0 not in arr.shape:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype == np.uint8 and arr.ndim == 3 and 0 not in arr.shape[:2] and arr.shape[2] in (1, 3, 4):
        if arr.shape[2] == 1:
            return np.repeat(arr, 3, axis=2)
        return np.array(arr[..., 2::-1], order="C", copy=True)  # B,G,R[,A] -> R,G,B
    raise ValueError(
        f"compressed image ({fmt!r}) decodes to {arr.dtype} {arr.shape}, not an 8-bit colour image"
    )


def image_to_numpy(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W) or (H, W, C) array in native byte order (a fresh copy).

    dtype follows the encoding: uint8 (rgb8, bgr8, rgba8, bgra8, mono8), uint16 (mono16, 16UC1),
    float32 (32FC1). Channels keep the message's order (bgr8 stays BGR; see ``image_to_rgb``).
    """
    view = _strided_view(msg)
    out = view.astype(view.dtype.newbyteorder("="), copy=True)
    return out[..., 0] if out.shape[2] == 1 else out


def image_to_rgb(msg, *, prefer_cv_bridge: bool = True) -> np.ndarray:
    """Colour or mono8 sensor_msgs/Image -> (H, W, 3) uint8 RGB, a fresh writeable copy.

    Alpha is dropped, mono8 repeated into three channels. An rclpy message goes through
    ``CvBridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")`` when cv_bridge is installed and
    ``prefer_cv_bridge``; the result is identical to the substitute's.
    """
    if msg.encoding != "mono8" and msg.encoding not in _TO_RGB:
        _lookup_encoding(msg.encoding)  # unknown encodings get the generic message
        raise ValueError(
            f"image encoding {msg.encoding!r} is not a colour encoding; "
            f"image_to_rgb accepts {', '.join([*_TO_RGB, 'mono8'])}"
        )
    # Validated before cv_bridge sees it: cv_bridge sizes its buffer view from `step` and would
    # crash, or read the wrong pixels, on a short buffer or a step smaller than a row.
    view = _strided_view(msg)
    height, width = view.shape[:2]
    bridge = _bridge_for(msg, "Image", prefer_cv_bridge)
    if bridge is not None:
        what = f"{msg.encoding!r} image {width}x{height}"
        out = _bridge_call(bridge, "imgmsg_to_cv2", msg, "rgb8", what)
        # cv_bridge may return a view over msg.data (rgb8 passthrough): always copy.
        return np.array(_bridge_result(out, (height, width, 3), np.uint8, what), order="C", copy=True)
    if msg.encoding == "mono8":
        return np.repeat(view, 3, axis=2)
    # Basic slicing keeps a view, so the reorder and the copy happen in one pass; always a copy,
    # never an alias of the message buffer.
    return np.array(view[..., _TO_RGB[msg.encoding]], order="C", copy=True)


def depth_to_metres(msg, *, prefer_cv_bridge: bool = True) -> np.ndarray:
    """Depth sensor_msgs/Image -> (H, W) float32 metres along the optical axis; invalid = NaN.

    16UC1 / mono16 hold millimetres (REP-118), 0 = invalid; 32FC1 holds metres, and 0, negative
    or non-finite values are invalid. An rclpy message in native byte order is read with
    ``CvBridge.imgmsg_to_cv2(msg, desired_encoding="passthrough")`` when cv_bridge is installed
    and ``prefer_cv_bridge``; the unit rules are applied here on both paths.
    """
    if msg.encoding not in (*_MILLIMETRE_ENCODINGS, "32FC1"):
        _lookup_encoding(msg.encoding)
        raise ValueError(
            f"image encoding {msg.encoding!r} is not a depth encoding; "
            "depth_to_metres accepts 16UC1, mono16, 32FC1"
        )
    view = _strided_view(msg)[..., 0]  # validation first, as in image_to_rgb
    bridge = _bridge_for(msg, "Image", prefer_cv_bridge)
    # Byte-swapped messages (is_bigendian on a little-endian host; no common driver sends them)
    # stay on the substitute: older cv_bridge releases swap with ndarray.newbyteorder(), which
    # numpy 2 removed, so the result would depend on the installed versions.
    if bridge is not None and view.dtype.isnative:
        what = f"{msg.encoding!r} depth image {view.shape[1]}x{view.shape[0]}"
        out = _bridge_call(bridge, "imgmsg_to_cv2", msg, "passthrough", what)
        depth = np.array(_bridge_result(out, view.shape, view.dtype, what), copy=True)
    else:
        depth = view.astype(view.dtype.newbyteorder("="), copy=True)
    if msg.encoding in _MILLIMETRE_ENCODINGS:
        return _millimetres_to_metres(depth)
    depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
    return depth


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


def _require_data(raw: bytes, what: str) -> None:
    # Also checked before cv_bridge: cv2.imdecode asserts on an empty buffer.
    if len(raw) == 0:
        raise ValueError(f"compressed {what} has zero size (no data)")


def _open_compressed(raw: bytes, what: str):
    """Decode a JPEG / PNG byte string with Pillow; ValueError when it cannot."""
    from PIL import Image, UnidentifiedImageError

    _require_data(raw, what)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"undecodable compressed {what} data ({len(raw)} bytes): {exc}") from exc
    if img.width == 0 or img.height == 0:
        raise ValueError(f"compressed {what} decodes to zero size {img.size}")
    return img


def compressed_to_rgb(msg, *, prefer_cv_bridge: bool = True) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (H, W, 3) uint8 RGB, a fresh writeable copy.

    ``msg.format`` is image_transport's ("rgb8; jpeg compressed bgr8", "png", ...). The compressed
    stream itself is a standard colour (or greyscale) JPEG/PNG whatever the "compressed bgr8" tag
    says, so decoding yields RGB directly; greyscale expands to 3 channels. An rclpy message goes
    through ``CvBridge.compressed_imgmsg_to_cv2`` when cv_bridge is installed and
    ``prefer_cv_bridge`` (OpenCV decodes to BGR, reordered here).
    """
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise ValueError(f"format {msg.format!r} is compressed depth; use compressed_depth_to_metres")
    raw = bytes(_data_as_uint8(msg.data))
    _require_data(raw, "image")
    bridge = _bridge_for(msg, "CompressedImage", prefer_cv_bridge)
    if bridge is not None:
        # "passthrough", not "rgb8": cv_bridge would convert from an assumed bgr8 with cvtColor,
        # which fails on a greyscale JPEG (one channel); the channel order is fixed here instead.
        what = f"compressed image ({msg.format!r}, {len(raw)} bytes)"
        decoded = _bridge_call(bridge, "compressed_imgmsg_to_cv2", msg, "passthrough", what)
        if decoded is None:  # cv2.imdecode returns None, not an error, for data it cannot decode
            raise ValueError(f"undecodable compressed image data ({len(raw)} bytes): cv2.imdecode failed")
        return _decoded_bgr_to_rgb(decoded, msg.format)
    img = _open_compressed(raw, "image")
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
