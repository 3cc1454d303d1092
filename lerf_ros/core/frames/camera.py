"""Pinhole camera intrinsics (ROS sensor_msgs/CameraInfo semantics, pixels).

Distortion is removed once at ingest (see ``undistort_image`` / ``undistort_depth``), after
which every frame in the core is an ideal pinhole with ``distortion_model == "none"``.

Pixel convention (ROS CameraInfo / OpenCV): K maps a camera-frame point to continuous pixel
coordinates ``u = fx * x / z + cx`` (column), ``v = fy * y / z + cy`` (row), and the CENTRE of
pixel (row i, column j) sits at (u, v) = (j, i). So the ray through the centre of column j, row i
is ``pixel_rays(..., u=j, v=i)``: no +0.5. Camera frame is the ROS optical frame (z forward,
x right, y down); poses ``T_world_cam`` map camera coordinates to world coordinates, metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: CameraInfo distortion models the core can undistort, with their coefficient counts.
DISTORTION_MODELS = {"none": 0, "plumb_bob": 5, "rational_polynomial": 8}


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics in pixels; image is ``width`` x ``height``.

    ``distortion`` holds CameraInfo's D: (k1, k2, p1, p2, k3) for plumb_bob,
    (k1, k2, p1, p2, k3, k4, k5, k6) for rational_polynomial, () for none.
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = "none"
    distortion: tuple[float, ...] = ()

    def validate(self) -> CameraIntrinsics:
        """Raise ValueError naming the offending value; return self when valid."""
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        for key in ("fx", "fy", "cx", "cy"):
            value = float(getattr(self, key))
            if not math.isfinite(value):
                raise ValueError(f"intrinsic {key} is not finite: {value}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={self.fx}, fy={self.fy}")
        if self.distortion_model not in DISTORTION_MODELS:
            raise ValueError(
                f"unsupported distortion model {self.distortion_model!r}; "
                f"supported: {sorted(DISTORTION_MODELS)}"
            )
        need = DISTORTION_MODELS[self.distortion_model]
        if self.distortion_model != "none" and len(self.distortion) < need:
            raise ValueError(
                f"{self.distortion_model} needs {need} coefficients, got {len(self.distortion)}"
            )
        if not all(math.isfinite(float(d)) for d in self.distortion):
            raise ValueError(f"distortion coefficients are not finite: {self.distortion}")
        return self

    @property
    def is_distorted(self) -> bool:
        return self.distortion_model != "none" and any(float(d) != 0.0 for d in self.distortion)

    def scaled(self, factor: float) -> CameraIntrinsics:
        """Intrinsics of the same camera with the image resized by ``factor`` (pixel-centre aligned)."""
        w, h = round(self.width * factor), round(self.height * factor)
        sx, sy = w / self.width, h / self.height
        return CameraIntrinsics(
            w, h, self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
            self.distortion_model, self.distortion,
        )


# --------------------------------------------------------------------------- distortion


def _distortion_coeffs(intr: CameraIntrinsics) -> tuple[float, ...]:
    """(k1, k2, p1, p2, k3, k4, k5, k6), zero-padded; all zero for "none"."""
    intr.validate()
    if intr.distortion_model == "none":
        return (0.0,) * 8
    d = tuple(float(x) for x in intr.distortion[: DISTORTION_MODELS[intr.distortion_model]])
    return d + (0.0,) * (8 - len(d))


def distort_normalized(x: np.ndarray, y: np.ndarray, intr: CameraIntrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Apply the lens model to ideal normalised coordinates (x/z, y/z) -> distorted ones.

    plumb_bob is rational_polynomial with k4 = k5 = k6 = 0 (OpenCV's model), so one formula serves both.
    """
    k1, k2, p1, p2, k3, k4, k5, k6 = _distortion_coeffs(intr)
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


def undistort_normalized(
    xd: np.ndarray, yd: np.ndarray, intr: CameraIntrinsics, iterations: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Invert ``distort_normalized`` by fixed-point iteration (as OpenCV's undistortPoints)."""
    k1, k2, p1, p2, k3, k4, k5, k6 = _distortion_coeffs(intr)
    x, y = np.array(xd, dtype=np.float64), np.array(yd, dtype=np.float64)
    for _ in range(iterations):
        r2 = x * x + y * y
        radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x, y = (xd - dx) / radial, (yd - dy) / radial
    return x, y


def _source_pixels(intr: CameraIntrinsics) -> tuple[np.ndarray, np.ndarray]:
    """For every output (ideal pinhole) pixel centre, where it lies in the distorted input image."""
    v, u = np.mgrid[0 : intr.height, 0 : intr.width].astype(np.float64)
    xd, yd = distort_normalized((u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, intr)
    return xd * intr.fx + intr.cx, yd * intr.fy + intr.cy


def _pinhole(intr: CameraIntrinsics) -> CameraIntrinsics:
    return CameraIntrinsics(intr.width, intr.height, intr.fx, intr.fy, intr.cx, intr.cy, "none", ())


def _check_size(array: np.ndarray, intr: CameraIntrinsics, what: str) -> None:
    if not isinstance(array, np.ndarray) or array.ndim < 2:
        raise ValueError(f"{what} must be a numpy array (H, W[, C]), got {type(array).__name__}")
    h, w = array.shape[:2]
    if (w, h) != (int(intr.width), int(intr.height)):
        raise ValueError(f"{what} is {w}x{h} but intrinsics are {intr.width}x{intr.height}")


def undistort_image(image: np.ndarray, intr: CameraIntrinsics) -> tuple[np.ndarray, CameraIntrinsics]:
    """Resample a distorted image onto the ideal pinhole with the same size and K.

    image: (H, W, C) or (H, W), any numeric dtype (uint8 is rounded back to uint8).
    Each output pixel centre is pushed through the forward lens model and the input is sampled
    there bilinearly; samples falling outside the input are 0. Returns (image, intrinsics with
    distortion_model "none"). An undistorted camera returns a copy unchanged.
    """
    _check_size(image, intr, "image")
    if not intr.is_distorted:
        return image.copy(), _pinhole(intr)
    su, sv = _source_pixels(intr)
    h, w = image.shape[:2]
    src = image.astype(np.float64).reshape(h, w, -1)
    u0, v0 = np.floor(su), np.floor(sv)
    fu, fv = (su - u0)[..., None], (sv - v0)[..., None]
    out = np.zeros_like(src)
    weight_in = np.zeros((h, w, 1))
    corners = ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv))
    for du, dv, wgt in corners:
        cu, cv = (u0 + du).astype(np.int64), (v0 + dv).astype(np.int64)
        inside = ((cu >= 0) & (cu < w) & (cv >= 0) & (cv < h))[..., None]
        val = src[np.clip(cv, 0, h - 1), np.clip(cu, 0, w - 1)]
        out += np.where(inside, wgt * val, 0.0)
        weight_in += np.where(inside, wgt, 0.0)
    # Renormalise at the border so edge pixels are not darkened; fully outside stays 0.
    out = np.where(weight_in > 1e-6, out / np.maximum(weight_in, 1e-6), 0.0)
    out = out.reshape(image.shape)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype), _pinhole(intr)


def undistort_depth(depth: np.ndarray, intr: CameraIntrinsics) -> tuple[np.ndarray, CameraIntrinsics]:
    """As ``undistort_image`` for (H, W) depth, with nearest sampling (never blends across edges).

    Depth stays the value along the optical axis of the source pixel (the optical axis is the same
    after undistortion). Outside the input: 0 (invalid).
    """
    _check_size(depth, intr, "depth")
    if not intr.is_distorted:
        return depth.copy(), _pinhole(intr)
    su, sv = _source_pixels(intr)
    h, w = depth.shape[:2]
    cu, cv = np.rint(su).astype(np.int64), np.rint(sv).astype(np.int64)
    inside = (cu >= 0) & (cu < w) & (cv >= 0) & (cv < h)
    out = np.zeros_like(depth)
    out[inside] = depth[cv[inside], cu[inside]]
    return out, _pinhole(intr)


# --------------------------------------------------------------------------- rays and projection


def _as_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device if device is not None else x.device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _check_pinhole(intr: CameraIntrinsics) -> None:
    intr.validate()
    if intr.is_distorted:
        raise ValueError(
            f"intrinsics carry {intr.distortion_model} distortion {intr.distortion}; undistort first"
        )


def ray_dirs_cam(intr: CameraIntrinsics, u, v) -> torch.Tensor:
    """Unit ray directions (N, 3) float32 in the camera optical frame for pixel coordinates u, v (N,).

    u is the column, v the row, in pixels, pixel centres at integers (module docstring).
    """
    _check_pinhole(intr)
    u_t = _as_tensor(u).reshape(-1)
    v_t = _as_tensor(v, device=u_t.device).reshape(-1)
    if u_t.shape != v_t.shape:
        raise ValueError(f"u and v must have the same length, got {tuple(u_t.shape)} and {tuple(v_t.shape)}")
    d = torch.stack([(u_t - intr.cx) / intr.fx, (v_t - intr.cy) / intr.fy, torch.ones_like(u_t)], -1)
    return d / d.norm(dim=-1, keepdim=True)


def z_to_ray_distance(intr: CameraIntrinsics, u, v) -> torch.Tensor:
    """Factor (N,) float32: distance along the unit ray = depth along the optical axis (z) * factor.

    factor = |(x/z, y/z, 1)| = 1 / cos(angle to the optical axis) >= 1.
    """
    return 1.0 / ray_dirs_cam(intr, u, v)[:, 2]


def pixel_rays(intr: CameraIntrinsics, T_world_cam, u, v) -> tuple[torch.Tensor, torch.Tensor]:
    """World-frame rays through pixels.

    T_world_cam: (4, 4) shared by all pixels, or (N, 4, 4) one pose per pixel; numpy or torch.
    u, v: (N,) pixel coordinates (column, row), pixel centres at integers.
    Returns origins (N, 3) and unit directions (N, 3), float32 torch, world frame, metres, on the
    device of T_world_cam when it is a tensor.
    """
    device = T_world_cam.device if isinstance(T_world_cam, torch.Tensor) else None
    T = _as_tensor(T_world_cam, device=device)
    dirs_cam = ray_dirs_cam(intr, _as_tensor(u, device=T.device), _as_tensor(v, device=T.device))
    n = dirs_cam.shape[0]
    if T.shape == (4, 4):
        T = T.expand(n, 4, 4)
    elif T.ndim != 3 or T.shape[1:] != (4, 4) or T.shape[0] not in (1, n):
        raise ValueError(f"T_world_cam must be (4, 4) or ({n}, 4, 4), got {tuple(T.shape)}")
    T = T.expand(n, 4, 4)
    dirs = torch.einsum("nij,nj->ni", T[:, :3, :3], dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    return T[:, :3, 3].contiguous(), dirs


def project_points(points_world, T_world_cam, intr: CameraIntrinsics):
    """Project world points into a pinhole camera.

    points_world: (N, 3) world frame, metres; T_world_cam (4, 4). numpy in -> numpy out (float64),
    torch in -> torch out (points' dtype and device).
    Returns uv (N, 2) pixel coordinates (column, row; pixel centres at integers) and z (N,) depth
    along the optical axis in metres. Points with z <= 0 are behind the camera; their uv is not
    meaningful (computed with |z| clamped away from 0) and callers should mask on z.
    """
    _check_pinhole(intr)
    is_np = not isinstance(points_world, torch.Tensor)
    if is_np:
        P = torch.as_tensor(np.asarray(points_world, dtype=np.float64))
        T = torch.as_tensor(np.asarray(T_world_cam, dtype=np.float64))
    else:
        P = points_world
        T = _as_tensor(T_world_cam, device=P.device, dtype=P.dtype)
    if P.ndim != 2 or P.shape[1] != 3:
        raise ValueError(f"points_world must be (N, 3), got {tuple(P.shape)}")
    if T.shape != (4, 4):
        raise ValueError(f"T_world_cam must be (4, 4), got {tuple(T.shape)}")
    R, t = T[:3, :3], T[:3, 3]
    p_cam = (P - t) @ R  # R^T (p - t), row-vector form
    z = p_cam[:, 2]
    z_safe = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
    uv = torch.stack([intr.fx * p_cam[:, 0] / z_safe + intr.cx, intr.fy * p_cam[:, 1] / z_safe + intr.cy], -1)
    if is_np:
        return uv.numpy(), z.numpy()
    return uv, z
