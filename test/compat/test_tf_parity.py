"""The substitute TF buffer and a stand-in of the real tf2_ros, driven through the same cases.

Both go through what the trainer node runs: ``compat.tf.make_tf_buffer`` / ``lookup_matrix``, the
exported exception classes and ``ros.ingest.lookup_pose`` (the drop reason). "substitute" is
``TfBufferSubstitute`` (what serves where no ROS is installed); "tf2_ros stand-in" is
test/doubles/lerf_test_doubles/tf2_ros_stand_in.py (tf2's behaviour, written independently) loaded as
``tf2_ros`` under a fresh copy of ``lerf_ros.compat.tf``, which then takes its real-tf2_ros branch.

Numbers are hand-computed on the chain of test_tf_buffer.py: at 1.5 s the optical frame sits at
(11 + 0.1 c, 2 + 0.1 s, 0.5) in map with rotation [[s, 0, c], [-c, 0, s], [0, -1, 0]], c = s = cos 45.
"""

import importlib.util
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import TransformStamped
from lerf_test_doubles.tf_scene import EXPECTED_MAP_OPT, OPT, S, yaw_q
from rclpy.node import Node
from rclpy.time import Time
from tf2_msgs.msg import TFMessage

import lerf_ros.compat.tf as compat_tf
from lerf_ros.ros import ingest


def tf_msg(parent, child, xyz, q=(0, 0, 0, 1), stamp_s=0.0):
    m = TransformStamped()
    m.header.frame_id, m.child_frame_id = parent, child
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(round(stamp_s * S), S)
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = map(float, xyz)
    r = m.transform.rotation
    r.x, r.y, r.z, r.w = map(float, q)
    return m


STATIC = (
    tf_msg("base_link", "camera_link", (0.1, 0, 0.5)),
    tf_msg("camera_link", OPT, (0, 0, 0), (-0.5, 0.5, -0.5, 0.5)),
)
DYNAMIC = (
    tf_msg("map", "odom", (10, 0, 0), yaw_q(0), 0.5),
    tf_msg("map", "odom", (10, 4, 0), yaw_q(0), 2.5),
    tf_msg("odom", "base_link", (0, 0, 0), yaw_q(0), 1.0),
    tf_msg("odom", "base_link", (2, 0, 0), yaw_q(90), 2.0),
)
SLASHED = tuple(tf_msg("/" + m.header.frame_id, "/" + m.child_frame_id,
                       (m.transform.translation.x, m.transform.translation.y, m.transform.translation.z),
                       (m.transform.rotation.x, m.transform.rotation.y, m.transform.rotation.z,
                        m.transform.rotation.w), m.header.stamp.sec + m.header.stamp.nanosec / S)
                for m in DYNAMIC)
# base's parent is odom (static at (100, 0, 0) in map) for its samples at 1 s and 2 s, map for 3 s and 5 s.
TWO_PARENTS_STATIC = (tf_msg("map", "odom", (100, 0, 0)),)
TWO_PARENTS = (tf_msg("odom", "base", (1, 0, 0), stamp_s=1.0), tf_msg("odom", "base", (3, 0, 0), stamp_s=2.0),
               tf_msg("map", "base", (10, 0, 0), stamp_s=3.0), tf_msg("map", "base", (14, 0, 0), stamp_s=5.0))


@dataclass(frozen=True)
class Case:
    """Insert ``static`` then ``dynamic`` (then ``clear()``); look up T_target_source at ``stamp_s``.

    expect: (4, 4) matrix or (3,) translation, or the exported exception's name; then ``reason`` is the
    trainer's drop reason and ``match`` a piece of the error text.
    """

    name: str
    target: str
    source: str
    stamp_s: float
    expect: object
    static: tuple = STATIC
    dynamic: tuple = DYNAMIC
    clear: bool = False
    reason: str = ""
    match: str = ""


CASES = (
    Case("interpolated chain", "map", OPT, 1.5, EXPECTED_MAP_OPT),
    Case("inverse", OPT, "map", 1.5, np.linalg.inv(EXPECTED_MAP_OPT)),
    # Latest common time = 2.0 s (newest odom->base_link); map->odom there (10, 3, 0), base (2, 0, 0) yaw 90.
    Case("latest common time", "map", "camera_link", 0.0, np.array([12, 3.1, 0.5])),
    Case("static only, any time", "base_link", OPT, 7.0, np.array([0.1, 0, 0.5])),
    Case("unknown frame", "map", "nowhere", 1.5, "LookupException", reason="tf_missing", match="nowhere"),
    Case("future", "map", OPT, 3.0, "ExtrapolationException", reason="tf_extrapolation", match="future"),
    Case("past", "map", "odom", 0.2, "ExtrapolationException", reason="tf_extrapolation", match="past"),
    Case("disconnected", "island", OPT, 1.5, "ConnectivityException",
         static=(*STATIC, tf_msg("world", "island", (1, 2, 3))), reason="tf_missing", match="island"),
    Case("leading slash in target", "/map", OPT, 1.5, "InvalidArgumentException", reason="tf_missing",
         match="cannot start with a '/'"),
    Case("leading slash in source", "map", "/" + OPT, 1.5, "InvalidArgumentException", reason="tf_missing",
         match="cannot start with a '/'"),
    Case("leading slash stripped on insert", "map", OPT, 1.5, EXPECTED_MAP_OPT, dynamic=SLASHED),
    Case("two parents: odom's samples", "map", "base", 1.5, np.array([102.0, 0, 0]),
         static=TWO_PARENTS_STATIC, dynamic=TWO_PARENTS),
    Case("two parents: older sample across the change", "map", "base", 2.5, np.array([103.0, 0, 0]),
         static=TWO_PARENTS_STATIC, dynamic=TWO_PARENTS),
    Case("two parents: map's samples", "map", "base", 4.0, np.array([12.0, 0, 0]),
         static=TWO_PARENTS_STATIC, dynamic=TWO_PARENTS),
    Case("two parents: latest", "map", "base", 0.0, np.array([14.0, 0, 0]),
         static=TWO_PARENTS_STATIC, dynamic=TWO_PARENTS),
    Case("two parents: down to the other branch", "odom", "base", 4.0, np.array([-88.0, 0, 0]),
         static=TWO_PARENTS_STATIC, dynamic=TWO_PARENTS),
    Case("static re-parented: newest wins", "c", "b", 0.0, np.array([0, 1.0, 0]),
         static=(tf_msg("a", "b", (1, 0, 0)), tf_msg("c", "b", (0, 1, 0))), dynamic=()),
    Case("static re-parented: old parent gone", "a", "b", 0.0, "ConnectivityException",
         static=(tf_msg("a", "b", (1, 0, 0)), tf_msg("c", "b", (0, 1, 0))), dynamic=(), reason="tf_missing"),
    Case("clear keeps static", "base_link", OPT, 0.0, np.array([0.1, 0, 0.5]), clear=True),
    Case("clear drops dynamic", "map", OPT, 1.5, "ExtrapolationException", clear=True,
         reason="tf_extrapolation"),
)


@pytest.fixture(scope="module")
def stand_in_tf():
    """lerf_ros.compat.tf loaded afresh with the stand-in as ``tf2_ros``."""
    from lerf_test_doubles import tf2_ros_stand_in

    saved = sys.modules.get("tf2_ros")
    sys.modules["tf2_ros"] = tf2_ros_stand_in
    try:
        spec = importlib.util.spec_from_file_location("compat_tf_with_stand_in", compat_tf.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["tf2_ros"]
        else:
            sys.modules["tf2_ros"] = saved
    assert module.HAVE_TF2_ROS and module.LookupException is tf2_ros_stand_in.LookupException
    return SimpleNamespace(mod=module, real=True,
                           new_buffer=lambda node=None: tf2_ros_stand_in.Buffer(node=node))


@pytest.fixture(params=("substitute", "tf2_ros stand-in"))
def impl(request, stand_in_tf):
    if request.param == "substitute":
        return SimpleNamespace(mod=compat_tf, real=False,
                               new_buffer=lambda node=None: compat_tf.TfBufferSubstitute(node=node))
    return stand_in_tf


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_substitute_and_tf2_ros_stand_in_answer_alike(impl, case):
    mod, buf = impl.mod, impl.new_buffer()
    for m in case.static:
        buf.set_transform_static(m, "test")
    for m in case.dynamic:
        buf.set_transform(m, "test")
    if case.clear:
        buf.clear()
    stamp_ns = round(case.stamp_s * S)

    def lookup(target, source, stamp, timeout_s):
        return mod.lookup_matrix(buf, target, source, stamp, timeout_s)

    T, reason, detail = ingest.lookup_pose(lookup, case.target, case.source, stamp_ns, 0.0, mod)
    ok = buf.can_transform(case.target, case.source, Time(nanoseconds=stamp_ns))
    if isinstance(case.expect, str):
        error = getattr(mod, case.expect)
        with pytest.raises(error) as info:
            mod.lookup_matrix(buf, case.target, case.source, stamp_ns)
        assert case.match in str(info.value)
        assert (T, reason) == (None, case.reason) and case.match in detail
        assert not ok
        assert isinstance(info.value, mod.TransformException)
    else:
        assert reason == "", detail
        expected = np.asarray(case.expect, dtype=float)
        got = T[:3, 3] if expected.shape == (3,) else T
        np.testing.assert_allclose(got, expected, atol=1e-9)
        assert ok


@pytest.mark.parametrize("stamp_jump_clears", [True, False], ids=["substitute", "tf2_ros stand-in"])
def test_a_bag_loop_in_the_stamps_clears_only_the_substitute(stand_in_tf, stamp_jump_clears):
    # tf2_ros clears on clock jumps only; with wall-clock stamps (a bag looped without /clock) it ignores
    # the replayed samples as older than the cache (TF_OLD_DATA) and keeps answering from the first pass.
    if stamp_jump_clears:
        mod, buf = compat_tf, compat_tf.TfBufferSubstitute()
    else:
        mod, buf = stand_in_tf.mod, stand_in_tf.new_buffer()
    for stamp_s, x in ((100.0, 1.0), (101.0, 2.0), (80.0, 5.0)):  # the bag starts over 21 s earlier
        buf.set_transform(tf_msg("odom", "base", (x, 0, 0), stamp_s=stamp_s), "test")
    if stamp_jump_clears:
        np.testing.assert_allclose(mod.lookup_matrix(buf, "odom", "base", 80 * S)[:3, 3], [5, 0, 0])
        with pytest.raises(mod.ExtrapolationException):
            mod.lookup_matrix(buf, "odom", "base", round(100.5 * S))
        assert buf.clears == 1
    else:
        T = mod.lookup_matrix(buf, "odom", "base", round(100.5 * S))
        np.testing.assert_allclose(T[:3, 3], [1.5, 0, 0])
        with pytest.raises(mod.ExtrapolationException, match="past"):
            mod.lookup_matrix(buf, "odom", "base", 80 * S)


# ---------------------------------------------------------------------------------- over rclpy
def _spin_until(executor, predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.05)
    return predicate()


@pytest.fixture
def ros():
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    nodes = []

    def make(name, namespace=""):
        node = Node(name, namespace=namespace, context=context)
        nodes.append(node)
        executor.add_node(node)
        return node

    try:
        yield SimpleNamespace(make=make, executor=executor)
    finally:
        executor.shutdown()
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_both_listen_to_absolute_tf_topics_from_inside_a_namespace(impl, ros):
    node = ros.make("lerf_trainer", namespace="robot1")
    buffer, listener, is_real = impl.mod.make_tf_buffer(node, prefer_real=impl.real)
    try:
        assert is_real == impl.real
        assert (listener.tf_sub.topic_name, listener.tf_static_sub.topic_name) == ("/tf", "/tf_static")
        pub = ros.make("tf_pub", namespace="elsewhere")
        dynamic_qos, static_qos = compat_tf.tf_qos_profiles()
        pub.create_publisher(TFMessage, "/tf_static", static_qos).publish(TFMessage(transforms=list(STATIC)))
        dyn = pub.create_publisher(TFMessage, "/tf", dynamic_qos)
        assert _spin_until(ros.executor, lambda: dyn.get_subscription_count() >= 1)
        dyn.publish(TFMessage(transforms=list(DYNAMIC)))
        at = Time(nanoseconds=int(1.5 * S))
        assert _spin_until(ros.executor, lambda: buffer.can_transform("map", OPT, at))
        np.testing.assert_allclose(impl.mod.lookup_matrix(buffer, "map", OPT, int(1.5 * S)), EXPECTED_MAP_OPT,
                                   atol=1e-9)
    finally:
        impl.mod.close_tf_listener(listener)


def test_both_clear_when_the_node_clock_jumps_back_under_sim_time(impl, ros):
    from rclpy.clock import ClockType

    node = ros.make("tf_clock")
    clock = node.get_clock()
    assert clock.clock_type == ClockType.ROS_TIME
    buffer = impl.new_buffer(node)
    clock._set_ros_time_is_active(True)  # what use_sim_time does on the first /clock message
    clock.set_ros_time_override(Time(seconds=101))
    for m in STATIC:
        buffer.set_transform_static(m, "test")
    for m in DYNAMIC:
        buffer.set_transform(m, "test")

    def lookup(stamp_s):
        return impl.mod.lookup_matrix(buffer, "map", OPT, round(stamp_s * S))

    np.testing.assert_allclose(lookup(1.5), EXPECTED_MAP_OPT, atol=1e-9)
    clock.set_ros_time_override(Time(seconds=102))  # forward: kept
    clock.set_ros_time_override(Time(seconds=101, nanoseconds=500_000_000))  # back 0.5 s: under 1 s, kept
    np.testing.assert_allclose(lookup(1.5), EXPECTED_MAP_OPT, atol=1e-9)
    clock.set_ros_time_override(Time(seconds=50))  # a simulator reset: back 51.5 s
    with pytest.raises(impl.mod.ExtrapolationException):
        lookup(1.5)
    np.testing.assert_allclose(impl.mod.lookup_matrix(buffer, "base_link", OPT)[:3, 3], [0.1, 0, 0.5])
    # Switching to ROS time clears too (as tf2_ros): twice in all.
    assert (buffer.clock_jumps if not impl.real else buffer.jumps) == 2
    if not impl.real:
        assert buffer.clears == 2
        buffer.close()
