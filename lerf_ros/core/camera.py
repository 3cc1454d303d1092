"""Pinhole camera intrinsics (ROS sensor_msgs/CameraInfo semantics, pixels).

Distortion is removed once at ingest (see ``undistort``), after which every
frame in the core is an ideal pinhole with ``distortion_model == "none"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
