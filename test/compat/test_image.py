"""Image <-> numpy: hand-built byte layouts (padding, big-endian), round trips, compressed, bad input."""

import array
import io
import struct

import numpy as np
import pytest
from PIL import Image

from lerf_ros.compat.image import (
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

RNG = np.random.default_rng(0)

SAMPLES = {
    "rgb8": RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8),
    "bgr8": RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8),
    "rgba8": RNG.integers(0, 256, (3, 5, 4), dtype=np.uint8),
    "bgra8": RNG.integers(0, 256, (3, 5, 4), dtype=np.uint8),
    "mono8": RNG.integers(0, 256, (3, 5), dtype=np.uint8),
    "mono16": RNG.integers(0, 65536, (3, 5), dtype=np.uint16),
    "16UC1": RNG.integers(0, 65536, (3, 5), dtype=np.uint16),
    "32FC1": RNG.normal(size=(3, 5)).astype(np.float32),
}


@pytest.mark.parametrize("ros", [False, True])
@pytest.mark.parametrize("encoding", list(SAMPLES))
def test_round_trip_every_encoding(encoding, ros):
    arr = SAMPLES[encoding]
    msg = numpy_to_image(arr, encoding, ros=ros)
    assert type(msg).__name__ == ("Image" if ros else "PlainImage")
    assert (msg.height, msg.width, msg.step) == (3, 5, 5 * bytes_per_pixel(encoding))
    out = image_to_numpy(msg)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_bytes_per_pixel_table():
    expected = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "16UC1": 2, "32FC1": 4}
    assert {e: bytes_per_pixel(e) for e in expected} == expected


def test_padded_step_rgb8_skips_padding_bytes():
    data = bytes([1, 2, 3, 4, 5, 6, 99, 99, 7, 8, 9, 10, 11, 12, 99, 99])
    msg = PlainImage(height=2, width=2, encoding="rgb8", is_bigendian=0, step=8, data=data)
    expected = np.array([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]], dtype=np.uint8)
    np.testing.assert_array_equal(image_to_numpy(msg), expected)
    msg.encoding = "bgr8"
    np.testing.assert_array_equal(image_to_rgb(msg), expected[..., ::-1])


@pytest.mark.parametrize("encoding", ["16UC1", "mono16"])
def test_big_endian_16bit_with_padding(encoding):
    # Values 258 = 0x0102 and 513 = 0x0201 per row; 2 padding bytes (0xEE) after each 4-byte row.
    data = bytes([1, 2, 2, 1, 0xEE, 0xEE, 0, 1, 1, 0, 0xEE, 0xEE])
    msg = PlainImage(height=2, width=2, encoding=encoding, is_bigendian=1, step=6, data=data)
    out = image_to_numpy(msg)
    np.testing.assert_array_equal(out, [[258, 513], [1, 256]])
    assert out.dtype == np.uint16 and out.dtype.isnative
    msg.is_bigendian = 0
    np.testing.assert_array_equal(image_to_numpy(msg), [[513, 258], [256, 1]])


def test_big_endian_32fc1_and_depth_in_metres():
    # 1.5 = 0x3FC00000, -2.0 = 0xC0000000 (big-endian bytes as written).
    data = bytes([0x3F, 0xC0, 0, 0, 0xC0, 0, 0, 0])
    msg = PlainImage(height=1, width=2, encoding="32FC1", is_bigendian=1, step=8, data=data)
    np.testing.assert_array_equal(image_to_numpy(msg), [[1.5, -2.0]])
    depth = depth_to_metres(msg)
    assert depth.dtype == np.float32
    assert depth[0, 0] == 1.5 and np.isnan(depth[0, 1])  # negative depth is invalid


def test_depth_to_metres_rules():
    mm = numpy_to_image(np.array([[0, 1500, 65535]], dtype=np.uint16), "16UC1", ros=False)
    np.testing.assert_allclose(depth_to_metres(mm), [[np.nan, 1.5, 65.535]], rtol=1e-6)
    f = numpy_to_image(np.array([[0, np.nan, 2.25, np.inf]], dtype=np.float32), "32FC1", ros=False)
    np.testing.assert_array_equal(depth_to_metres(f), [[np.nan, np.nan, 2.25, np.nan]])
    with pytest.raises(ValueError, match="not a depth encoding"):
        depth_to_metres(numpy_to_image(SAMPLES["rgb8"], "rgb8", ros=False))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_outputs_are_writeable_copies_not_aliases(encoding):
    arr = SAMPLES[encoding]
    for data in (arr.tobytes(), np.frombuffer(arr.tobytes(), np.uint8).copy()):
        msg = PlainImage(height=3, width=5, encoding=encoding, is_bigendian=0,
                         step=bytes_per_pixel(encoding) * 5, data=data)
        for out in (image_to_rgb(msg), image_to_numpy(msg)):
            assert out.flags.writeable and out.flags.c_contiguous
            if isinstance(data, np.ndarray):
                assert not np.shares_memory(out, data)


def test_image_to_rgb_channel_orders():
    px = np.array([[[10, 20, 30, 40]]], dtype=np.uint8)
    assert image_to_rgb(numpy_to_image(px, "bgra8", ros=False)).tolist() == [[[30, 20, 10]]]
    assert image_to_rgb(numpy_to_image(px, "rgba8", ros=False)).tolist() == [[[10, 20, 30]]]
    assert image_to_rgb(numpy_to_image(px[..., :3], "bgr8", ros=False)).tolist() == [[[30, 20, 10]]]
    grey = image_to_rgb(numpy_to_image(np.array([[7, 200]], dtype=np.uint8), "mono8", ros=False))
    assert grey.shape == (1, 2, 3) and grey.tolist() == [[[7, 7, 7], [200, 200, 200]]]
    with pytest.raises(ValueError, match="not a colour encoding"):
        image_to_rgb(numpy_to_image(SAMPLES["16UC1"], "16UC1", ros=False))


@pytest.mark.parametrize(
    "data",
    [
        list(range(6)),
        array.array("B", range(6)),
        np.arange(6, dtype=np.uint8),  # rosbags deserialises uint8[] as numpy
        bytearray(range(6)),
    ],
)
def test_data_container_types(data):
    msg = PlainImage(height=2, width=1, encoding="rgb8", is_bigendian=0, step=3, data=data)
    np.testing.assert_array_equal(image_to_numpy(msg), [[[0, 1, 2]], [[3, 4, 5]]])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"encoding": "yuv422"}, "unknown image encoding 'yuv422'"),
        ({"step": 5}, "step 5 is smaller than one row"),
        ({"data": bytes(11)}, "11 bytes but height 2 x step 6 = 12"),
        ({"data": bytes(13)}, "13 bytes"),
        ({"height": 0, "data": b""}, "zero size"),
        ({"width": 0}, "zero size"),
    ],
)
def test_bad_image_messages(fields, match):
    base = {"height": 2, "width": 2, "encoding": "rgb8", "is_bigendian": 0, "step": 6, "data": bytes(12)}
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        image_to_numpy(PlainImage(**base))


def test_numpy_to_image_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="needs a \\(H, W\\) float32 array, got float64"):
        numpy_to_image(np.zeros((2, 2)), "32FC1")
    with pytest.raises(ValueError, match="needs a \\(H, W, 3\\) uint8"):
        numpy_to_image(np.zeros((2, 2, 4), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="unknown image encoding"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "8UC7")
    with pytest.raises(ValueError, match="zero size"):
        numpy_to_image(np.zeros((0, 2), np.uint8), "mono8")


def smooth_rgb(h=24, w=32):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 4], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("ros", [False, True])
def test_compressed_png_is_exact_and_jpeg_is_close(ros):
    rgb = smooth_rgb()
    png = rgb_to_compressed(rgb, "png", ros=ros)
    assert png.format == "rgb8; png compressed bgr8"
    np.testing.assert_array_equal(compressed_to_rgb(png), rgb)
    jpg = rgb_to_compressed(rgb, "jpeg", quality=95, ros=ros)
    out = compressed_to_rgb(jpg)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    err = np.abs(out.astype(int) - rgb.astype(int))
    assert err.mean() < 2.0 and err.max() < 24


def test_compressed_greyscale_jpeg_expands_and_bad_data_fails():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6), 128, np.uint8)).save(buf, format="JPEG")
    out = compressed_to_rgb(PlainCompressedImage(format="mono8; jpeg compressed mono8", data=buf.getvalue()))
    assert out.shape == (4, 6, 3) and np.abs(out.astype(int) - 128).max() <= 1
    with pytest.raises(ValueError, match="undecodable compressed image data \\(5 bytes\\)"):
        compressed_to_rgb(PlainCompressedImage(format="jpeg", data=b"hello"))
    truncated = rgb_to_compressed(smooth_rgb(), "png", ros=False).data[:60]
    with pytest.raises(ValueError, match="undecodable"):
        compressed_to_rgb(PlainCompressedImage(format="png", data=truncated))
    with pytest.raises(ValueError, match="zero size"):
        compressed_to_rgb(PlainCompressedImage(format="png", data=b""))
    with pytest.raises(ValueError, match="compressed depth"):
        compressed_to_rgb(PlainCompressedImage(format="16UC1; compressedDepth", data=b"x"))


def _png16(values):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_compressed_depth_16uc1_and_32fc1():
    msg = PlainCompressedImage(
        format="16UC1; compressedDepth png", data=struct.pack("<iff", 0, 0, 0) + _png16([[0, 1500, 250]])
    )
    np.testing.assert_allclose(compressed_depth_to_metres(msg), [[np.nan, 1.5, 0.25]], rtol=1e-6)
    # Encoder quantisation for depth_quantization 100, depth_max 10 m: A = 100 * 101 = 10100,
    # B = 1 - A / 10 = -1009, q = A / d + B: d = 1 -> 9091, 2 -> 4041, 4 -> 1516; q = 0 invalid.
    data = struct.pack("<iff", 0, 10100, -1009) + _png16([[9091, 4041, 1516, 0]])
    msg = PlainCompressedImage(format="32FC1; compressedDepth", data=data)
    depth = compressed_depth_to_metres(msg)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, [[1.0, 2.0, 4.0, np.nan]], rtol=1e-6)


@pytest.mark.parametrize(
    ("fmt", "data", "match"),
    [
        ("png", b"x" * 20, "not compressedDepth"),
        ("16UC1; compressedDepth rvl", b"x" * 20, "RVL"),
        ("8UC1; compressedDepth", b"x" * 20, "unsupported"),
        ("16UC1; compressedDepth", b"x" * 12, "12-byte header"),
        ("16UC1; compressedDepth", b"x" * 20, "undecodable compressed depth"),
    ],
)
def test_compressed_depth_bad_input(fmt, data, match):
    with pytest.raises(ValueError, match=match):
        compressed_depth_to_metres(PlainCompressedImage(format=fmt, data=data))
