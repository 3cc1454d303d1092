"""Pieces of the trainer's ingest path that need no running ROS: drop counters, the bounded queue,
CameraInfo -> intrinsics, and the pose lookup that turns TF errors into drop reasons.

Frames flow: subscription callback (convert + validate, never blocks) -> ``BoundedQueue`` ->
ingest thread (TF lookup at the image stamp, waiting up to the timeout) -> ``engine.add_frame``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lerf_ros.core.camera import CameraIntrinsics

#: Drop reasons the node itself counts (the engine adds its keyframe rejections, e.g. "blurred").
NO_CAMERA_INFO = "no_camera_info"
BAD_IMAGE = "bad_image"
BAD_DEPTH = "bad_depth"
SIZE_MISMATCH = "size_mismatch"
BAD_INTRINSICS = "bad_intrinsics"
TF_MISSING = "tf_missing"
TF_EXTRAPOLATION = "tf_extrapolation"
BAD_TRANSFORM = "bad_transform"
QUEUE_FULL = "queue_full"
BAD_FRAME = "bad_frame"


class DropCounter:
    """Thread-safe counts of dropped frames by reason, plus frames received."""

    def __init__(self):
        self._lock = threading.Lock()
        self._drops: collections.Counter[str] = collections.Counter()
        self._received = 0

    def received(self) -> None:
        with self._lock:
            self._received += 1

    def drop(self, reason: str) -> None:
        with self._lock:
            self._drops[reason] += 1

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(frames received, {reason: count})."""
        with self._lock:
            return self._received, dict(self._drops)

    def reset(self) -> None:
        with self._lock:
            self._drops.clear()
            self._received = 0


@dataclass(frozen=True)
class PendingFrame:
    """A converted, validated image waiting for its pose.

    image: (H, W, 3) uint8 RGB; depth_m: (H, W) float32 or None; frame_id: the camera's optical frame.
    """

    image: np.ndarray
    intrinsics: CameraIntrinsics
    frame_id: str
    stamp_ns: int
    depth_m: np.ndarray | None = None


class BoundedQueue:
    """FIFO of at most ``maxlen`` items; ``put`` on a full queue evicts the oldest (reported to the caller).

    Dropping the oldest keeps the newest views, which is what an online mapper wants when it falls behind.
    ``high_water`` is the largest length ever held (tests check it never exceeds ``maxlen``).
    """

    def __init__(self, maxlen: int):
        if int(maxlen) < 1:
            raise ValueError(f"queue maxlen must be >= 1, got {maxlen}")
        self.maxlen = int(maxlen)
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.high_water = 0

    def put(self, item) -> bool:
        """Append; return False when an old item had to be evicted to make room."""
        with self._cond:
            evicted = len(self._items) >= self.maxlen
            if evicted:
                self._items.popleft()
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify()
            return not evicted

    def get(self, timeout: float | None = None):
        """Oldest item, or None after ``timeout`` s or once closed."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


_DISTORTION = {"": "none", "none": "none", "plumb_bob": "plumb_bob",
               "rational_polynomial": "rational_polynomial"}


def intrinsics_from_camera_info(msg) -> CameraIntrinsics:
    """sensor_msgs/CameraInfo -> CameraIntrinsics (not validated: the caller validates per image).

    An all-zero D is treated as no distortion. An unknown distortion model raises ValueError.
    Binning and ROI are not supported (rejected when set) because K would no longer match the image.
    """
    model = str(msg.distortion_model)
    if model not in _DISTORTION:
        known = sorted(set(_DISTORTION) - {""})
        raise ValueError(f"unsupported distortion model {model!r}; supported: {known}")
    if int(msg.binning_x) > 1 or int(msg.binning_y) > 1 or int(msg.roi.width) or int(msg.roi.height):
        raise ValueError(f"CameraInfo binning {msg.binning_x}x{msg.binning_y} / ROI is not supported")
    k = [float(v) for v in msg.k]
    d = tuple(float(v) for v in msg.d)
    model = _DISTORTION[model] if any(v != 0.0 for v in d) else "none"
    return CameraIntrinsics(int(msg.width), int(msg.height), k[0], k[4], k[2], k[5], model,
                            d if model != "none" else ())


def lookup_pose(lookup: Callable[[str, str, int, float], np.ndarray], world_frame: str, camera_frame: str,
                stamp_ns: int, timeout_s: float, exceptions) -> tuple[np.ndarray | None, str, str]:
    """``T_world_cam`` (4, 4) at ``stamp_ns``, or None with a drop reason and the error text.

    lookup:     (target, source, stamp_ns, timeout_s) -> (4, 4) T_target_source; raises TF errors.
    exceptions: the TF exception classes (``lerf_ros.compat.tf``): ``ExtrapolationException`` means the
                chain exists but not at this stamp ("tf_extrapolation": TF only in the future of the image,
                or still behind it after waiting); any other ``TransformException`` means the chain is
                missing ("tf_missing").
    A non-finite or non-rigid result is "bad_transform".
    """
    from lerf_ros.core.transforms import validate_rigid

    what = f"T_{world_frame}_{camera_frame} at {stamp_ns / 1e9:.3f} s (waited {timeout_s} s)"
    try:
        T = lookup(world_frame, camera_frame, stamp_ns, timeout_s)
    except exceptions.ExtrapolationException as exc:
        return None, TF_EXTRAPOLATION, f"{what}: {exc}"
    except exceptions.TransformException as exc:
        return None, TF_MISSING, f"{what}: {exc}"
    try:
        return validate_rigid(T, f"T_{world_frame}_{camera_frame}"), "", ""
    except ValueError as exc:
        return None, BAD_TRANSFORM, str(exc)
