"""A ROS-free TF buffer with tf2's semantics (numpy only, no rclpy).

Each child frame holds either one static sample (valid at all times) or a time-sorted dynamic history
bounded by the cache time. A sample stores ``T_parent_child`` (it maps points in the child frame into
the parent frame, exactly as a ``geometry_msgs/TransformStamped`` with ``header.frame_id = parent``,
``child_frame_id = child``) and the name of its parent.

``lookup_matrix(target, source, stamp_ns)`` returns ``T_target_source`` (maps points in ``source``
into ``target``), like tf2's ``lookup_transform(target, source, time)``. It chains links through the
common ancestor of the two frames; dynamic links are interpolated between the two bracketing stamps
(lerp translation, slerp rotation). ``stamp_ns == 0`` asks for the latest time at which every link
on the path has data. Errors mirror tf2: ``LookupException`` (unknown frame),
``ConnectivityException`` (no common ancestor), ``ExtrapolationException`` (stamp outside the data
of a dynamic link), ``InvalidArgumentException`` (an empty frame id, or one starting with '/'), all
subclasses of ``TransformException``.

What tf2's BufferCore does (geometry2, jazzy) and this buffer does too:
- frame ids: insertion strips one leading '/' (tf2's ``stripSlash``); a lookup with a frame id that is
  empty or starts with '/' raises ``InvalidArgumentException`` ("in tf2 frame_ids cannot start with a
  '/'"). ``target == source`` is the identity without consulting the tree. Frame names are never
  forgotten (``clear`` keeps them).
- a child with more than one parent: the parent is stored per sample, and a lookup at time t follows
  the parent of the sample at or before t (the newest sample's for t = 0); two bracketing samples with
  different parents are not interpolated (the older one is used). Every change of parent is counted
  (``counters()["parent_changes"]``) and reported once per change (``take_notices()``): two nodes
  publishing one child frame is almost always a mistake in the robot's TF tree.
- a child switching between static and dynamic starts over (tf2 reallocates its cache).
- a dynamic sample older than the newest one minus the cache time is ignored (tf2's TF_OLD_DATA,
  counted as ``old_data``); so is a repeated stamp.
- ``clear()`` empties the dynamic histories and keeps the static transforms (a static publisher sends
  once, with transient-local durability, so a cleared static transform would never come back).

Beyond tf2 (``jump_back_tolerance_s``, off by default so that offline readers of whole bags behave as
tf2): a dynamic sample older than its link's newest sample by more than the tolerance means time
jumped back (a bag played in a loop, a simulator reset); the buffer is cleared first, counted as
``jumps_back`` and reported. Per link, because links from different publishers legitimately lag each
other; a stamp of 0 (never set) is not a jump. tf2_ros clears only when the node's clock jumps back
(``TfBufferSubstitute`` does that as well); with wall-clock stamps it would ignore the replayed data as
old for a whole cache time. A transform loop is reported at lookup as ``TransformException``; the sample
that forms it (a new parent that makes its child frame its own ancestor along the newest parents) is stored
as tf2 stores it, and counted as ``loops`` and reported when it arrives.

Thread-safe: one lock guards the tree; a condition variable wakes ``wait_for_matrix`` callers when
new data arrives, so a lookup can wait for a transform that a listener thread is about to insert.
"""

from __future__ import annotations

import bisect
import collections
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
#: Counters of ``TfBuffer.counters()``: changes of a child's parent, clears after a jump back in time,
#: dynamic samples ignored as older than the cache (tf2's TF_OLD_DATA), loops formed (a sample whose new
#: parent made its child frame its own ancestor).
COUNTERS = ("parent_changes", "jumps_back", "old_data", "loops")
#: Notices kept for ``take_notices`` when nobody drains them (oldest dropped).
MAX_NOTICES = 64


class TransformException(Exception):
    """Base of every lookup error (tf2: ``tf2.TransformException``)."""


class LookupException(TransformException):
    """A frame named in the lookup is not in the buffer."""


class ConnectivityException(TransformException):
    """The two frames are in disconnected trees."""


class ExtrapolationException(TransformException):
    """The requested stamp lies outside the data held for a dynamic link on the path."""


class InvalidArgumentException(TransformException):
    """A frame id argument is empty, not a string, or starts with '/'."""


def format_stamp(stamp_ns: int) -> str:
    """Integer nanoseconds -> ``"12.500000000 s"`` for error messages."""
    return f"{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d} s"


def strip_slash(frame: str) -> str:
    """One leading '/' removed, as tf2 does on insertion (``"/map"`` -> ``"map"``)."""
    return frame[1:] if isinstance(frame, str) and frame.startswith("/") else frame


@dataclass
class _Link:
    """One child frame's samples: ``T_parent_child`` and the parent, one static or a time-sorted history."""

    static: bool
    stamps: list[int] = field(default_factory=list)  # ascending; [0] when static; [] after clear()
    parents: list[str] = field(default_factory=list)
    translations: list[np.ndarray] = field(default_factory=list)  # (3,) float64, metres
    quaternions: list[np.ndarray] = field(default_factory=list)  # (4,) float64 x, y, z, w, unit

    def newest_parent(self) -> str | None:
        return self.parents[-1] if self.parents else None

    def clear(self) -> None:
        self.stamps, self.parents, self.translations, self.quaternions = [], [], [], []

    def _bracket(self, child: str, stamp_ns: int) -> tuple[int, int]:
        """(older, newer) sample indices around ``stamp_ns``, equal when one sample answers; 0 = newest.

        Raises ExtrapolationException (tf2's messages) when the stamp is outside the data.
        """
        if self.static:
            return 0, 0
        if not self.stamps:
            raise ExtrapolationException(
                f"Lookup would require extrapolation: no data for frame [{child}] (none received yet, "
                "or the buffer was cleared)"
            )
        last = len(self.stamps) - 1
        if stamp_ns == 0:
            return last, last
        where = f"when looking up transform from frame [{child}] to frame [{self.parents[-1]}]"
        oldest, newest = self.stamps[0], self.stamps[-1]
        if last == 0 and stamp_ns != oldest:
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
        return (i, i) if self.stamps[i] == stamp_ns else (i - 1, i)

    def parent_at(self, child: str, stamp_ns: int) -> str:
        """The parent of the sample at or before ``stamp_ns`` (the newest for 0)."""
        return self.parents[self._bracket(child, stamp_ns)[0]]

    def matrix_at(self, child: str, stamp_ns: int) -> np.ndarray:
        """(4, 4) ``T_parent_child`` at ``stamp_ns``; raise ExtrapolationException outside the data."""
        a, b = self._bracket(child, stamp_ns)
        if a == b or self.parents[a] != self.parents[b]:  # tf2 never interpolates across a parent change
            return make_transform(quat_to_matrix(self.quaternions[a]), self.translations[a])
        ratio = (stamp_ns - self.stamps[a]) / (self.stamps[b] - self.stamps[a])
        trans = (1.0 - ratio) * self.translations[a] + ratio * self.translations[b]
        quat = slerp(self.quaternions[a], self.quaternions[b], ratio)
        return make_transform(quat_to_matrix(quat), trans)


class TfBuffer:
    """Thread-safe transform tree with tf2 semantics (module docstring); stamps are integer nanoseconds.

    cache_time_s:          how long dynamic history is kept behind each link's newest sample, s.
    jump_back_tolerance_s: None = tf2's behaviour; else a dynamic sample more than this many seconds
                           older than its link's newest sample clears the buffer first (time jumped back).
    """

    def __init__(self, cache_time_s: float = DEFAULT_CACHE_TIME_S,
                 jump_back_tolerance_s: float | None = None):
        if not np.isfinite(cache_time_s) or cache_time_s <= 0:
            raise ValueError(f"cache_time_s must be a positive number of seconds, got {cache_time_s}")
        tol = jump_back_tolerance_s
        if tol is not None and not (np.isfinite(tol) and tol >= 0):
            raise ValueError(f"jump_back_tolerance_s must be None or >= 0 seconds, got {tol}")
        self.cache_time_ns = round(float(cache_time_s) * 1e9)
        self.jump_back_tolerance_ns = (None if jump_back_tolerance_s is None
                                       else round(float(jump_back_tolerance_s) * 1e9))
        self._links: dict[str, _Link] = {}
        self._frames: set[str] = set()  # every frame id ever inserted (tf2 never forgets one)
        self._parents_seen: dict[str, set[str]] = {}
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._jump_to_ns = 0  # the stamp of the sample that last showed time jumping back
        self._notices: collections.deque[tuple[str, str]] = collections.deque(maxlen=MAX_NOTICES)
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

        One leading '/' of either frame id is stripped, as tf2 does. Returns True when stored, False
        when ignored as tf2 does: a dynamic sample whose stamp is already held, or older than the
        newest sample minus the cache time. Raises ValueError (and leaves the buffer unchanged) for
        empty or equal frame ids, a negative stamp, a non-finite translation, or a non-finite or
        non-unit quaternion.
        """
        parent_frame, child_frame = strip_slash(parent_frame), strip_slash(child_frame)
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
            previous = None if link is None else link.newest_parent()
            if link is None or link.static != static:
                link = _Link(static=static)
                self._links[child_frame] = link
            if static:
                link.stamps, link.parents, link.translations, link.quaternions = [0], [parent_frame], [t], [q]
            elif not self._insert_dynamic_locked(link, parent_frame, child_frame, t, q, stamp_ns):
                return False
            self._frames.update((parent_frame, child_frame))
            # Checked when the child's newest parent changes (a new link included): that is when a loop forms;
            # later samples along it are not new loops.
            loop = self._loop_locked(child_frame) if link.newest_parent() != previous else []
            if loop:
                self._counters["loops"] += 1
                self._notices.append(("loop", (
                    f"transform [{parent_frame}] -> [{child_frame}] at {format_stamp(stamp_ns)} closes a "
                    f"loop ({' -> '.join(loop)}): lookups through it fail until a sample with another parent "
                    "replaces it (dynamic: at later stamps; static: never, until it is re-sent)")))
            seen = self._parents_seen.setdefault(child_frame, set())
            seen.add(parent_frame)
            if previous is not None and previous != parent_frame:
                self._counters["parent_changes"] += 1
                self._notices.append(("parent_change", (
                    f"frame [{child_frame}] has more than one parent ({', '.join(sorted(seen))}): it was "
                    f"[{previous}], now [{parent_frame}] at {format_stamp(stamp_ns)}. As in tf2, a lookup "
                    f"follows the parent of the sample at or before its time; check that only one node "
                    f"publishes [{child_frame}]")))
            self._new_data.notify_all()
        return True

    def _insert_dynamic_locked(self, link: _Link, parent: str, child: str, t, q, stamp_ns: int) -> bool:
        if link.stamps:
            newest = link.stamps[-1]
            tolerance = self.jump_back_tolerance_ns
            # Stamp 0 means "no time" (a publisher that never sets it), not a jump: tf2 ignores it as old.
            if tolerance is not None and 0 < stamp_ns < newest - tolerance:
                self._clear_locked()
                self._counters["jumps_back"] += 1
                self._jump_to_ns = stamp_ns
                self._notices.append(("jump_back", (
                    f"stamps jumped back on [{parent}] -> [{child}]: a sample at {format_stamp(stamp_ns)} "
                    f"after one at {format_stamp(newest)} (more than {tolerance / 1e9:g} s back: a bag "
                    "loop or a simulator reset?); cleared the dynamic transforms, static ones kept")))
            elif stamp_ns < newest - self.cache_time_ns:
                self._counters["old_data"] += 1
                return False
        i = bisect.bisect_left(link.stamps, stamp_ns)
        if i < len(link.stamps) and link.stamps[i] == stamp_ns:
            return False
        link.stamps.insert(i, stamp_ns)
        link.parents.insert(i, parent)
        link.translations.insert(i, t)
        link.quaternions.insert(i, q)
        # Keep samples within cache time of the newest; the newest always survives.
        cut = bisect.bisect_left(link.stamps, link.stamps[-1] - self.cache_time_ns)
        if cut:
            del link.stamps[:cut], link.parents[:cut], link.translations[:cut], link.quaternions[:cut]
        return True

    def _loop_locked(self, child: str) -> list[str]:
        """The frames from ``child`` up its newest parents back to ``child`` when they loop, else []."""
        chain, frame = [child], child
        while (link := self._links.get(frame)) is not None and (parent := link.newest_parent()) is not None:
            chain.append(parent)
            if parent == child:
                return chain
            if len(chain) > len(self._links) + 1:  # a loop above child, not through it (counted already)
                return []
            frame = parent
        return []

    def set_matrix(self, parent_frame: str, child_frame: str, T_parent_child, stamp_ns: int,
                   static: bool = False) -> bool:
        """Insert a (4, 4) rigid ``T_parent_child``; see ``set_transform``."""
        T = validate_rigid(T_parent_child, f"T_{parent_frame}_{child_frame}")
        return self.set_transform(parent_frame, child_frame, T[:3, 3], matrix_to_quat(T[:3, :3]),
                                  stamp_ns, static)

    def clear(self) -> None:
        """Drop the dynamic transforms, keep the static ones and every frame name (tf2 ``Buffer.clear``)."""
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        for link in self._links.values():
            if not link.static:
                link.clear()

    # ------------------------------------------------------------------ reports
    def counters(self) -> dict[str, int]:
        """Copies of the ``COUNTERS``: parent_changes, jumps_back, old_data."""
        with self._lock:
            return dict(self._counters)

    def last_jump_to_ns(self) -> int:
        """The stamp time last jumped back to (the sample that showed it), ns; 0 before any jump."""
        with self._lock:
            return self._jump_to_ns

    def take_notices(self) -> list[tuple[str, str]]:
        """``(kind, message)`` of each parent change, jump back and loop since the last call (then
        forgotten); kinds "parent_change", "jump_back", "loop"."""
        with self._lock:
            out = list(self._notices)
            self._notices.clear()
            return out

    def several_parents(self) -> dict[str, list[str]]:
        """Child frames that have had more than one parent -> those parents, sorted."""
        with self._lock:
            return {c: sorted(p) for c, p in self._parents_seen.items() if len(p) > 1}

    # ------------------------------------------------------------------ queries
    def frame_names(self) -> list[str]:
        """Every frame ever inserted as a parent or a child, sorted."""
        with self._lock:
            return sorted(self._frames)

    def parent_of(self, frame: str) -> str | None:
        """The parent in ``frame``'s newest sample, or None for a root, an unknown or a cleared frame."""
        with self._lock:
            link = self._links.get(frame)
            return None if link is None else link.newest_parent()

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
    def _check_frame(self, arg: str, frame) -> None:
        """tf2's ``validateFrameId``: InvalidArgumentException, or LookupException for an unknown frame."""
        if not isinstance(frame, str) or not frame:
            raise InvalidArgumentException(
                f'Invalid argument "{frame}" passed to lookupTransform argument {arg} - in tf2 frame_ids '
                "cannot be empty")
        if frame.startswith("/"):
            raise InvalidArgumentException(
                f'Invalid argument "{frame}" passed to lookupTransform argument {arg} - in tf2 frame_ids '
                "cannot start with a '/'")
        if frame not in self._frames:
            raise LookupException(f'"{frame}" passed to lookupTransform argument {arg} does not exist.')

    def _walk(self, frame: str, stamp_ns: int) -> tuple[list[str], ExtrapolationException | None]:
        """([frame, parent, ..., top], error) following each link's parent at ``stamp_ns``.

        The walk stops at a root, or at a link with no data at that stamp (its error is returned: it
        matters only if the frames then turn out not to connect). TransformException on a loop.
        """
        chain = [frame]
        while (link := self._links.get(chain[-1])) is not None:
            try:
                parent = link.parent_at(chain[-1], stamp_ns)
            except ExtrapolationException as exc:
                return chain, exc
            chain.append(parent)
            if len(chain) > len(self._links) + 1:
                raise TransformException(f"transform loop detected above frame [{frame}]: {chain}")
        return chain, None

    def _paths(self, target: str, source: str, stamp_ns: int) -> tuple[list[str], list[str]]:
        """The child frames from source and from target up to (not including) their common ancestor."""
        up_source, blocked_source = self._walk(source, stamp_ns)
        up_target, blocked_target = self._walk(target, stamp_ns)
        on_target = set(up_target)
        ancestor = next((f for f in up_source if f in on_target), None)
        if ancestor is None:
            blocked = blocked_source or blocked_target
            if blocked is not None:  # as tf2: a link without data on the way is the likelier cause
                raise blocked
            raise ConnectivityException(
                f'Could not find a connection between "{target}" and "{source}" because they are not '
                f"part of the same tree (roots [{up_target[-1]}] and [{up_source[-1]}]). "
                "Tf has two or more unconnected trees."
            )
        return up_source[: up_source.index(ancestor)], up_target[: up_target.index(ancestor)]

    def _lookup_locked(self, target: str, source: str, stamp_ns: int) -> tuple[np.ndarray, int]:
        if stamp_ns < 0:
            raise InvalidArgumentException(f"stamp_ns must be >= 0, got {stamp_ns}")
        if isinstance(target, str) and target == source:  # tf2 answers identity before validating
            link = self._links.get(target)
            if stamp_ns == 0 and link is not None and not link.static and link.stamps:
                stamp_ns = link.stamps[-1]
            return np.eye(4), stamp_ns
        self._check_frame("target_frame", target)
        self._check_frame("source_frame", source)
        if stamp_ns == 0:
            # tf2's latest common time: along the newest parents, the oldest of the newest stamps.
            source_links, target_links = self._paths(target, source, 0)
            newest = [self._links[c].stamps[-1] for c in source_links + target_links
                      if not self._links[c].static]
            stamp_ns = min(newest) if newest else 0
        source_links, target_links = self._paths(target, source, stamp_ns)
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
