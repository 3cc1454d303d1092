"""The cv_bridge branch of lerf_ros.compat.image, driven by a numpy stand-in ``cv_bridge`` module.

The stand-in decodes the buffer its own way (reshape by ``step``, then crop), independent of the
substitute's strided view, so agreement between the two paths is a real check. A call counter
proves which branch ran.
"""

import io
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image

import lerf_ros.compat.image as image_mod
from lerf_ros.compat.image import (
    PlainImage,
    compressed_to_rgb,
    depth_to_metres,
    image_to_rgb,
    numpy_to_image,
    rgb_to_compressed,
)

_LAYOUT = {"rgb8": ("u1", 3), "bgr8": ("u1", 3), "mono8": ("u1", 1), "16UC1": ("<u2", 1), "32FC1": ("<f4", 1)}


class StandInBridgeError(TypeError):
    pass


class StandInBridge:
    """imgmsg_to_cv2 for rgb8 / bgr8 / mono8 / 16UC1 / 32FC1 (little-endian), compressed via Pillow."""

    calls: ClassVar[list] = []
    fail_with: BaseException | None = None
    override = None  # when set, returned instead of the decoded image

    def imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):
        self.calls.append(("imgmsg_to_cv2", msg.encoding, desired_encoding))
        if self.fail_with is not None:
            raise self.fail_with
        if self.override is not None:
            return self.override
        if msg.encoding not in _LAYOUT:
            raise StandInBridgeError(f"stand-in has no encoding {msg.encoding}")
        dtype, ch = _LAYOUT[msg.encoding]
        item = np.dtype(dtype).itemsize
        rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
        im = rows[:, : msg.width * ch * item].copy().view(dtype).reshape(msg.height, msg.width, ch)
        if desired_encoding == "passthrough":
            return im[..., 0] if ch == 1 else im
        assert desired_encoding == "rgb8"
        return {"rgb8": im, "bgr8": im[..., ::-1], "mono8": np.concatenate([im] * 3, axis=2)}[msg.encoding]

    def compressed_imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):
        self.calls.append(("compressed_imgmsg_to_cv2", msg.format, desired_encoding))
        if self.fail_with is not None:
            raise self.fail_with
        try:
            img = PILImage.open(io.BytesIO(bytes(msg.data)))
            img.load()
        except OSError:
            return None  # what cv2.imdecode does with bad data
        arr = np.asarray(img)
        return arr if arr.ndim == 2 else arr[..., ::-1].copy()  # OpenCV gives BGR


@pytest.fixture
def bridge(monkeypatch):
    """Install the stand-in cv_bridge (and a stand-in cv2 with an ``error`` class) for one test."""
    fake = types.ModuleType("cv_bridge")
    fake.CvBridge, fake.CvBridgeError = StandInBridge, StandInBridgeError
    fake_cv2 = types.ModuleType("cv2")
    fake_cv2.error = type("error", (Exception,), {})
    monkeypatch.setitem(sys.modules, "cv_bridge", fake)
    monkeypatch.setitem(sys.modules, "cv2", fake_cv2)
    monkeypatch.setattr(StandInBridge, "calls", [])
    monkeypatch.setattr(StandInBridge, "fail_with", None)
    monkeypatch.setattr(StandInBridge, "override", None)
    image_mod._cv_bridge.cache_clear()
    yield types.SimpleNamespace(cls=StandInBridge, cv2=fake_cv2)
    image_mod._cv_bridge.cache_clear()  # the next test probes the real environment again


def ros_image(arr_bytes, height, width, encoding, step, bigendian=0):
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=bigendian, step=step)
    msg.data = bytes(arr_bytes)
    return msg


def test_probe_finds_stand_in_and_is_cached(bridge, monkeypatch):
    assert image_mod.HAVE_CV_BRIDGE is True and image_mod.have_cv_bridge()
    first = image_mod._cv_bridge()
    assert isinstance(first.bridge, StandInBridge)
    assert first.errors == (StandInBridgeError, bridge.cv2.error)
    monkeypatch.setitem(sys.modules, "cv_bridge", None)  # would now fail to import
    assert image_mod._cv_bridge() is first  # cached: not probed again


@pytest.mark.parametrize(
    "module_attr_error",
    [
        None,  # sys.modules[name] = None: import raises ImportError
        AttributeError("_ARRAY_API not found"),  # numpy-2 / numpy-1.x ABI mismatch inside cv2
        RuntimeError("module compiled against API version 0x10 but this version of numpy is 0xe"),
        ValueError("numpy.dtype size changed, may indicate binary incompatibility"),
    ],
)
def test_probe_false_when_import_fails(monkeypatch, module_attr_error):
    if module_attr_error is None:
        monkeypatch.setitem(sys.modules, "cv_bridge", None)
    else:
        broken = types.ModuleType("cv_bridge")

        def fail(name):
            raise module_attr_error

        broken.__getattr__ = fail  # `from cv_bridge import CvBridge` raises it
        monkeypatch.setitem(sys.modules, "cv_bridge", broken)
    image_mod._cv_bridge.cache_clear()
    try:
        assert image_mod.HAVE_CV_BRIDGE is False and image_mod._cv_bridge() is None
        # With no bridge the substitute still converts a real rclpy message.
        msg = numpy_to_image(np.array([[[1, 2, 3]]], np.uint8), "bgr8", ros=True)
        assert image_to_rgb(msg).tolist() == [[[3, 2, 1]]]
    finally:
        image_mod._cv_bridge.cache_clear()


def test_probe_does_not_swallow_other_errors(monkeypatch):
    broken = types.ModuleType("cv_bridge")

    def fail(name):
        raise KeyError("a bug, not a missing library")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "cv_bridge", broken)
    image_mod._cv_bridge.cache_clear()
    try:
        with pytest.raises(KeyError, match="a bug"):
            image_mod.have_cv_bridge()
    finally:
        image_mod._cv_bridge.cache_clear()


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
def test_image_to_rgb_uses_cv_bridge_and_matches_substitute(bridge, encoding):
    rng = np.random.default_rng(1)
    ch = 1 if encoding == "mono8" else 3
    pixels = rng.integers(0, 256, (3, 4, ch), dtype=np.uint8)
    step = 4 * ch + 3  # 3 padding bytes per row, filled with 0xEE
    data = np.full((3, step), 0xEE, np.uint8)
    data[:, : 4 * ch] = pixels.reshape(3, -1)
    msg = ros_image(data.tobytes(), 3, 4, encoding, step)

    out = image_to_rgb(msg)
    assert bridge.cls.calls == [("imgmsg_to_cv2", encoding, "rgb8")]
    sub = image_to_rgb(msg, prefer_cv_bridge=False)
    assert len(bridge.cls.calls) == 1  # forced substitute: cv_bridge not called
    expected = {"rgb8": pixels, "bgr8": pixels[..., ::-1], "mono8": np.repeat(pixels, 3, axis=2)}[encoding]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(sub, expected)
    assert out.dtype == np.uint8 and out.flags.writeable and out.flags.c_contiguous


def test_rgb8_passthrough_result_is_a_copy(bridge):
    # The stand-in returns a view of its own for rgb8; the caller must get a fresh array anyway.
    shared = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    bridge.cls.override = shared
    out = image_to_rgb(ros_image(shared.tobytes(), 2, 2, "rgb8", 6))
    np.testing.assert_array_equal(out, shared)
    assert not np.shares_memory(out, shared) and out.flags.writeable


def test_non_rclpy_messages_stay_on_substitute(bridge):
    arr = np.array([[[10, 20, 30]]], np.uint8)
    assert image_to_rgb(numpy_to_image(arr, "bgr8", ros=False)).tolist() == [[[30, 20, 10]]]
    depth = numpy_to_image(np.array([[1500]], np.uint16), "16UC1", ros=False)
    np.testing.assert_allclose(depth_to_metres(depth), [[1.5]])
    assert compressed_to_rgb(rgb_to_compressed(np.full((2, 2, 3), 9, np.uint8), "png", ros=False)).max() == 9
    assert bridge.cls.calls == []


def test_depth_uses_cv_bridge_passthrough_and_unit_rules(bridge):
    mm = np.array([[0, 1500, 65535], [250, 1, 0]], np.uint16)
    msg = numpy_to_image(mm, "16UC1", ros=True)
    out = depth_to_metres(msg)
    assert bridge.cls.calls == [("imgmsg_to_cv2", "16UC1", "passthrough")]
    np.testing.assert_allclose(out, [[np.nan, 1.5, 65.535], [0.25, 0.001, np.nan]], rtol=1e-6)
    np.testing.assert_array_equal(out, depth_to_metres(msg, prefer_cv_bridge=False))
    assert out.dtype == np.float32

    metres = np.array([[0, np.nan, 2.25, np.inf, -1.0]], np.float32)
    msg = numpy_to_image(metres, "32FC1", ros=True)
    out = depth_to_metres(msg)
    assert bridge.cls.calls[-1] == ("imgmsg_to_cv2", "32FC1", "passthrough")
    np.testing.assert_array_equal(out, [[np.nan, np.nan, 2.25, np.nan, np.nan]])
    assert out.flags.writeable and not np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


def test_big_endian_depth_stays_on_substitute(bridge):
    # 1500 mm = 0x05DC big-endian; cv_bridge is skipped for a non-native byte order.
    msg = ros_image(bytes([0x05, 0xDC, 0, 0]), 1, 2, "16UC1", 4, bigendian=1)
    np.testing.assert_allclose(depth_to_metres(msg), [[1.5, np.nan]])
    assert bridge.cls.calls == []


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"step": 5}, "step 5 is smaller than one row"),
        ({"data": bytes(11)}, "11 bytes but height 2 x step 6 = 12"),
        ({"encoding": "yuv422"}, "unknown image encoding 'yuv422'"),
        ({"width": 0, "step": 0, "data": b""}, "zero size"),
    ],
)
def test_bad_messages_rejected_before_cv_bridge(bridge, fields, match):
    base = {"height": 2, "width": 2, "encoding": "rgb8", "step": 6, "data": bytes(12)}
    base.update(fields)
    ros_msg = ros_image(base["data"], base["height"], base["width"], base["encoding"], base["step"])
    for msg in (ros_msg, PlainImage(is_bigendian=0, **base)):
        with pytest.raises(ValueError, match=match):
            image_to_rgb(msg)
    assert bridge.cls.calls == []


def test_bridge_errors_become_value_error(bridge):
    msg = numpy_to_image(np.zeros((2, 2, 3), np.uint8), "bgr8", ros=True)
    bridge.cls.fail_with = StandInBridgeError("encoding specified as rgb8, but image has incompatible type")
    with pytest.raises(ValueError, match="cannot convert 'bgr8' image 2x2 to rgb8: encoding specified"):
        image_to_rgb(msg)
    bridge.cls.fail_with = bridge.cv2.error("OpenCV(4.6.0) error: (-215:Assertion failed)")
    with pytest.raises(ValueError, match="Assertion failed"):
        depth_to_metres(numpy_to_image(np.ones((2, 2), np.uint16), "16UC1", ros=True))
    with pytest.raises(ValueError, match="cv_bridge cannot convert compressed image"):
        compressed_to_rgb(rgb_to_compressed(np.zeros((2, 2, 3), np.uint8), "png", ros=True))
    bridge.cls.fail_with = ZeroDivisionError("a bug in the bridge")  # not a conversion error: propagates
    with pytest.raises(ZeroDivisionError):
        image_to_rgb(msg)


def test_wrong_shape_from_bridge_is_rejected(bridge):
    bridge.cls.override = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"cv_bridge returned uint8 \(2, 2\) .*expected uint8 \(2, 2, 3\)"):
        image_to_rgb(numpy_to_image(np.zeros((2, 2, 3), np.uint8), "rgb8", ros=True))


def test_compressed_uses_cv_bridge_and_matches_substitute(bridge):
    yy, xx = np.mgrid[0:6, 0:8]
    rgb = np.stack([xx * 30, yy * 40, xx + yy], axis=-1).astype(np.uint8)
    msg = rgb_to_compressed(rgb, "png", ros=True)
    out = compressed_to_rgb(msg)
    assert bridge.cls.calls == [("compressed_imgmsg_to_cv2", "rgb8; png compressed bgr8", "passthrough")]
    np.testing.assert_array_equal(out, rgb)  # PNG is lossless: BGR from the bridge reordered to RGB
    np.testing.assert_array_equal(compressed_to_rgb(msg, prefer_cv_bridge=False), rgb)
    assert out.flags.writeable and out.flags.c_contiguous

    grey = io.BytesIO()
    PILImage.fromarray(np.array([[5, 250]], np.uint8)).save(grey, format="PNG")
    msg = CompressedImage(format="mono8; png compressed mono8")
    msg.data = grey.getvalue()
    assert compressed_to_rgb(msg).tolist() == [[[5, 5, 5], [250, 250, 250]]]


def test_compressed_bad_data_same_errors_on_both_paths(bridge):
    bad = CompressedImage(format="rgb8; jpeg compressed bgr8")
    bad.data = b"hello"
    empty = CompressedImage(format="png")
    for prefer in (True, False):
        with pytest.raises(ValueError, match=r"undecodable compressed image data \(5 bytes\)"):
            compressed_to_rgb(bad, prefer_cv_bridge=prefer)
        with pytest.raises(ValueError, match="zero size"):
            compressed_to_rgb(empty, prefer_cv_bridge=prefer)
    assert [c[0] for c in bridge.cls.calls] == ["compressed_imgmsg_to_cv2"]  # empty data never reached it
