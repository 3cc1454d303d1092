"""A posed RGB(-D) frame: the unit of input to the core."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import CameraIntrinsics
from .transforms import validate_rigid


@dataclass(frozen=True)
class Frame:
    """One posed camera frame.

    image:       (H, W, 3) uint8 RGB
    intrinsics:  pinhole intrinsics matching the image size (may carry distortion until ingest)
    T_world_cam: (4, 4) float64, camera pose in the world frame, ROS optical convention
                 (z forward, x right, y down), metres
    stamp_ns:    acquisition time, nanoseconds
    depth_m:     optional (H, W) float32 metric depth along the optical axis; 0 or non-finite = invalid
    camera:      which camera took it ("" = the only one): keyframe selection judges each camera's motion
                 against its own last keyframe, and keyframes of several cameras (each its own image size
                 and intrinsics) train one map
    """

    image: np.ndarray
    intrinsics: CameraIntrinsics
    T_world_cam: np.ndarray
    stamp_ns: int
    depth_m: np.ndarray | None = None
    camera: str = ""

    def validate(self) -> Frame:
        """Raise ValueError naming the offending value; return self when valid."""
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {desc}")
        self.intrinsics.validate()
        h, w = img.shape[:2]
        if (w, h) != (int(self.intrinsics.width), int(self.intrinsics.height)):
            raise ValueError(
                f"image is {w}x{h} but intrinsics are {self.intrinsics.width}x{self.intrinsics.height}"
            )
        validate_rigid(self.T_world_cam, "T_world_cam")
        if not isinstance(self.camera, str):
            raise ValueError(f"camera must be a string, got {type(self.camera).__name__}")
        if self.depth_m is not None:
            d = self.depth_m
            if not isinstance(d, np.ndarray) or d.shape != (h, w):
                shape = getattr(d, "shape", None)
                raise ValueError(f"depth must be (H, W) = ({h}, {w}), got {shape}")
        return self
