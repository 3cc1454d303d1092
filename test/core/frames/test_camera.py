"""Camera: rays vs projection of known points, undistortion accuracy, depth conversion."""

import numpy as np
import pytest
import torch

from lerf_ros.core.frames.camera import (
    CameraIntrinsics,
    distort_normalized,
    pixel_rays,
    project_points,
    ray_dirs_cam,
    undistort_depth,
    undistort_image,
    undistort_normalized,
    z_to_ray_distance,
)
from lerf_ros.core.frames.transforms import make_transform, quat_to_matrix

INTR = CameraIntrinsics(width=96, height=72, fx=80.0, fy=82.0, cx=47.5, cy=35.5)


def _pose() -> np.ndarray:
    # Camera 1.2 m up, looking along world +x (optical z -> world x, optical x -> world -y, optical y -> -z).
    R = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    tilt = quat_to_matrix([0.0, 0.0, np.sin(0.15), np.cos(0.15)])  # some yaw so nothing is axis aligned
    return make_transform(tilt @ R, [0.3, -0.2, 1.2])


def test_projection_of_known_point_and_ray_through_it():
    T = _pose()
    # A point 2 m straight ahead along the optical axis projects exactly to (cx, cy).
    ahead = T[:3, :3] @ np.array([0.0, 0.0, 2.0]) + T[:3, 3]
    uv, z = project_points(ahead[None], T, INTR)
    np.testing.assert_allclose(uv[0], [INTR.cx, INTR.cy], atol=1e-9)
    assert z[0] == pytest.approx(2.0)
    # Hand-computed: camera point (0.5, -0.25, 2.5) -> u = 80*0.2 + 47.5 = 63.5, v = 82*(-0.1) + 35.5 = 27.3.
    p_world = T[:3, :3] @ np.array([0.5, -0.25, 2.5]) + T[:3, 3]
    uv, z = project_points(p_world[None], T, INTR)
    np.testing.assert_allclose(uv[0], [63.5, 27.3], atol=1e-9)
    assert z[0] == pytest.approx(2.5)
    # The ray through that pixel passes through the point: distance from point to ray ~ 0.
    o, d = pixel_rays(INTR, T, torch.tensor([63.5]), torch.tensor([27.3]))
    to_p = torch.as_tensor(p_world, dtype=torch.float32) - o[0]
    t = float(to_p @ d[0])
    assert torch.linalg.norm(to_p - t * d[0]).item() < 1e-5
    # And the distance along the ray equals z * factor.
    factor = z_to_ray_distance(INTR, torch.tensor([63.5]), torch.tensor([27.3]))
    assert t == pytest.approx(2.5 * float(factor[0]), rel=1e-5)


def test_random_points_roundtrip_batched_poses():
    rng = np.random.default_rng(0)
    T = _pose()
    p_cam = np.stack([rng.uniform(-1, 1, 50), rng.uniform(-0.7, 0.7, 50), rng.uniform(0.5, 5, 50)], -1)
    p_world = p_cam @ T[:3, :3].T + T[:3, 3]
    uv, z = project_points(torch.as_tensor(p_world), torch.as_tensor(T), INTR)
    np.testing.assert_allclose(z.numpy(), p_cam[:, 2], atol=1e-9)
    o, d = pixel_rays(INTR, torch.as_tensor(T).expand(50, 4, 4), uv[:, 0], uv[:, 1])
    dist = z.float() * z_to_ray_distance(INTR, uv[:, 0], uv[:, 1])
    np.testing.assert_allclose((o + dist[:, None] * d).numpy(), p_world, atol=1e-4)
    np.testing.assert_allclose(d.norm(dim=-1).numpy(), 1.0, atol=1e-6)


def test_pixel_centre_convention():
    # Column 0's centre is u = 0: with cx = 0 its ray is the optical axis.
    intr = CameraIntrinsics(4, 4, 10.0, 10.0, 0.0, 0.0)
    np.testing.assert_allclose(ray_dirs_cam(intr, [0.0], [0.0]).numpy(), [[0.0, 0.0, 1.0]])
    # The centre of a 96-wide image is u = 47.5 (columns 0..95).
    uv, _ = project_points(np.array([[0.0, 0.0, 1.0]]), np.eye(4), INTR)
    assert uv[0, 0] == pytest.approx((INTR.width - 1) / 2)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="T_world_cam"):
        pixel_rays(INTR, np.eye(3), [0.0], [0.0])
    distorted = CameraIntrinsics(96, 72, 80, 80, 47.5, 35.5, "plumb_bob", (0.1, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="undistort first"):
        ray_dirs_cam(distorted, [0.0], [0.0])
    with pytest.raises(ValueError, match="96x72"):
        undistort_image(np.zeros((10, 10, 3), np.uint8), distorted)


@pytest.mark.parametrize(
    ("model", "coeffs"),
    [
        ("plumb_bob", (-0.28, 0.09, 0.001, -0.0015, -0.01)),
        ("rational_polynomial", (0.4, -0.05, 0.0008, 0.001, 0.002, 0.75, 0.02, 0.001)),
    ],
)
def test_undistortion_inverts_known_distortion(model, coeffs):
    intr = CameraIntrinsics(160, 120, 120.0, 118.0, 81.3, 58.7, model, coeffs)
    x, y = np.meshgrid(np.linspace(-0.6, 0.6, 7), np.linspace(-0.5, 0.5, 7))
    xd, yd = distort_normalized(x, y, intr)
    xu, yu = undistort_normalized(xd, yd, intr)
    np.testing.assert_allclose(xu, x, atol=1e-9)
    np.testing.assert_allclose(yu, y, atol=1e-9)
    # A distorted image whose pixels store the IDEAL pixel coordinates they see.
    v, u = np.mgrid[0:120, 0:160].astype(np.float64)
    xi, yi = undistort_normalized((u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, intr)
    coords = np.stack([xi * intr.fx + intr.cx, yi * intr.fy + intr.cy], -1)
    out, pin = undistort_image(coords, intr)
    assert pin.distortion_model == "none" and (pin.fx, pin.cx) == (intr.fx, intr.cx)
    # After undistortion pixel (u, v) must see ideal coordinate (u, v); check the interior
    # (outer border may come from outside the distorted frame).
    inner = (slice(8, -8), slice(8, -8))
    err = np.linalg.norm(out[inner] - np.stack([u, v], -1)[inner], axis=-1)
    assert err.max() < 0.5, err.max()
    # Without correction the same image is off by several pixels: the test has teeth.
    raw_err = np.linalg.norm(coords[inner] - np.stack([u, v], -1)[inner], axis=-1)
    assert raw_err.max() > 3.0


def test_undistort_uint8_and_depth():
    intr = CameraIntrinsics(96, 72, 80.0, 80.0, 47.5, 35.5, "plumb_bob", (-0.2, 0.05, 0.0, 0.0, 0.0))
    img = np.full((72, 96, 3), 200, np.uint8)
    out, _ = undistort_image(img, intr)
    assert out.dtype == np.uint8
    assert np.all(out[20:52, 20:76] == 200)
    depth = np.full((72, 96), 2.5, np.float32)
    depth[:, 48:] = 4.0
    dout, pin = undistort_depth(depth, intr)
    assert pin.distortion_model == "none"
    # Nearest sampling: only the two input values (or 0 outside), never a blend.
    assert set(np.unique(dout).tolist()) <= {0.0, 2.5, 4.0}
    assert dout[36, 10] == 2.5 and dout[36, 85] == 4.0
