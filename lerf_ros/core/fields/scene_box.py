"""Axis-aligned scene box in the world frame and the contraction of space around it.

``normalize`` maps world points to [0, 1]^3 for the hash grids:
  1. affine: the box [min_xyz, max_xyz] -> [-1, 1]^3 (per axis);
  2. contraction (mip-NeRF 360, with the L-infinity norm so the box stays a box): points with
     ||p||_inf <= 1 are unchanged, others map to (2 - 1/||p||_inf) * p / ||p||_inf, so all of space
     lands in [-2, 2]^3 and the box itself in [-1, 1]^3;
  3. affine: [-2, 2]^3 -> [0, 1]^3. The box occupies [0.25, 0.75]^3; everything outside it, out to
     infinity, is squeezed into the outer shell, with resolution falling off as 1/distance.
With ``contract=False`` step 2 is skipped and step 3 maps [-1, 1]^3 -> [0, 1]^3 (points outside
fall outside [0, 1] and are treated as empty by the fields).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SceneBox:
    """min_xyz, max_xyz: world frame, metres; contract: whether space outside is contracted."""

    min_xyz: tuple[float, float, float]
    max_xyz: tuple[float, float, float]
    contract: bool = True

    def __post_init__(self):
        lo = np.asarray(self.min_xyz, dtype=np.float64).reshape(-1)
        hi = np.asarray(self.max_xyz, dtype=np.float64).reshape(-1)
        if lo.shape != (3,) or hi.shape != (3,) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ValueError(
                f"scene box corners must be 3 finite numbers, got {self.min_xyz}, {self.max_xyz}"
            )
        if np.any(hi - lo <= 0):
            raise ValueError(
                f"scene box max must exceed min on every axis, got {self.min_xyz} .. {self.max_xyz}"
            )
        object.__setattr__(self, "min_xyz", tuple(float(v) for v in lo))
        object.__setattr__(self, "max_xyz", tuple(float(v) for v in hi))

    @classmethod
    def from_camera_positions(cls, positions, margin_m: float, contract: bool = True) -> SceneBox:
        """Bounding box of camera positions (N, 3) world metres, grown by margin_m on every side."""
        p = np.asarray(positions, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0 or not np.all(np.isfinite(p)):
            raise ValueError(f"positions must be a non-empty finite (N, 3) array, got shape {p.shape}")
        if not np.isfinite(margin_m) or margin_m <= 0:
            raise ValueError(f"margin_m must be positive, got {margin_m}")
        return cls(tuple(p.min(0) - margin_m), tuple(p.max(0) + margin_m), contract)

    @property
    def center(self) -> np.ndarray:
        return (np.asarray(self.min_xyz) + np.asarray(self.max_xyz)) / 2

    @property
    def half_extent(self) -> np.ndarray:
        return (np.asarray(self.max_xyz) - np.asarray(self.min_xyz)) / 2

    def to_dict(self) -> dict:
        return {"min_xyz": list(self.min_xyz), "max_xyz": list(self.max_xyz), "contract": bool(self.contract)}

    @classmethod
    def from_dict(cls, d: dict) -> SceneBox:
        try:
            return cls(tuple(d["min_xyz"]), tuple(d["max_xyz"]), bool(d.get("contract", True)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a scene box dict: {d!r}") from exc

    def _tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cached per (device, dtype): avoids a host-to-device copy on every call on CUDA.
        return _box_tensors(self.min_xyz, self.max_xyz, like.device, like.dtype)

    def normalize(self, points: torch.Tensor) -> torch.Tensor:
        """World points (..., 3) metres -> (..., 3) in [0, 1] (see module docstring)."""
        c, h = self._tensors(points)
        p = (points - c) / h
        if not self.contract:
            return (p + 1.0) / 2.0
        mag = p.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        p = torch.where(mag <= 1.0, p, (2.0 - 1.0 / mag) * p / mag)
        return (p + 2.0) / 4.0

    def ray_intersect(
        self, origins: torch.Tensor, directions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry and exit distances (R,) of rays with the box (slab method); exit < entry = miss.

        Entry is clamped at 0 for origins inside the box.
        """
        lo = torch.as_tensor(self.min_xyz, dtype=origins.dtype, device=origins.device)
        hi = torch.as_tensor(self.max_xyz, dtype=origins.dtype, device=origins.device)
        d = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
        t0, t1 = (lo - origins) / d, (hi - origins) / d
        t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
        t_far = torch.maximum(t0, t1).amin(dim=-1)
        return t_near, t_far


@functools.lru_cache(maxsize=64)
def _box_tensors(min_xyz, max_xyz, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = np.asarray(min_xyz), np.asarray(max_xyz)
    c = torch.as_tensor((lo + hi) / 2, dtype=dtype, device=device)
    h = torch.as_tensor((hi - lo) / 2, dtype=dtype, device=device)
    return c, h
