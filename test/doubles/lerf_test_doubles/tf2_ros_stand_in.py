"""A stand-in for the real ``tf2_ros`` Python module (Jazzy's tf2_ros_py), for machines without ROS.

Never part of the product. Tests put it in ``sys.modules["tf2_ros"]`` and load a fresh copy of
``lerf_ros.compat.tf``, which then takes its "real tf2_ros" branch. It exposes what lerf_ros uses:
``Buffer(cache_time, node)`` with ``set_transform``, ``set_transform_static``, ``lookup_transform``,
``can_transform``, ``clear``; ``TransformListener(buffer, node, *, spin_thread, qos, static_qos)``
with ``unregister``; the exception classes.

Its behaviour is tf2's, read from ros2/geometry2 (jazzy: tf2/src/buffer_core.cpp, tf2/src/cache.cpp,
tf2_ros_py/tf2_ros/buffer.py and transform_listener.py) and written independently of
``lerf_ros.compat.tf_buffer``, so that the substitute can be checked against it:
- a sample is (stamp, parent, translation, rotation) per child frame; a child is either static (one
  sample, replaced) or dynamic (a history pruned to the cache time; a sample older than the newest
  minus the cache time is ignored, TF_OLD_DATA); switching kind starts the child over;
- a walk at time t follows, per frame, the parent of the sample at or before t (the newest for t = 0);
  bracketing samples with different parents are not interpolated, the older one is used;
- one leading '/' is stripped on insert; a lookup of an empty frame id or one starting with '/'
  raises InvalidArgumentException; target == source is the identity before any check;
- ``clear`` empties dynamic histories, keeps static samples and frame names;
- ``Buffer(node=...)`` clears itself when the node's clock jumps back by more than 1 s or changes
  between system and ROS time (tf2_ros's ``time_jump_callback``).
"""

from __future__ import annotations

import math
import threading
import time as _time
from dataclasses import dataclass

import numpy as np

_S = 1_000_000_000


class TransformException(Exception):
    pass


class LookupException(TransformException):
    pass


class ConnectivityException(TransformException):
    pass


class ExtrapolationException(TransformException):
    pass


class InvalidArgumentException(TransformException):
    pass


class TimeoutException(TransformException):
    pass


def _to_ns(value) -> int:
    if value is None:
        return 0
    if hasattr(value, "nanoseconds"):
        return int(value.nanoseconds)
    return int(value.sec) * _S + int(value.nanosec)


def _rotation(q) -> np.ndarray:
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _slerp(a, b, ratio: float) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    cos = float(a @ b)
    if cos < 0:
        b, cos = -b, -cos
    if cos > 0.99999:
        q = a + ratio * (b - a)
    else:
        angle = math.acos(min(cos, 1.0))
        q = (math.sin((1 - ratio) * angle) * a + math.sin(ratio * angle) * b) / math.sin(angle)
    return q / np.linalg.norm(q)


def _matrix(translation, q) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = _rotation(q)
    T[:3, 3] = translation
    return T


@dataclass
class _Sample:
    stamp: int
    parent: str
    translation: np.ndarray
    rotation: np.ndarray  # x, y, z, w


class _NoParent(Exception):
    """A frame whose cache cannot answer at the time: the walk stops there (tf2's parent == 0)."""

    def __init__(self, error: ExtrapolationException):
        super().__init__(str(error))
        self.error = error


class Buffer:
    def __init__(self, cache_time=None, node=None) -> None:
        import rclpy.clock
        from rclpy.duration import Duration

        self._cache_ns = _to_ns(cache_time) if cache_time is not None else 10 * _S
        self._static: dict[str, _Sample] = {}
        self._dynamic: dict[str, list[_Sample]] = {}  # ascending stamps
        self._frames: set[str] = set()
        self._cond = threading.Condition()
        self.clock = node.get_clock() if node is not None else rclpy.clock.Clock()
        threshold = rclpy.clock.JumpThreshold(min_forward=None, min_backward=Duration(seconds=-1),
                                              on_clock_change=True)
        self.jump_handle = self.clock.create_jump_callback(threshold, post_callback=self.time_jump_callback)
        self.jumps = 0

    def time_jump_callback(self, time_jump) -> None:
        self.jumps += 1
        self.clear()

    # -------------------------------------------------------------- insert
    def set_transform(self, transform, authority: str) -> None:
        self._set(transform, static=False)

    def set_transform_static(self, transform, authority: str) -> None:
        self._set(transform, static=True)

    def _set(self, transform, static: bool) -> bool:
        parent = transform.header.frame_id
        child = transform.child_frame_id
        parent, child = parent[1:] if parent.startswith("/") else parent, child[1:] if child.startswith("/") \
            else child
        tr, r = transform.transform.translation, transform.transform.rotation
        translation = np.array([tr.x, tr.y, tr.z], float)
        rotation = np.array([r.x, r.y, r.z, r.w], float)
        if not parent or not child or parent == child or not np.all(np.isfinite(translation)) \
                or not np.all(np.isfinite(rotation)) or abs(float(rotation @ rotation) - 1.0) >= 10e-3:
            return False  # tf2 logs TF_SELF_TRANSFORM / TF_NO_FRAME_ID / TF_NAN_INPUT / TF_DENORMALIZED_...
        rotation = rotation / np.linalg.norm(rotation)
        sample = _Sample(_to_ns(transform.header.stamp), parent, translation, rotation)
        with self._cond:
            if static:
                self._dynamic.pop(child, None)
                self._static[child] = sample
            else:
                self._static.pop(child, None)
                history = self._dynamic.setdefault(child, [])
                if history and sample.stamp < history[-1].stamp - self._cache_ns:
                    return False  # TF_OLD_DATA
                if any(s.stamp == sample.stamp for s in history):
                    return False
                history.append(sample)
                history.sort(key=lambda s: s.stamp)
                newest = history[-1].stamp
                history[:] = [s for s in history if s.stamp + self._cache_ns >= newest]
            self._frames.update((parent, child))
            self._cond.notify_all()
        return True

    def clear(self) -> None:
        with self._cond:
            for history in self._dynamic.values():
                history.clear()

    # -------------------------------------------------------------- lookups
    def _bracket(self, frame: str, t: int) -> tuple[_Sample, _Sample]:
        if frame in self._static:
            s = self._static[frame]
            return s, s
        history = self._dynamic[frame]
        where = f"when looking up transform from frame [{frame}]"
        if not history:
            raise _NoParent(ExtrapolationException(f"no data for frame [{frame}], {where}"))
        if t == 0:
            return history[-1], history[-1]
        if len(history) == 1:
            if history[0].stamp == t:
                return history[0], history[0]
            raise _NoParent(ExtrapolationException(
                f"Lookup would require extrapolation at time {t}, but only time {history[0].stamp} is in "
                f"the buffer, {where}"))
        if t > history[-1].stamp:
            raise _NoParent(ExtrapolationException(
                f"Lookup would require extrapolation into the future. Requested time {t} but the latest "
                f"data is at time {history[-1].stamp}, {where}"))
        if t < history[0].stamp:
            raise _NoParent(ExtrapolationException(
                f"Lookup would require extrapolation into the past. Requested time {t} but the earliest "
                f"data is at time {history[0].stamp}, {where}"))
        older = max((s for s in history if s.stamp <= t), key=lambda s: s.stamp)
        newer = min((s for s in history if s.stamp >= t), key=lambda s: s.stamp)
        return older, newer

    def _link(self, frame: str, t: int) -> tuple[str, np.ndarray] | None:
        """(parent, T_parent_frame) at t; None at a root; _NoParent when the cache cannot answer."""
        if frame not in self._static and frame not in self._dynamic:
            return None
        older, newer = self._bracket(frame, t)
        if older is newer or older.parent != newer.parent:
            return older.parent, _matrix(older.translation, older.rotation)
        ratio = (t - older.stamp) / (newer.stamp - older.stamp)
        translation = older.translation + ratio * (newer.translation - older.translation)
        return older.parent, _matrix(translation, _slerp(older.rotation, newer.rotation, ratio))

    def _up(self, frame: str, t: int) -> tuple[dict, list[str], ExtrapolationException | None]:
        """{ancestor: T_ancestor_frame} for frame and its ancestors at t, their order, and why it stopped."""
        found, order, T = {frame: np.eye(4)}, [frame], np.eye(4)
        while True:
            try:
                link = self._link(order[-1], t)
            except _NoParent as stop:
                return found, order, stop.error
            if link is None:
                return found, order, None
            parent, T_parent_cur = link
            if parent in found:
                raise LookupException(f"the tf tree is invalid because it contains a loop at [{parent}]")
            T = T_parent_cur @ T
            found[parent] = T
            order.append(parent)

    def _latest_common_time(self, target: str, source: str) -> int:
        def newest(frame):
            stamps, order = {}, [frame]
            while True:
                if order[-1] in self._static:
                    stamps[order[-1]], parent = 0, self._static[order[-1]].parent
                elif self._dynamic.get(order[-1]):
                    stamps[order[-1]], parent = self._dynamic[order[-1]][-1].stamp, \
                        self._dynamic[order[-1]][-1].parent
                else:
                    return stamps, order
                if parent in order:  # a loop: the walk at that time reports it
                    return stamps, order
                order.append(parent)

        source_stamps, source_order = newest(source)
        target_stamps, target_order = newest(target)
        common = next((f for f in source_order if f in target_order), None)
        if common is None:
            return 0  # the walk at time 0 reports why
        below = source_order[: source_order.index(common)] + target_order[: target_order.index(common)]
        times = [source_stamps.get(f, target_stamps.get(f, 0)) for f in below]
        times = [s for s in times if s > 0]
        return min(times) if times else 0

    def _check(self, arg: str, frame: str) -> None:
        if not frame:
            raise InvalidArgumentException(
                f'Invalid argument "{frame}" passed to {arg} - in tf2 frame_ids cannot be empty')
        if frame.startswith("/"):
            raise InvalidArgumentException(
                f"Invalid argument \"{frame}\" passed to {arg} - in tf2 frame_ids cannot start with a '/'")
        if frame not in self._frames:
            raise LookupException(f'"{frame}" passed to {arg} does not exist. ')

    def _lookup_core(self, target: str, source: str, t: int) -> tuple[np.ndarray, int]:
        with self._cond:
            if target == source:
                history = self._dynamic.get(target)
                return np.eye(4), (history[-1].stamp if t == 0 and history else t)
            self._check("lookupTransform argument target_frame", target)
            self._check("lookupTransform argument source_frame", source)
            if t == 0:
                t = self._latest_common_time(target, source)
            from_source, _, source_stop = self._up(source, t)
            from_target, target_order, target_stop = self._up(target, t)
            common = next((f for f in target_order if f in from_source), None)
            if common is None:
                stop = source_stop or target_stop
                if stop is not None:
                    raise stop
                raise ConnectivityException(
                    f'Could not find a connection between "{target}" and "{source}" because they are not '
                    "part of the same tree. Tf has two or more unconnected trees.")
            return np.linalg.inv(from_target[common]) @ from_source[common], t

    def _wait(self, target, source, time, timeout):
        deadline = _time.monotonic() + _to_ns(timeout) / 1e9
        while True:
            try:
                return self._lookup_core(target, source, _to_ns(time))
            except InvalidArgumentException:
                raise
            except TransformException:
                remaining = deadline - _time.monotonic()
                if remaining <= 0:
                    raise
                with self._cond:
                    self._cond.wait(min(remaining, 0.05))

    def lookup_transform(self, target_frame: str, source_frame: str, time, timeout=None):
        from geometry_msgs.msg import TransformStamped

        T, t = self._wait(target_frame, source_frame, time, timeout)
        msg = TransformStamped()
        msg.header.frame_id, msg.child_frame_id = target_frame, source_frame
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, _S)
        tr = msg.transform.translation
        tr.x, tr.y, tr.z = (float(v) for v in T[:3, 3])
        q = _quaternion(T[:3, :3])
        r = msg.transform.rotation
        r.x, r.y, r.z, r.w = (float(v) for v in q)
        return msg

    def can_transform(self, target_frame: str, source_frame: str, time, timeout=None,
                      return_debug_tuple: bool = False):
        try:
            self._wait(target_frame, source_frame, time, timeout)
        except TransformException as exc:
            return (False, str(exc)) if return_debug_tuple else False
        return (True, "") if return_debug_tuple else True


def _quaternion(R) -> np.ndarray:
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    q = np.array([x, y, z, w])
    return q / np.linalg.norm(q)


class TransformListener:
    """tf2_ros's listener: absolute /tf and /tf_static, depth 100, static transient local."""

    def __init__(self, buffer, node, *, spin_thread: bool = False, qos=None, static_qos=None) -> None:
        from rclpy.callback_groups import ReentrantCallbackGroup
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile
        from tf2_msgs.msg import TFMessage

        qos = qos or QoSProfile(depth=100, durability=DurabilityPolicy.VOLATILE,
                                history=HistoryPolicy.KEEP_LAST)
        static_qos = static_qos or QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                              history=HistoryPolicy.KEEP_LAST)
        self.buffer, self.node = buffer, node
        self.group = ReentrantCallbackGroup()
        self.tf_sub = node.create_subscription(TFMessage, "/tf", self.callback, qos,
                                               callback_group=self.group)
        self.tf_static_sub = node.create_subscription(TFMessage, "/tf_static", self.static_callback,
                                                      static_qos, callback_group=self.group)
        if spin_thread:
            from rclpy.executors import SingleThreadedExecutor

            self.executor = SingleThreadedExecutor()

            def run():
                self.executor.add_node(self.node)
                self.executor.spin()
                self.executor.remove_node(self.node)

            self.dedicated_listener_thread = threading.Thread(target=run)
            self.dedicated_listener_thread.start()

    def unregister(self) -> None:
        self.node.destroy_subscription(self.tf_sub)
        self.node.destroy_subscription(self.tf_static_sub)

    def callback(self, data) -> None:
        for transform in data.transforms:
            self.buffer.set_transform(transform, "default_authority")

    def static_callback(self, data) -> None:
        for transform in data.transforms:
            self.buffer.set_transform_static(transform, "default_authority")
