"""A ROS-free TF buffer with tf2's lookup semantics (numpy only, no rclpy).

Each child frame stores its parent and either one static transform (valid at all times) or a
time-sorted history of ``(stamp_ns, translation, quaternion)`` bounded by the cache time. A link
stores ``T_parent_child``: it maps points in the child frame into the parent frame, exactly as a
``geometry_msgs/TransformStamped`` with ``header.frame_id = parent``, ``child_frame_id = child``.

``lookup_matrix(target, source, stamp_ns)`` returns ``T_target_source`` (maps points in ``source``
into ``target``), like tf2's ``lookup_transform(target, source, time)``. It chains links through the
common ancestor of the two frames; dynamic links are interpolated between the two bracketing stamps
(lerp translation, slerp rotation). ``stamp_ns == 0`` asks for the latest time at which every link
on the path has data. Errors mirror tf2: ``LookupException`` (unknown frame),
``ConnectivityException`` (no common ancestor), ``ExtrapolationException`` (stamp outside the data
of a dynamic link), all subclasses of ``TransformException``.

Deviations from tf2, chosen for simplicity: a child frame has one parent at a time (a message
naming a new parent, or switching between static and dynamic, restarts that child's history), and a
transform loop is reported at lookup as ``TransformException``.

Thread-safe: one lock guards the tree; a condition variable wakes ``wait_for_matrix`` callers when
new data arrives, so a lookup can wait for a transform that a listener thread is about to insert.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from lerf_ros.core.frames.transforms import (
    make_transform,
    matrix_to_quat,
    quat_to_matrix,
    slerp,
    validate_quaternion,
    validate_rigid,
)

#: tf2's default cache length.
DEFAULT_CACHE_TIME_S = 10.0


class TransformException(Exception):
    """Base of every lookup error (tf2: ``tf2.TransformException``)."""


class LookupException(TransformException):
    """A frame named in the lookup is not in the buffer."""


class ConnectivityException(TransformException):
    """The two frames are in disconnected trees."""


class ExtrapolationException(TransformException):
    """The requested stamp lies outside the data held for a dynamic link on the path."""


class InvalidArgumentException(TransformException):
    """A frame id argument is empty or not a string."""


def format_stamp(stamp_ns: int) -> str:
    """Integer nanoseconds -> ``"12.500000000 s"`` for error messages."""
    return f"{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d} s"


@dataclass
class _Link:
    """One child frame's connection to its parent: ``T_parent_child`` over time."""

    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)  # sorted ascending; one entry (0) when static
    translations: list[np.ndarray] = field(default_factory=list)  # (3,) float64, metres
    quaternions: list[np.ndarray] = field(default_factory=list)  # (4,) float64 x, y, z, w, unit

    def matrix_at(self, child: str, stamp_ns: int) -> np.ndarray:
        """(4, 4) ``T_parent_child`` at ``stamp_ns``; raise ExtrapolationException outside the data."""
        if self.static:
            return make_transform(quat_to_matrix(self.quaternions[0]), self.translations[0])
        where = f"when looking up transform from frame [{child}] to frame [{self.parent}]"
        oldest, newest = self.stamps[0], self.stamps[-1]
        if len(self.stamps) == 1 and stamp_ns != oldest:
            raise ExtrapolationException(
                f"Lookup would require extrapolation at time {format_stamp(stamp_ns)}, but only time "
                f"{format_stamp(oldest)} is in the buffer, {where}"
            )
        if stamp_ns > newest:
            raise ExtrapolationException(
                f"Lookup would require extrapolation into the future. Requested time "
                f"{format_stamp(stamp_ns)} but the latest data is at time {format_stamp(newest)} "
                f"(available {format_stamp(oldest)} .. {format_stamp(newest)}), {where}"
            )
        if stamp_ns < oldest:
            raise ExtrapolationException(
                f"Lookup would require extrapolation into the past. Requested time "
                f"{format_stamp(stamp_ns)} but the earliest data is at time {format_stamp(oldest)} "
                f"(available {format_stamp(oldest)} .. {format_stamp(newest)}), {where}"
            )
        i = bisect.bisect_left(self.stamps, stamp_ns)
        if self.stamps[i] == stamp_ns:
            return make_transform(quat_to_matrix(self.quaternions[i]), self.translations[i])
        t0, t1 = self.stamps[i - 1], self.stamps[i]
        ratio = (stamp_ns - t0) / (t1 - t0)
        trans = (1.0 - ratio) * self.translations[i - 1] + ratio * self.translations[i]
        quat = slerp(self.quaternions[i - 1], self.quaternions[i], ratio)
        return make_transform(quat_to_matrix(quat), trans)


class TfBuffer:
    """Thread-safe transform tree with tf2 lookup semantics; stamps are integer nanoseconds."""

    def __init__(self, cache_time_s: float = DEFAULT_CACHE_TIME_S):
        if not np.isfinite(cache_time_s) or cache_time_s <= 0:
            raise ValueError(f"cache_time_s must be a positive number of seconds, got {cache_time_s}")
        self.cache_time_ns = round(float(cache_time_s) * 1e9)
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._new_data = threading.Condition(self._lock)

    # ------------------------------------------------------------------ insertion
    def set_transform(
        self,
        parent_frame: str,
        child_frame: str,
        translation,
        quaternion_xyzw,
        stamp_ns: int,
        static: bool = False,
    ) -> bool:
        """Insert ``T_parent_child`` (translation (3,) metres, quaternion (4,) x, y, z, w).

        Returns True when stored, False when ignored as tf2 does: a dynamic sample whose stamp is
        already held, or older than the newest sample minus the cache time. Raises ValueError (and
        leaves the buffer unchanged) for empty or equal frame ids, a negative stamp, a non-finite
        translation, or a non-finite or non-unit quaternion.
        """
        for name, frame in (("parent_frame", parent_frame), ("child_frame", child_frame)):
            if not isinstance(frame, str) or not frame.strip():
                raise ValueError(f"{name} must be a non-empty string, got {frame!r}")
        if parent_frame == child_frame:
            raise ValueError(f"transform from frame {child_frame!r} to itself is not allowed")
        stamp_ns = int(stamp_ns)
        if stamp_ns < 0:
            raise ValueError(f"stamp_ns must be >= 0, got {stamp_ns}")
        label = f"transform {parent_frame!r} -> {child_frame!r}"
        t = np.asarray(translation, dtype=np.float64).reshape(-1)
        if t.shape != (3,) or not np.all(np.isfinite(t)):
            raise ValueError(f"{label} translation must be 3 finite numbers, got {t.tolist()}")
        q = validate_quaternion(quaternion_xyzw, f"{label} rotation")

        with self._lock:
            link = self._links.get(child_frame)
            if link is None or link.parent != parent_frame or link.static != static:
                link = _Link(parent=parent_frame, static=static)
                self._links[child_frame] = link
            if static:
                link.stamps, link.translations, link.quaternions = [0], [t], [q]
            else:
                if link.stamps and stamp_ns < link.stamps[-1] - self.cache_time_ns:
                    return False
                i = bisect.bisect_left(link.stamps, stamp_ns)
                if i < len(link.stamps) and link.stamps[i] == stamp_ns:
                    return False
                link.stamps.insert(i, stamp_ns)
                link.translations.insert(i, t)
                link.quaternions.insert(i, q)
                # Keep samples within cache time of the newest; the newest always survives.
                cut = bisect.bisect_left(link.stamps, link.stamps[-1] - self.cache_time_ns)
                if cut:
                    del link.stamps[:cut], link.translations[:cut], link.quaternions[:cut]
            self._new_data.notify_all()
        return True

    def set_matrix(self, parent_frame: str, child_frame: str, T_parent_child, stamp_ns: int,
                   static: bool = False) -> bool:
        """Insert a (4, 4) rigid ``T_parent_child``; see ``set_transform``."""
        T = validate_rigid(T_parent_child, f"T_{parent_frame}_{child_frame}")
        return self.set_transform(parent_frame, child_frame, T[:3, 3], matrix_to_quat(T[:3, :3]),
                                  stamp_ns, static)

    def clear(self) -> None:
        """Drop every transform (tf2 ``Buffer.clear``)."""
        with self._lock:
            self._links.clear()

    # ------------------------------------------------------------------ queries
    def frame_names(self) -> list[str]:
        """Every frame known as a parent or a child, sorted."""
        with self._lock:
            return sorted(self._known_frames())

    def parent_of(self, frame: str) -> str | None:
        """The parent of ``frame``, or None for a root or unknown frame."""
        with self._lock:
            link = self._links.get(frame)
            return None if link is None else link.parent

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int = 0) -> tuple[np.ndarray, int]:
        """``(T_target_source (4, 4) float64, resolved stamp_ns)``; stamp 0 = latest common time.

        The resolved stamp is the time the transform is valid at: ``stamp_ns`` itself, or for 0
        the latest common time of the dynamic links on the path (0 when all links are static).
        """
        with self._lock:
            return self._lookup_locked(target_frame, source_frame, int(stamp_ns))

    def lookup_matrix(self, target_frame: str, source_frame: str, stamp_ns: int = 0) -> np.ndarray:
        """(4, 4) float64 ``T_target_source``: maps points in ``source_frame`` into ``target_frame``."""
        return self.lookup(target_frame, source_frame, stamp_ns)[0]

    def can_transform(self, target_frame: str, source_frame: str, stamp_ns: int = 0,
                      timeout_s: float = 0.0) -> bool:
        """True when the lookup succeeds, waiting up to ``timeout_s`` seconds for data."""
        try:
            self.wait_for(target_frame, source_frame, stamp_ns, timeout_s)
        except TransformException:
            return False
        return True

    def wait_for_matrix(self, target_frame: str, source_frame: str, stamp_ns: int = 0,
                        timeout_s: float = 0.0) -> np.ndarray:
        """Like ``lookup_matrix`` but waits up to ``timeout_s`` seconds for the data to arrive.

        Raises the last lookup error when the timeout passes. The data must be inserted by another
        thread (a listener spinning its own executor), never by the thread that waits.
        """
        return self.wait_for(target_frame, source_frame, stamp_ns, timeout_s)[0]

    def wait_for(self, target_frame: str, source_frame: str, stamp_ns: int = 0,
                 timeout_s: float = 0.0) -> tuple[np.ndarray, int]:
        """``lookup`` that waits up to ``timeout_s`` seconds; returns (T_target_source, stamp_ns)."""
        if not np.isfinite(timeout_s) or timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s}")
        deadline = time.monotonic() + timeout_s
        with self._new_data:
            while True:
                try:
                    return self._lookup_locked(target_frame, source_frame, int(stamp_ns))
                except InvalidArgumentException:
                    raise
                except TransformException:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise
                    self._new_data.wait(remaining)

    # ------------------------------------------------------------------ internals (lock held)
    def _known_frames(self) -> set[str]:
        return set(self._links) | {link.parent for link in self._links.values()}

    def _chain_to_root(self, frame: str) -> list[str]:
        """[frame, parent, grandparent, ..., root]; TransformException on a loop."""
        chain = [frame]
        while chain[-1] in self._links:
            chain.append(self._links[chain[-1]].parent)
            if len(chain) > len(self._links) + 1:
                raise TransformException(f"transform loop detected above frame [{frame}]: {chain}")
        return chain

    def _lookup_locked(self, target: str, source: str, stamp_ns: int) -> tuple[np.ndarray, int]:
        for arg, frame in (("target_frame", target), ("source_frame", source)):
            if not isinstance(frame, str) or not frame:
                raise InvalidArgumentException(f"{arg} must be a non-empty frame id, got {frame!r}")
        if stamp_ns < 0:
            raise InvalidArgumentException(f"stamp_ns must be >= 0, got {stamp_ns}")
        if target == source:  # tf2 answers identity without consulting the tree
            link = self._links.get(target)
            if stamp_ns == 0 and link is not None and not link.static:
                stamp_ns = link.stamps[-1]
            return np.eye(4), stamp_ns
        known = self._known_frames()
        for arg, frame in (("target_frame", target), ("source_frame", source)):
            if frame not in known:
                raise LookupException(f'"{frame}" passed to lookupTransform argument {arg} does not exist.')
        up_source = self._chain_to_root(source)
        up_target = self._chain_to_root(target)
        on_target = set(up_target)
        ancestor = next((f for f in up_source if f in on_target), None)
        if ancestor is None:
            raise ConnectivityException(
                f'Could not find a connection between "{target}" and "{source}" because they are not '
                f"part of the same tree (roots [{up_target[-1]}] and [{up_source[-1]}]). "
                "Tf has two or more unconnected trees."
            )
        source_links = up_source[: up_source.index(ancestor)]
        target_links = up_target[: up_target.index(ancestor)]
        if stamp_ns == 0:
            newest = [self._links[c].stamps[-1] for c in source_links + target_links
                      if not self._links[c].static]
            stamp_ns = min(newest) if newest else 0
        T_anc_source = self._compose(source_links, stamp_ns)
        T_anc_target = self._compose(target_links, stamp_ns)
        R, t = T_anc_target[:3, :3], T_anc_target[:3, 3]
        T_target_anc = make_transform(R.T, -R.T @ t)
        return T_target_anc @ T_anc_source, stamp_ns

    def _compose(self, children: list[str], stamp_ns: int) -> np.ndarray:
        """``T_ancestor_first`` for the chain ``children[0] -> ... -> ancestor`` at ``stamp_ns``."""
        T = np.eye(4)
        for child in children:
            T = self._links[child].matrix_at(child, stamp_ns) @ T
        return T
