"""TF for the nodes: the real ``tf2_ros`` when importable; else, only on a machine without ROS,
``TfBuffer`` + an rclpy listener (on a ROS 2 install a missing tf2_ros stops start-up, see
``ros_install``).

``make_tf_buffer(node)`` returns ``(buffer, listener, is_real)``; both buffers answer the tf2_ros
API subset the package uses (``lookup_transform``, ``can_transform``, ``set_transform``,
``set_transform_static``, ``clear``), and ``lookup_matrix(buffer, ...)`` gives a (4, 4)
``T_target_source`` for either. The substitute behaves as tf2 does where it matters to a robot
(``tf_buffer``'s docstring lists it): absolute ``/tf`` and ``/tf_static``, frame ids with a leading
'/' rejected at lookup, a child frame with two parents followed per sample and reported, the
dynamic transforms cleared when the clock or the stamps jump back. The exception names exported here
are tf2_ros's own classes when tf2_ros is present (the substitute re-raises as them), so
``except TF_ERRORS`` works the same on both paths.

Threading: a lookup with a timeout blocks its thread until a listener callback inserts the data.
If that callback needs the same executor thread, the wait can never end (a deadlock until the
timeout). Either spin the listener in its own thread (``spin_thread=True``: a dedicated node and
SingleThreadedExecutor, like tf2_ros's ``spin_thread``), or use a ``MultiThreadedExecutor``; the
listener's subscriptions sit in their own ``ReentrantCallbackGroup`` so they can run beside the
waiting callback.

rclpy, geometry_msgs and tf2_msgs are imported inside functions, so importing this module (and
``lerf_ros.compat``) works without ROS.
"""

from __future__ import annotations

import math
import threading
import time
from typing import NamedTuple

import numpy as np

from lerf_ros.compat import tf_buffer as _core
from lerf_ros.core.frames.transforms import matrix_to_quat, transform_from_quat, validate_rigid

try:
    import tf2_ros as _tf2_ros
except ImportError as _exc:  # the substitute below may serve instead: see make_tf_buffer / ros_install
    _tf2_ros = None
    TF2_ROS_IMPORT_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    TF2_ROS_IMPORT_ERROR = None

#: True when the real tf2_ros imported; ``make_tf_buffer`` then returns its Buffer + listener.
HAVE_TF2_ROS = _tf2_ros is not None
#: A dynamic sample this much older than its link's newest one means time jumped back (bag loop,
#: simulator reset): the substitute clears its buffer. Same size as tf2_ros's clock-jump threshold.
JUMP_BACK_TOLERANCE_S = 1.0

if _tf2_ros is not None:
    TransformException = _tf2_ros.TransformException
    LookupException = _tf2_ros.LookupException
    ConnectivityException = _tf2_ros.ConnectivityException
    ExtrapolationException = _tf2_ros.ExtrapolationException
    InvalidArgumentException = _tf2_ros.InvalidArgumentException
else:
    TransformException = _core.TransformException
    LookupException = _core.LookupException
    ConnectivityException = _core.ConnectivityException
    ExtrapolationException = _core.ExtrapolationException
    InvalidArgumentException = _core.InvalidArgumentException

#: Seconds between two warnings of one kind (parent change, jump back) from the listener.
_NOTICE_THROTTLE_S = 5.0

#: The lookup failures a node should log and survive.
TF_ERRORS = (LookupException, ConnectivityException, ExtrapolationException)

# Substitute errors -> the exported classes (identity when tf2_ros is absent).
_EXPORTED = (
    (_core.LookupException, LookupException),
    (_core.ConnectivityException, ConnectivityException),
    (_core.ExtrapolationException, ExtrapolationException),
    (_core.InvalidArgumentException, InvalidArgumentException),
    (_core.TransformException, TransformException),
)


def _exported_error(exc: _core.TransformException) -> Exception:
    for core_cls, exported in _EXPORTED:
        if isinstance(exc, core_cls):
            return exc if exported is core_cls else exported(str(exc))
    return exc


# ---------------------------------------------------------------------- conversions
def stamp_to_ns(stamp) -> int:
    """rclpy Time / Duration, builtin_interfaces Time / Duration msg, int ns, or None (0) -> int ns."""
    if stamp is None:
        return 0
    if isinstance(stamp, (int, np.integer)):
        return int(stamp)
    if hasattr(stamp, "nanoseconds"):
        return int(stamp.nanoseconds)
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    raise ValueError(f"cannot read a time from {stamp!r}; expected rclpy Time, a Time msg or int ns")


def ns_to_time_msg(stamp_ns: int):
    """int ns -> builtin_interfaces/Time."""
    from builtin_interfaces.msg import Time

    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def transform_to_matrix(msg) -> np.ndarray:
    """geometry_msgs TransformStamped or Transform -> (4, 4) float64 ``T_parent_child``.

    Attribute access only (rclpy or rosbags messages). ValueError for a non-finite translation or
    a non-finite / non-unit quaternion.
    """
    tf = getattr(msg, "transform", msg)
    name = "transform"
    if hasattr(msg, "child_frame_id"):
        name = f"transform {msg.header.frame_id!r} -> {msg.child_frame_id!r}"
    t, r = tf.translation, tf.rotation
    return transform_from_quat((t.x, t.y, t.z), (r.x, r.y, r.z, r.w), name)


def matrix_to_transform_msg(T_parent_child, frame_id: str, child_frame_id: str, stamp_ns: int = 0):
    """(4, 4) rigid ``T_parent_child`` -> geometry_msgs/TransformStamped (frame_id = parent)."""
    from geometry_msgs.msg import TransformStamped

    T = validate_rigid(T_parent_child, f"T_{frame_id}_{child_frame_id}")
    q = matrix_to_quat(T[:3, :3])
    msg = TransformStamped()
    msg.header.frame_id = frame_id
    msg.header.stamp = ns_to_time_msg(stamp_ns)
    msg.child_frame_id = child_frame_id
    msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = (
        float(v) for v in T[:3, 3]
    )
    r = msg.transform.rotation
    r.x, r.y, r.z, r.w = (float(v) for v in q)
    return msg


# ---------------------------------------------------------------------- clock jumps
class ClockJumps:
    """Counts the node clock's jumps back, with the threshold tf2_ros's Buffer registers (back by more than
    1 s, or a switch between system and ROS time: ``/clock`` reset under ``use_sim_time``); ``to_ns`` is the
    clock's time right after the last one. ``on_jump(text)`` (optional) runs after counting, with a
    sentence saying what happened. Works beside either buffer: with tf2_ros it is how the node learns of the
    clears tf2_ros does itself."""

    def __init__(self, node, on_jump=None):
        from rclpy.clock import JumpThreshold
        from rclpy.duration import Duration

        self.count = 0
        self.to_ns = 0
        self.logger = node.get_logger()
        self._clock = node.get_clock()
        self._on_jump = on_jump
        threshold = JumpThreshold(min_forward=None, min_backward=Duration(seconds=-1), on_clock_change=True)
        self._handle = self._clock.create_jump_callback(threshold, post_callback=self._jumped)

    def _jumped(self, jump) -> None:
        from rclpy.clock import ClockChange

        self.to_ns = self._clock.now().nanoseconds
        self.count += 1
        if jump.clock_change == ClockChange.ROS_TIME_ACTIVATED:
            what = "the node's clock switched to ROS time (use_sim_time: the first /clock)"
        elif jump.clock_change == ClockChange.ROS_TIME_DEACTIVATED:
            what = "the node's clock switched back to system time"
        else:
            what = (f"the node's clock jumped back {-jump.delta.nanoseconds / 1e9:.3f} s (/clock reset: a "
                    "simulator reset or a bag started over?)")
        if self._on_jump is not None:
            self._on_jump(what)

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._handle is not None:
            self._handle.unregister()
            self._handle = None


# ---------------------------------------------------------------------- buffer substitute
class TfBufferSubstitute:
    """tf2_ros.Buffer API subset over ``TfBuffer``; raises the exported exception classes.

    Clears its dynamic transforms (static ones kept, as tf2's ``clear``) when time jumps back:
    - the node's clock jumps back by more than 1 s or switches between system and ROS time (a
      ``/clock`` reset under ``use_sim_time``), through the same rclpy jump callback tf2_ros's
      Buffer registers;
    - a dynamic sample is more than ``jump_back_tolerance_s`` older than its link's newest one (a bag
      played in a loop with wall-clock stamps), which tf2_ros does not detect.
    ``clears`` counts both kinds.
    """

    def __init__(self, cache_time=None, node=None, *,
                 jump_back_tolerance_s: float | None = JUMP_BACK_TOLERANCE_S):
        """``cache_time``: rclpy Duration (default 10 s). ``node``: its clock's jumps clear the buffer."""
        cache_s = _core.DEFAULT_CACHE_TIME_S if cache_time is None else stamp_to_ns(cache_time) / 1e9
        self.core = _core.TfBuffer(cache_s, jump_back_tolerance_s=jump_back_tolerance_s)
        self.clock = ClockJumps(node, self._on_time_jump) if node is not None else None

    def _on_time_jump(self, what: str) -> None:
        self.clock.logger.warning(f"TF: {what}; cleared the TF buffer (static transforms kept)")
        self.core.clear()

    @property
    def clock_jumps(self) -> int:
        """Times the node's clock jumped back (or switched between system and ROS time)."""
        return 0 if self.clock is None else self.clock.count

    @property
    def clears(self) -> int:
        """Times the buffer cleared itself: clock jumps + stamps jumping back."""
        return self.clock_jumps + self.core.counters()["jumps_back"]

    def close(self) -> None:
        """Stop listening to the node's clock jumps (idempotent)."""
        if self.clock is not None:
            self.clock.close()

    def set_transform(self, transform, authority: str = "") -> bool:
        """Insert a dynamic TransformStamped; ValueError (buffer unchanged) when invalid."""
        return self._insert(transform, static=False)

    def set_transform_static(self, transform, authority: str = "") -> bool:
        """Insert a static TransformStamped, valid at all times."""
        return self._insert(transform, static=True)

    def _insert(self, transform, static: bool) -> bool:
        T = transform_to_matrix(transform)
        r = transform.transform.rotation
        # TfBuffer strips one leading '/' of each frame id, as tf2 does.
        return self.core.set_transform(
            transform.header.frame_id, transform.child_frame_id,
            T[:3, 3], (r.x, r.y, r.z, r.w), stamp_to_ns(transform.header.stamp), static,
        )

    def lookup_transform(self, target_frame: str, source_frame: str, time, timeout=None):
        """TransformStamped ``T_target_source`` at ``time`` (rclpy Time; 0 = latest common time).

        Waits up to ``timeout`` (rclpy Duration, default 0) for the data; see the module docstring
        for why that wait needs the listener on another thread.
        """
        T, stamp_ns = self._wait(target_frame, source_frame, time, timeout)
        return matrix_to_transform_msg(T, target_frame, source_frame, stamp_ns)

    def lookup_matrix(self, target_frame: str, source_frame: str, stamp_ns: int = 0,
                      timeout_s: float = 0.0) -> np.ndarray:
        """(4, 4) ``T_target_source`` without building a message."""
        try:
            return self.core.wait_for_matrix(target_frame, source_frame, stamp_ns, timeout_s)
        except _core.TransformException as exc:
            raise _exported_error(exc) from None

    def can_transform(self, target_frame: str, source_frame: str, time, timeout=None,
                      return_debug_tuple: bool = False):
        """True when the lookup succeeds within ``timeout``; ``(ok, error text)`` if asked."""
        try:
            self._wait(target_frame, source_frame, time, timeout)
        except TransformException as exc:
            return (False, str(exc)) if return_debug_tuple else False
        return (True, "") if return_debug_tuple else True

    def clear(self) -> None:
        """Drop the dynamic transforms, keep the static ones (tf2 ``Buffer.clear``)."""
        self.core.clear()

    def _wait(self, target_frame, source_frame, time, timeout):
        try:
            return self.core.wait_for(target_frame, source_frame, stamp_to_ns(time),
                                      stamp_to_ns(timeout) / 1e9)
        except _core.TransformException as exc:
            raise _exported_error(exc) from None


# ---------------------------------------------------------------------- listener substitute
def tf_qos_profiles():
    """(dynamic, static) QoS as tf2_ros: depth 100 reliable; /tf volatile, /tf_static transient local."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    dynamic = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
    static = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    return dynamic, static


class TfListenerSubstitute:
    """Feeds a buffer from /tf and /tf_static (tf2_msgs/TFMessage), like tf2_ros.TransformListener.

    The topics are absolute (``/tf``, ``/tf_static``) as tf2_ros's are: TF is one tree per ROS graph,
    so a node pushed into a namespace still listens to it. ``spin_thread=False``: the subscriptions
    live on ``node`` in a ReentrantCallbackGroup; the caller's executor spins them.
    ``spin_thread=True``: they live on a dedicated node ``<node name>_tf_listener`` spun by its own
    SingleThreadedExecutor thread, so lookups with a timeout on the caller's executor cannot starve
    them. Invalid transforms are dropped, counted in ``rejected`` and logged (throttled). A child
    frame changing parent and a jump back in time are logged as warnings (throttled per kind) from
    the buffer's notices. Call ``unregister()`` before destroying the node.
    """

    def __init__(self, buffer, node, *, spin_thread: bool = False, qos=None, static_qos=None):
        from rclpy.callback_groups import ReentrantCallbackGroup
        from rclpy.node import Node
        from tf2_msgs.msg import TFMessage

        self.buffer = buffer
        self.rejected = 0
        self._last_log: dict[str, float] = {}
        self._owns_node = spin_thread
        if spin_thread:
            node = Node(f"{node.get_name()}_tf_listener", namespace=node.get_namespace(),
                        context=node.context, start_parameter_services=False, enable_rosout=False)
        self.node = node
        default_qos, default_static = tf_qos_profiles()
        self.group = ReentrantCallbackGroup()
        self.tf_sub = node.create_subscription(
            TFMessage, "/tf", self._callback, qos or default_qos, callback_group=self.group)
        self.tf_static_sub = node.create_subscription(
            TFMessage, "/tf_static", self._static_callback, static_qos or default_static,
            callback_group=self.group)
        self.executor = None
        self._thread = None
        if spin_thread:
            from rclpy.executors import SingleThreadedExecutor

            self.executor = SingleThreadedExecutor(context=node.context)
            self.executor.add_node(node)
            self._thread = threading.Thread(target=self._spin, name="tf_listener", daemon=False)
            self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:  # rclpy shut down under us: the thread just ends
            return

    def _callback(self, msg) -> None:
        self._feed(msg, self.buffer.set_transform)

    def _static_callback(self, msg) -> None:
        self._feed(msg, self.buffer.set_transform_static)

    def _feed(self, msg, insert) -> None:
        for transform in msg.transforms:
            try:
                insert(transform, "default_authority")
            except ValueError as exc:
                self.rejected += 1
                self.node.get_logger().warning(f"dropped transform: {exc}", throttle_duration_sec=5.0)
        core = getattr(self.buffer, "core", None)
        for kind, text in core.take_notices() if core is not None else ():
            now = time.monotonic()
            if now - self._last_log.get(kind, -math.inf) >= _NOTICE_THROTTLE_S:
                self._last_log[kind] = now
                self.node.get_logger().warning(f"TF: {text}")

    def unregister(self) -> None:
        """Stop the spin thread (if any) and destroy the subscriptions (and the dedicated node)."""
        if self.executor is not None:
            self.executor.shutdown()
            self._thread.join()
            self.executor = None
        if self.tf_sub is not None:
            self.node.destroy_subscription(self.tf_sub)
            self.node.destroy_subscription(self.tf_static_sub)
            self.tf_sub = self.tf_static_sub = None
            if self._owns_node:
                self.node.destroy_node()


# ---------------------------------------------------------------------- factory + helpers
def make_tf_buffer(node, cache_time_s: float = 10.0, spin_thread: bool = False,
                   prefer_real: bool = True):
    """``(buffer, listener, is_real)``: tf2_ros Buffer + TransformListener when importable (and
    ``prefer_real``), else ``TfBufferSubstitute`` + ``TfListenerSubstitute``.

    On a machine with ROS 2 installed (``ros_install.detect_ros2_install``) a tf2_ros that does not
    import raises ``MissingRosDependency`` (a ValueError naming what to install) instead of falling
    back: the substitute serves only machines without ROS (or a caller that asks for it,
    ``prefer_real=False``).

    With ``spin_thread`` both paths spin the listener on a dedicated node in its own thread (the
    real TransformListener would otherwise add ``node`` itself to its private executor). Release
    with ``close_tf_listener(listener)``.
    """
    if not np.isfinite(cache_time_s) or cache_time_s <= 0:
        raise ValueError(f"cache_time_s must be a positive number of seconds, got {cache_time_s}")
    if HAVE_TF2_ROS and prefer_real:
        from rclpy.duration import Duration
        from rclpy.node import Node

        buffer = _tf2_ros.Buffer(cache_time=Duration(nanoseconds=round(cache_time_s * 1e9)), node=node)
        listen_node = node
        if spin_thread:
            listen_node = Node(f"{node.get_name()}_tf_listener", namespace=node.get_namespace(),
                               context=node.context, start_parameter_services=False,
                               enable_rosout=False)
        listener = _tf2_ros.TransformListener(buffer, listen_node, spin_thread=spin_thread)
        listener._lerf_owned_node = listen_node if spin_thread else None
        # tf2_ros's Buffer clears itself on these jumps without telling anyone: counted here (tf_health).
        listener._lerf_clock_jumps = ClockJumps(node)
        return buffer, listener, True
    if prefer_real:
        from lerf_ros.compat import ros_install

        ros_install.decide({"tf2_ros": TF2_ROS_IMPORT_ERROR or "not imported"})  # raises on a ROS machine
    from rclpy.duration import Duration

    buffer = TfBufferSubstitute(cache_time=Duration(nanoseconds=round(cache_time_s * 1e9)), node=node)
    return buffer, TfListenerSubstitute(buffer, node, spin_thread=spin_thread), False


def close_tf_listener(listener) -> None:
    """Stop a listener from ``make_tf_buffer`` (either kind): spin thread, subscriptions, own node."""
    if isinstance(listener, TfListenerSubstitute):
        listener.unregister()
        if isinstance(listener.buffer, TfBufferSubstitute):
            listener.buffer.close()
        return
    jumps = getattr(listener, "_lerf_clock_jumps", None)
    if jumps is not None:
        jumps.close()
    if hasattr(listener, "dedicated_listener_thread"):
        listener.executor.shutdown()
        listener.dedicated_listener_thread.join()
    listener.unregister()
    owned = getattr(listener, "_lerf_owned_node", None)
    if owned is not None:
        owned.destroy_node()


class TfHealth(NamedTuple):
    """What went wrong in the TF stream, totals since the listener started (``tf_health``).

    listener:       "tf2_ros" or "substitute".
    rejected:       transforms refused as invalid (NaN / infinite translation, zero, non-finite or non-unit
                    quaternion, empty or equal frame ids); substitute only: tf2_ros logs its rejections and
                    counts none, so 0 there.
    loops:          loops formed (a transform whose new parent made a frame its own ancestor); substitute
                    only.
    jumps_back:     clears of the dynamic transforms because time jumped back: the node's clock (both
                    listeners), the /tf stamps (substitute only: tf2_ros does not look at them).
    parent_changes: a child frame's parent changing (two publishers of one frame); substitute only.
    jump_to_ns:     the time the last jump went back to (0: none yet): a /tf stamp or the node's clock.
    """

    listener: str
    rejected: int = 0
    loops: int = 0
    jumps_back: int = 0
    parent_changes: int = 0
    jump_to_ns: int = 0


def tf_health(buffer, listener) -> TfHealth:
    """``TfHealth`` of a ``make_tf_buffer`` pair (either kind)."""
    if isinstance(buffer, TfBufferSubstitute):
        counts = buffer.core.counters()
        clock = buffer.clock
        stamp_jumps = counts["jumps_back"]
        # Of the two kinds' targets the newer: frames stamped after it (the old timeline) are surely stale.
        jump_to = max(buffer.core.last_jump_to_ns(), clock.to_ns if clock is not None else 0)
        return TfHealth("substitute", int(getattr(listener, "rejected", 0)), counts["loops"],
                        stamp_jumps + buffer.clock_jumps, counts["parent_changes"], jump_to)
    clock = getattr(listener, "_lerf_clock_jumps", None)
    return TfHealth("tf2_ros", jumps_back=clock.count if clock is not None else 0,
                    jump_to_ns=clock.to_ns if clock is not None else 0)


def lookup_matrix(buffer, target_frame: str, source_frame: str, stamp_ns: int = 0,
                  timeout_s: float = 0.0) -> np.ndarray:
    """(4, 4) float64 ``T_target_source`` from either buffer kind; raises the exported errors."""
    if isinstance(buffer, TfBufferSubstitute):
        return buffer.lookup_matrix(target_frame, source_frame, stamp_ns, timeout_s)
    from rclpy.duration import Duration
    from rclpy.time import Time

    msg = buffer.lookup_transform(target_frame, source_frame, Time(nanoseconds=int(stamp_ns)),
                                  Duration(nanoseconds=round(timeout_s * 1e9)))
    return transform_to_matrix(msg)
