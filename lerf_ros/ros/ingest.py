"""Pieces of the trainer's ingest path that need no running ROS: drop counters, the bounded queue,
the depth buffer that pairs depth with colour by stamp, CameraInfo -> intrinsics, and the pose lookup
that turns TF errors into drop reasons.

Frames flow: subscription callback (convert + validate, never blocks) -> ``BoundedQueue`` ->
ingest thread (TF lookup at the image stamp, waiting up to the timeout; then the depth image of the same
stamp from ``DepthBuffer``, waiting up to its own window) -> ``engine.add_frame``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lerf_ros.core.frames.camera import CameraIntrinsics

#: Drop reasons the node itself counts: the frame never reached the engine (or the engine refused it as
#: invalid, BAD_FRAME). A frame the engine took but did not keep as a keyframe ("redundant", "blurred") is
#: not a drop: ``DropCounter.not_keyframe`` counts it apart.
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

#: Counted but NOT drops: the frame was ingested, without depth, because no depth image of its stamp
#: arrived within ``depth_wait_s`` (a depth topic is configured).
NO_DEPTH_MATCH = "no_depth_match"


class DropCounter:
    """Thread-safe counts of dropped frames by reason, frames received, frames the keyframe selector did
    not keep (by its reason: processed, just not new enough or too blurred to keep; not drops), and notes
    (events on frames that were still ingested, e.g. ``NO_DEPTH_MATCH``; never drops either)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._drops: collections.Counter[str] = collections.Counter()
        self._notes: collections.Counter[str] = collections.Counter()
        self._not_keyframe: collections.Counter[str] = collections.Counter()
        self._received = 0

    def not_keyframe(self, reason: str) -> None:
        """A frame the engine ingested but did not keep as a keyframe (its selector's ``reason``)."""
        with self._lock:
            self._not_keyframe[reason] += 1

    def not_keyframes(self) -> dict[str, int]:
        """{keyframe selector reason: frames not kept for it}."""
        with self._lock:
            return dict(self._not_keyframe)

    def note(self, name: str) -> None:
        with self._lock:
            self._notes[name] += 1

    def notes(self) -> dict[str, int]:
        """{note name: count}."""
        with self._lock:
            return dict(self._notes)

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
            self._notes.clear()
            self._not_keyframe.clear()
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


class DepthBuffer:
    """The most recent depth images keyed by stamp (at most ``maxlen``), for pairing with colour frames.

    Registered RGB-D drivers (RealSense, Azure Kinect) stamp depth with the colour image's capture time
    but publish it on its own topic, so it may arrive before or after the colour image. ``put`` runs in
    the depth subscription callback and never blocks; ``wait_match`` runs in the ingest thread and waits
    (up to a window) for the depth whose stamp is within a tolerance of the colour stamp.

    Full buffer: the depth that arrived first is evicted (newer colour frames need newer depth). By
    arrival, not by smallest stamp: after time jumps back (a bag replayed in a loop, sim time reset),
    evicting the smallest stamp would throw away every new depth and keep the stale "future" ones forever.
    ``high_water`` is the largest number ever held. ``waiting`` is how many callers are blocked in
    ``wait_match`` (for tests).
    """

    def __init__(self, maxlen: int):
        if int(maxlen) < 1:
            raise ValueError(f"depth buffer maxlen must be >= 1, got {maxlen}")
        self.maxlen = int(maxlen)
        self._depths: dict[int, np.ndarray] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._waiting = 0
        self.high_water = 0

    def put(self, stamp_ns: int, depth_m: np.ndarray) -> None:
        """Store ``depth_m`` (H, W) float32 metres under its stamp (a repeated stamp replaces the old one)."""
        with self._cond:
            self._depths.pop(int(stamp_ns), None)  # a repeated stamp counts as a new arrival
            self._depths[int(stamp_ns)] = depth_m
            while len(self._depths) > self.maxlen:
                del self._depths[next(iter(self._depths))]  # dicts keep arrival order
            self.high_water = max(self.high_water, len(self._depths))
            self._cond.notify_all()

    def wait_match(self, stamp_ns: int, tolerance_ns: int, timeout_s: float) -> np.ndarray | None:
        """Remove and return the depth whose stamp is nearest ``stamp_ns`` within ``tolerance_ns``.

        Waits up to ``timeout_s`` for it to arrive. Returns None after the wait, at once when the buffer
        is closed, and early when a depth stamped later than ``stamp_ns + tolerance_ns`` is already held:
        one topic delivers in stamp order, so the matching depth was lost (or never sent) and waiting
        longer would only delay the ingest queue.
        """
        stamp_ns, tolerance_ns = int(stamp_ns), int(tolerance_ns)
        found: list[int] = []

        def settled() -> bool:
            if self._closed:
                return True
            near = [s for s in self._depths if abs(s - stamp_ns) <= tolerance_ns]
            if near:
                found.append(min(near, key=lambda s: abs(s - stamp_ns)))
                return True
            return any(s > stamp_ns + tolerance_ns for s in self._depths)

        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(settled, max(float(timeout_s), 0.0))
            finally:
                self._waiting -= 1
            return self._depths.pop(found[-1]) if found and not self._closed else None

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    def clear(self) -> None:
        with self._cond:
            self._depths.clear()

    def close(self) -> None:
        """Wake every waiter (they get None) and make later waits return at once; for shutdown."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._depths)


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
    from lerf_ros.core.frames.transforms import validate_rigid

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
