"""The TF adapter over rclpy in one process: /tf_static latching, /tf, lookups with timeouts.

Same chain and numbers as test_tf_buffer.py (hand-computed there): at 1.5 s the optical frame sits
at (11 + 0.1 c, 2 + 0.1 s, 0.5) in map with rotation [[s, 0, c], [-c, 0, s], [0, -1, 0]], c = s = cos 45.
"""

import threading
import time

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import TransformStamped
from lerf_test_doubles.tf_scene import C45, EXPECTED_MAP_OPT, OPT, S, yaw_q
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.time import Time
from tf2_msgs.msg import TFMessage

from lerf_ros.compat.tf import (
    HAVE_TF2_ROS,
    TF_ERRORS,
    ExtrapolationException,
    LookupException,
    TfBufferSubstitute,
    TfListenerSubstitute,
    close_tf_listener,
    lookup_matrix,
    make_tf_buffer,
    matrix_to_transform_msg,
    stamp_to_ns,
    tf_qos_profiles,
    transform_to_matrix,
)


def tf_msg(parent, child, xyz, q, stamp_ns):
    m = TransformStamped()
    m.header.frame_id, m.child_frame_id = parent, child
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp_ns, S)
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = map(float, xyz)
    r = m.transform.rotation
    r.x, r.y, r.z, r.w = map(float, q)
    return m


STATIC = [
    tf_msg("base_link", "camera_link", (0.1, 0, 0.5), (0, 0, 0, 1), 0),
    tf_msg("camera_link", OPT, (0, 0, 0), (-0.5, 0.5, -0.5, 0.5), 0),
]
DYNAMIC = [
    tf_msg("map", "odom", (10, 0, 0), yaw_q(0), int(0.5 * S)),
    tf_msg("map", "odom", (10, 4, 0), yaw_q(0), int(2.5 * S)),
    tf_msg("odom", "base_link", (0, 0, 0), yaw_q(0), 1 * S),
    tf_msg("odom", "base_link", (2, 0, 0), yaw_q(90), 2 * S),
]


def wait_until(predicate, timeout_s=10.0, spin=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if spin is not None:
            spin()
        else:
            time.sleep(0.01)  # polling interval, not a fixed wait: the loop exits as soon as it holds
    return predicate()


@pytest.fixture
def ros():
    context = rclpy.Context()
    rclpy.init(context=context)
    nodes = []

    def make(name):
        node = Node(name, context=context)
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_transform_msg_round_trip_and_validation():
    T = np.array([[0, -1, 0, 1.5], [1, 0, 0, -2], [0, 0, 1, 0.25], [0, 0, 0, 1]], dtype=float)
    msg = matrix_to_transform_msg(T, "map", "base_link", 3 * S + 7)
    assert (msg.header.frame_id, msg.child_frame_id) == ("map", "base_link")
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (3, 7)
    assert stamp_to_ns(msg.header.stamp) == 3 * S + 7
    np.testing.assert_allclose([msg.transform.rotation.z, msg.transform.rotation.w], [C45, C45])
    np.testing.assert_allclose(transform_to_matrix(msg), T, atol=1e-12)
    np.testing.assert_allclose(transform_to_matrix(msg.transform), T, atol=1e-12)
    bad = tf_msg("a", "b", (0, 0, 0), (0, 0, 0.5, 0.5), 0)
    with pytest.raises(ValueError, match="not a unit quaternion"):
        transform_to_matrix(bad)
    with pytest.raises(ValueError, match="translation"):
        transform_to_matrix(tf_msg("a", "b", (float("nan"), 0, 0), (0, 0, 0, 1), 0))


def test_substitute_buffer_api_without_ros_graph():
    buf = TfBufferSubstitute(cache_time=Duration(seconds=10))
    for m in STATIC:
        assert buf.set_transform_static(m, "test")
    for m in DYNAMIC:
        assert buf.set_transform(m, "test")
    out = buf.lookup_transform("map", OPT, Time(nanoseconds=int(1.5 * S)), Duration())
    assert (out.header.frame_id, out.child_frame_id, stamp_to_ns(out.header.stamp)) == ("map", OPT, 1.5 * S)
    np.testing.assert_allclose(transform_to_matrix(out), EXPECTED_MAP_OPT, atol=1e-9)
    np.testing.assert_allclose(lookup_matrix(buf, OPT, "map", int(1.5 * S)),
                               np.linalg.inv(EXPECTED_MAP_OPT), atol=1e-9)
    assert buf.can_transform("map", OPT, Time(nanoseconds=2 * S))
    ok, why = buf.can_transform("map", OPT, Time(nanoseconds=9 * S), return_debug_tuple=True)
    assert not ok and "future" in why
    with pytest.raises(LookupException):
        buf.lookup_transform("map", "nowhere", Time())
    with pytest.raises(TF_ERRORS):
        lookup_matrix(buf, "map", OPT, 9 * S)
    with pytest.raises(ValueError, match="not a unit quaternion"):
        buf.set_transform(tf_msg("map", "odom", (0, 0, 0), (0, 0, 1, 1), 3 * S), "test")


def test_listener_receives_latched_static_and_dynamic_then_looks_up(ros):
    pub_node = ros("tf_pub")
    qos_dynamic, qos_static = tf_qos_profiles()
    static_pub = pub_node.create_publisher(TFMessage, "tf_static", qos_static)
    static_pub.publish(TFMessage(transforms=STATIC))  # before any listener exists
    dyn_pub = pub_node.create_publisher(TFMessage, "tf", qos_dynamic)

    node = ros("tf_user")
    buffer, listener, is_real = make_tf_buffer(node, cache_time_s=10.0, spin_thread=True, prefer_real=False)
    try:
        assert not is_real and isinstance(listener, TfListenerSubstitute)
        # Statics published before the subscription existed arrive through transient-local durability.
        static_T = lookup_matrix(buffer, "base_link", OPT, 0, timeout_s=10.0)
        np.testing.assert_allclose(static_T[:3, 3], [0.1, 0, 0.5])
        np.testing.assert_allclose(static_T[:3, 2], [1, 0, 0], atol=1e-12)  # optical z = forward

        assert wait_until(lambda: dyn_pub.get_subscription_count() >= 1)
        dyn_pub.publish(TFMessage(transforms=DYNAMIC))
        out = buffer.lookup_transform("map", OPT, Time(nanoseconds=int(1.5 * S)), Duration(seconds=10))
        assert (out.header.frame_id, out.child_frame_id) == ("map", OPT)
        assert stamp_to_ns(out.header.stamp) == int(1.5 * S)
        np.testing.assert_allclose(transform_to_matrix(out), EXPECTED_MAP_OPT, atol=1e-9)

        # Into the future: waits for the whole timeout, then raises.
        t0 = time.monotonic()
        with pytest.raises(ExtrapolationException, match="future"):
            buffer.lookup_transform("map", OPT, Time(nanoseconds=5 * S), Duration(seconds=0.3))
        assert time.monotonic() - t0 >= 0.3

        # A waiting lookup is woken by data the listener thread inserts.
        result = {}

        def waiter():
            result["msg"] = buffer.lookup_transform("odom", "base_link", Time(nanoseconds=3 * S),
                                                    Duration(seconds=10))

        th = threading.Thread(target=waiter)
        th.start()
        dyn_pub.publish(TFMessage(transforms=[tf_msg("odom", "base_link", (4, 0, 0), yaw_q(90), 4 * S)]))
        th.join(15.0)
        assert not th.is_alive()
        # Between 2 s (2, 0, 0) and 4 s (4, 0, 0), both yaw 90: x = 3 at 3 s.
        np.testing.assert_allclose(transform_to_matrix(result["msg"])[:3, 3], [3, 0, 0], atol=1e-12)

        # A NaN quaternion on the wire is dropped and counted; the buffer keeps its data.
        bad = tf_msg("odom", "base_link", (9, 9, 9), (float("nan"), 0, 0, 1), 5 * S)
        dyn_pub.publish(TFMessage(transforms=[bad]))
        assert wait_until(lambda: listener.rejected == 1)
        with pytest.raises(ExtrapolationException):
            lookup_matrix(buffer, "odom", "base_link", 5 * S)
    finally:
        close_tf_listener(listener)
    assert listener.executor is None and listener.tf_sub is None


def test_listener_warns_when_a_frame_changes_parent_or_stamps_jump_back(ros, capfd):
    pub_node = ros("tf_pub3")
    qos_dynamic, _ = tf_qos_profiles()
    dyn_pub = pub_node.create_publisher(TFMessage, "/tf", qos_dynamic)
    node = ros("tf_user3")
    buffer, listener, _ = make_tf_buffer(node, spin_thread=True, prefer_real=False)
    try:
        assert wait_until(lambda: dyn_pub.get_subscription_count() >= 1)
        dyn_pub.publish(TFMessage(transforms=[tf_msg("odom", "base_link", (0, 0, 0), yaw_q(0), 10 * S)]))
        dyn_pub.publish(TFMessage(transforms=[tf_msg("map", "base_link", (1, 0, 0), yaw_q(0), 11 * S)]))
        assert wait_until(lambda: buffer.core.counters()["parent_changes"] == 1)
        assert buffer.core.several_parents() == {"base_link": ["map", "odom"]}
        # The bag starts over: 9 s back on the same link clears the dynamic transforms first.
        dyn_pub.publish(TFMessage(transforms=[tf_msg("map", "base_link", (2, 0, 0), yaw_q(0), 2 * S)]))
        assert wait_until(lambda: buffer.clears == 1)
        np.testing.assert_allclose(lookup_matrix(buffer, "map", "base_link", 0)[:3, 3], [2, 0, 0])
        with pytest.raises(ExtrapolationException):
            lookup_matrix(buffer, "map", "base_link", 11 * S)
    finally:
        close_tf_listener(listener)
    err = capfd.readouterr().err
    assert "TF: frame [base_link] has more than one parent (map, odom)" in err
    assert "TF: stamps jumped back on [map] -> [base_link]: a sample at 2.000000000 s" in err


def test_listener_on_callers_node_spun_by_caller(ros):
    from rclpy.executors import SingleThreadedExecutor

    pub_node = ros("tf_pub2")
    _, qos_static = tf_qos_profiles()
    pub_node.create_publisher(TFMessage, "tf_static", qos_static).publish(TFMessage(transforms=STATIC))
    node = ros("tf_user2")
    buffer = TfBufferSubstitute()
    listener = TfListenerSubstitute(buffer, node)
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    try:
        assert wait_until(lambda: buffer.can_transform("camera_link", OPT, Time()),
                          spin=lambda: executor.spin_once(timeout_sec=0.05))
        T = lookup_matrix(buffer, "camera_link", OPT)
        np.testing.assert_allclose(T[:3, :3], [[0, 0, 1], [-1, 0, 0], [0, -1, 0]], atol=1e-12)
    finally:
        executor.shutdown()
        listener.unregister()


def test_factory_picks_real_tf2_when_importable(ros):
    node = ros("tf_factory")
    buffer, listener, is_real = make_tf_buffer(node)
    try:
        assert is_real == HAVE_TF2_ROS
        assert isinstance(buffer, TfBufferSubstitute) != is_real
    finally:
        close_tf_listener(listener)
    with pytest.raises(ValueError, match="cache_time_s"):
        make_tf_buffer(node, cache_time_s=-1.0)


def test_real_tf2_ros_path_with_stand_in_module(monkeypatch):
    """Where tf2_ros imports, its classes are exported and the substitute raises them."""
    import importlib.util
    import types

    import lerf_ros.compat.tf as tf_module

    fake = types.ModuleType("tf2_ros")

    class TransformException(Exception):
        pass

    for name in ("LookupException", "ConnectivityException", "ExtrapolationException",
                 "InvalidArgumentException"):
        setattr(fake, name, type(name, (TransformException,), {}))
    fake.TransformException = TransformException
    fake.Buffer = lambda cache_time=None, node=None: ("Buffer", stamp_to_ns(cache_time), node)
    fake.TransformListener = lambda buffer, node, spin_thread=False: types.SimpleNamespace(
        args=(buffer, node, spin_thread), unregister=lambda: None)
    monkeypatch.setitem(__import__("sys").modules, "tf2_ros", fake)
    spec = importlib.util.spec_from_file_location("tf_with_stand_in", tf_module.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    assert mod.HAVE_TF2_ROS and mod.LookupException is fake.LookupException
    assert mod.TF_ERRORS == (fake.LookupException, fake.ConnectivityException, fake.ExtrapolationException)
    buf = mod.TfBufferSubstitute()
    for m in STATIC:
        buf.set_transform_static(m, "test")
    buf.set_transform(DYNAMIC[2], "test")
    with pytest.raises(fake.LookupException):
        buf.lookup_transform("map", "nowhere", Time())
    with pytest.raises(fake.ExtrapolationException, match="extrapolation"):
        mod.lookup_matrix(buf, "odom", OPT, 9 * S)
    buf.set_transform_static(tf_msg("world", "island", (0, 0, 0), (0, 0, 0, 1), 0), "test")
    with pytest.raises(fake.ConnectivityException):
        buf.lookup_transform("island", OPT, Time())
    jumps = []  # the node clock's jump callbacks registered beside tf2_ros's (tf_health counts them)
    clock = types.SimpleNamespace(create_jump_callback=lambda threshold, post_callback: jumps.append(
        post_callback) or types.SimpleNamespace(unregister=lambda: jumps.clear()))
    node = types.SimpleNamespace(get_logger=lambda: None, get_clock=lambda: clock)
    buffer, listener, is_real = mod.make_tf_buffer(node, cache_time_s=2.5)
    assert is_real and buffer == ("Buffer", int(2.5 * S), node)
    assert listener.args == (buffer, node, False)
    assert len(jumps) == 1 and mod.tf_health(buffer, listener) == mod.TfHealth("tf2_ros")
    mod.close_tf_listener(listener)
    assert jumps == []
