"""Pieces of the trainer's ingest path that need no running ROS: drop counters, the bounded queue,
the depth buffer that pairs depth with colour by stamp, CameraInfo -> intrinsics, and the pose lookup
that turns TF errors into drop reasons.

Frames flow: subscription callback (convert + validate, never blocks) -> ``BoundedQueue`` ->
pose thread (TF lookup at the image stamp, waiting up to the timeout; then the depth image of the same
stamp from ``DepthBuffer``, waiting up to its own window) -> ``BoundedQueue`` of ``PosedFrame``s -> add
thread -> ``engine.add_frame``. Two threads, so a slow ``add_frame`` (the engine lock) never delays a TF
lookup until the buffer has moved on (cache time passed, or cleared after time jumped back).
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
#: The lookup met a loop in the TF tree (a frame its own ancestor): tf2 and the substitute both say "loop".
TF_LOOP = "tf_loop"
#: Waiting for a pose when time jumped back (bag loop, simulator reset): the frame is stamped after the time
#: jumped to, on the old timeline, whose transforms the TF buffer has just cleared.
TIME_JUMP = "time_jump"
#: The trainer holds no usable map (``map_path`` did not load): frames are not taken until a map is loaded
#: or a reset starts a fresh one.
NO_MAP = "no_map"

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

    image: (H, W, 3) uint8 RGB; depth_m: (H, W) float32 or None; frame_id: the camera's optical frame;
    camera: the name of the camera it came from (``ros/cameras.py``).
    """

    image: np.ndarray
    intrinsics: CameraIntrinsics
    frame_id: str
    stamp_ns: int
    depth_m: np.ndarray | None = None
    camera: str = ""


@dataclass(frozen=True)
class PosedFrame:
    """A frame whose pose (and depth) ingest found, waiting for ``engine.add_frame``.

    T_world_cam: (4, 4) float64 in ``world_frame``; engine: the engine that frame was posed for (a frame
    posed in the old map's frame never reaches a map loaded meanwhile)."""

    pending: PendingFrame
    T_world_cam: np.ndarray
    depth_m: np.ndarray | None
    engine: object
    world_frame: str


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

    def remove_if(self, predicate) -> list:
        """Remove and return the items for which ``predicate(item)`` is true (order kept for the rest)."""
        with self._cond:
            removed = [item for item in self._items if predicate(item)]
            if removed:
                self._items = collections.deque(item for item in self._items if not predicate(item))
            return removed

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
                or still behind it after waiting); one whose text says "loop" (tf2: "contains a loop", the
                substitute: "loop detected") is a loop in the tree ("tf_loop"); any other
                ``TransformException`` means the chain is missing ("tf_missing").
    A non-finite or non-rigid result is "bad_transform".
    """
    from lerf_ros.core.frames.transforms import validate_rigid

    what = f"T_{world_frame}_{camera_frame} at {stamp_ns / 1e9:.3f} s (waited {timeout_s} s)"
    try:
        T = lookup(world_frame, camera_frame, stamp_ns, timeout_s)
    except exceptions.ExtrapolationException as exc:
        return None, TF_EXTRAPOLATION, f"{what}: {exc}"
    except exceptions.TransformException as exc:
        return None, TF_LOOP if "loop" in str(exc) else TF_MISSING, f"{what}: {exc}"
    try:
        return validate_rigid(T, f"T_{world_frame}_{camera_frame}"), "", ""
    except ValueError as exc:
        return None, BAD_TRANSFORM, str(exc)


#: Frames skipped before conversion (``Decimator``), counted with the frames not kept as keyframes: never
#: drops, because the frame was fine and one close to it in time or pose was taken.
SKIPPED_RATE = "skipped_rate"
SKIPPED_STATIC = "skipped_static"
#: A stamp this much older than the last image taken is time jumping back (a bag loop, a simulator reset).
JUMP_BACK_NS = 1_000_000_000


class Decimator:
    """Which camera images are worth converting at all, decided from the header stamp and a cheap pose.

    Converting and queueing a full-size image costs the executor milliseconds; at 30-60 Hz most of them
    would be dropped later (queue full) or found redundant by the keyframe selector. ``decide`` runs in
    the image callback before conversion and skips:

    - ``SKIPPED_RATE``: the stamp is less than ``min_period_s`` after the last image taken;
    - ``SKIPPED_STATIC``: the camera pose (TF at the stamp if already there, without waiting) moved less
      than half the keyframe thresholds (``min_translation_m``, ``min_rotation_deg``) since the last image
      taken, and less than half ``max_interval_s`` passed: the keyframe selector would very likely call it
      redundant. Half, because the reference is the last image taken, which may not have become a keyframe.

    A stamp more than ``JUMP_BACK_NS`` before the last one taken (time jumped back) starts afresh; an image
    slightly out of order is taken (and becomes the reference). Not
    thread-safe: one image callback (a mutually exclusive group) calls it.
    """

    def __init__(self, min_period_s: float, min_translation_m: float, min_rotation_deg: float,
                 max_interval_s: float):
        for name, value in (("min_period_s", min_period_s), ("min_translation_m", min_translation_m),
                            ("min_rotation_deg", min_rotation_deg), ("max_interval_s", max_interval_s)):
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"Decimator {name} must be a finite number >= 0, got {value!r}")
        self.min_period_ns = round(float(min_period_s) * 1e9)
        self.translation_m = 0.5 * float(min_translation_m)
        self.rotation_deg = 0.5 * float(min_rotation_deg)
        self.interval_ns = round(0.5 * float(max_interval_s) * 1e9)
        self._stamp_ns: int | None = None
        self._T: np.ndarray | None = None

    def reset(self) -> None:
        self._stamp_ns, self._T = None, None

    def decide(self, stamp_ns: int, T_world_cam: np.ndarray | None = None) -> str:
        """'' to convert the image (it becomes the reference), else the skip reason.

        T_world_cam: (4, 4) the camera pose near ``stamp_ns`` (TF's latest), None when unknown (no skip by
        pose; an image taken without a pose leaves no pose reference)."""
        stamp_ns = int(stamp_ns)
        last = self._stamp_ns
        if last is not None and stamp_ns < last - JUMP_BACK_NS:
            self.reset()
            last = None
        if last is not None and stamp_ns >= last:  # an image out of order is taken, as the first one
            elapsed = stamp_ns - last
            if elapsed < self.min_period_ns:
                return SKIPPED_RATE
            if T_world_cam is not None and self._T is not None and elapsed < self.interval_ns:
                moved = float(np.linalg.norm(T_world_cam[:3, 3] - self._T[:3, 3]))
                cos = (np.trace(self._T[:3, :3].T @ T_world_cam[:3, :3]) - 1.0) / 2.0
                turned = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
                if moved < self.translation_m and turned < self.rotation_deg:
                    return SKIPPED_STATIC
        self._stamp_ns, self._T = stamp_ns, None if T_world_cam is None else np.array(T_world_cam)
        return ""


class DeliveryGaps:
    """Messages of one topic that never reached the callback, estimated two ways (thread-safe):

    - ``lost_by_sequence``: gaps in the DDS publication sequence numbers (rclpy's message info), exact for
      one publisher: what the network or a full subscription queue lost;
    - ``missing_by_stamp``: gaps in the header stamps against the expected period (the 10th percentile of
      the last ``window`` stamp steps), which also sees messages that were never published (a driver or a
      bag that skipped them); an estimate, low when most messages are lost.

    A sequence number or stamp that goes back (a publisher restarted, a bag loop) starts that series again
    without counting anything.
    """

    def __init__(self, window: int = 64, gap_factor: float = 1.5, min_steps: int = 8):
        self._lock = threading.Lock()
        self._steps: collections.deque[int] = collections.deque(maxlen=int(window))
        self.gap_factor = float(gap_factor)
        self.min_steps = int(min_steps)
        self._seq: int | None = None
        self._stamp: int | None = None
        self.lost_by_sequence = 0
        self.missing_by_stamp = 0
        self.received = 0

    def period_ns(self) -> int | None:
        """The expected stamp step, ns; None until ``min_steps`` steps were seen."""
        with self._lock:
            return self._period()

    def _period(self) -> int | None:
        if len(self._steps) < self.min_steps:
            return None
        return int(np.percentile(np.fromiter(self._steps, np.int64), 10))

    def observe(self, stamp_ns: int, sequence: int | None = None) -> None:
        stamp_ns = int(stamp_ns)
        with self._lock:
            self.received += 1
            if sequence is not None and sequence > 0:
                if self._seq is not None and sequence > self._seq:
                    self.lost_by_sequence += sequence - self._seq - 1
                self._seq = int(sequence)
            last, self._stamp = self._stamp, stamp_ns
            if last is None or stamp_ns <= last:
                return
            step = stamp_ns - last
            period = self._period()
            self._steps.append(step)
            if period and step > self.gap_factor * period:
                self.missing_by_stamp += max(round(step / period) - 1, 0)

    def reset(self) -> None:
        with self._lock:
            self._steps.clear()
            self._seq = self._stamp = None
            self.lost_by_sequence = self.missing_by_stamp = self.received = 0
