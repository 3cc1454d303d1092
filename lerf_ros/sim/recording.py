"""What a simulated robot records: TF series (static and dynamic edges) and camera stamps.

A ``Recording`` is the schedule a bag writer turns into messages (``lerf_ros.tools.demo_bag``) and
the single source of ground truth: ``camera_poses`` looks the camera up through the ROS-free
``TfBuffer`` with tf2 interpolation at each image stamp, exactly as a reader of the bag will, so
the rendered image and the pose a reader recovers agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compat.tf_buffer import TfBuffer
from ..core.frames.camera import CameraIntrinsics
from ..core.frames.transforms import validate_rigid


@dataclass(frozen=True, eq=False)
class TfSeries:
    """One TF edge parent -> child over time.

    stamps_ns: (K,) int64 ascending header stamps; T: (K, 4, 4) T_parent_child at those stamps.
    static: one sample on /tf_static. log_delay_ns: how long after its stamp each message is logged.
    published: False keeps the edge out of the bag (ground truth only, e.g. localisation not running).
    """

    parent: str
    child: str
    stamps_ns: np.ndarray
    T: np.ndarray
    static: bool = False
    log_delay_ns: int = 1_000_000
    published: bool = True

    def validate(self) -> TfSeries:
        stamps = np.asarray(self.stamps_ns)
        if stamps.ndim != 1 or len(stamps) == 0 or np.any(np.diff(stamps) <= 0):
            raise ValueError(f"TF {self.parent}->{self.child}: stamps must be a non-empty ascending (K,) "
                             f"array, got shape {stamps.shape}")
        if self.T.shape != (len(stamps), 4, 4):
            raise ValueError(f"TF {self.parent}->{self.child}: T must be ({len(stamps)}, 4, 4), "
                             f"got {self.T.shape}")
        if self.static and len(stamps) != 1:
            raise ValueError(f"static TF {self.parent}->{self.child} must have one sample, got {len(stamps)}")
        for i, T in enumerate(self.T):
            validate_rigid(T, f"TF {self.parent}->{self.child}[{i}]")
        return self


@dataclass(frozen=True, eq=False)
class Recording:
    """Image stamps (N,) int64 ns of one camera plus the TF series that place it in ``world_frame``."""

    image_stamps_ns: np.ndarray
    intrinsics: CameraIntrinsics
    tf: tuple[TfSeries, ...]
    world_frame: str = "map"
    camera_frame: str = "camera_color_optical_frame"

    def tf_buffer(self) -> TfBuffer:
        """Every series, published or not, in a buffer that keeps the whole recording."""
        dynamic = [s for s in self.tf if not s.static]
        lo = min((int(s.stamps_ns[0]) for s in dynamic), default=0)
        hi = max((int(s.stamps_ns[-1]) for s in dynamic), default=0)
        buf = TfBuffer(cache_time_s=(hi - lo) / 1e9 + 10.0)
        for series in self.tf:
            series.validate()
            if series.static:
                buf.set_matrix(series.parent, series.child, series.T[0], 0, static=True)
                continue
            for stamp, T in zip(series.stamps_ns, series.T, strict=True):
                buf.set_matrix(series.parent, series.child, T, int(stamp))
        return buf

    def camera_poses(self) -> np.ndarray:
        """(N, 4, 4) T_world_cam (optical) at the image stamps, tf2-interpolated through every series."""
        buf = self.tf_buffer()
        return np.stack([buf.lookup_matrix(self.world_frame, self.camera_frame, int(s))
                         for s in self.image_stamps_ns])
