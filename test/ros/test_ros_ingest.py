"""Trainer ingest pieces without a running ROS graph: queue bound, pose lookup errors, CameraInfo, and
the room publisher's timeline against the TF buffer's interpolation."""

import importlib.util
import pathlib
import threading

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo

from lerf_ros.compat import tf as compat_tf
from lerf_ros.compat.tf_buffer import TfBuffer
from lerf_ros.core.frames.transforms import matrix_to_quat
from lerf_ros.ros import ingest


def _load_room_publisher():
    path = pathlib.Path(__file__).with_name("room_publisher.py")
    spec = importlib.util.spec_from_file_location("room_publisher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounded_queue_drops_oldest_and_never_exceeds_its_bound():
    q = ingest.BoundedQueue(3)
    results = [q.put(i) for i in range(10)]
    assert results == [True, True, True] + [False] * 7
    assert len(q) == 3 and q.high_water == 3
    assert [q.get(0) for _ in range(3)] == [7, 8, 9]
    assert q.get(0.01) is None
    with pytest.raises(ValueError, match="maxlen"):
        ingest.BoundedQueue(0)


def test_bounded_queue_under_concurrent_flood():
    q = ingest.BoundedQueue(8)
    evicted = []

    def producer():
        evicted.append(sum(not q.put(i) for i in range(5000)))

    threads = [threading.Thread(target=producer) for _ in range(4)]
    got = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or len(q):
        if q.get(0.01) is not None:
            got += 1
    for t in threads:
        t.join()
    assert q.high_water <= 8
    assert got + sum(evicted) == 20000  # every frame either processed or counted as dropped


def test_close_wakes_a_waiting_get():
    q = ingest.BoundedQueue(2)
    out = []
    t = threading.Thread(target=lambda: out.append(q.get(10.0)))
    t.start()
    q.close()
    t.join(2.0)
    assert not t.is_alive() and out == [None]


def _depth(value):
    return np.full((2, 3), value, np.float32)


def test_depth_buffer_pairs_the_nearest_stamp_within_tolerance():
    buf = ingest.DepthBuffer(4)
    for stamp in (1000, 2000, 3000):
        buf.put(stamp, _depth(stamp))
    got = buf.wait_match(2040, 50, 0.0)  # 2000 is 40 ns away, 3000 far outside
    assert got is not None and got[0, 0] == 2000 and len(buf) == 2  # a matched depth is consumed
    assert buf.wait_match(2040, 50, 0.0) is None  # consumed: no second match
    assert buf.wait_match(1100, 50, 0.0) is None  # 1000 is 100 ns away
    with pytest.raises(ValueError, match="maxlen"):
        ingest.DepthBuffer(0)


def test_depth_buffer_waits_for_late_depth_and_gives_up_early_when_newer_depth_is_held():
    buf = ingest.DepthBuffer(4)
    out = []
    t = threading.Thread(target=lambda: out.append(buf.wait_match(5000, 0, 30.0)))
    t.start()
    while buf.waiting == 0:
        threading.Event().wait(0.001)
    buf.put(4000, _depth(4))  # older than the colour frame: not a reason to give up
    t.join(0.2)
    assert t.is_alive() and out == []
    buf.put(5000, _depth(5))
    t.join(5.0)
    assert not t.is_alive() and out[0][0, 0] == 5
    # The depth of 6000 was lost; a depth of 7000 is already held, so waiting 30 s would be pointless.
    buf.put(7000, _depth(7))
    done = threading.Event()
    t = threading.Thread(target=lambda: (out.append(buf.wait_match(6000, 10, 30.0)), done.set()))
    t.start()
    assert done.wait(5.0) and out[-1] is None


def test_depth_buffer_close_wakes_a_waiter_and_clear_empties():
    buf = ingest.DepthBuffer(2)
    buf.put(1, _depth(1))
    buf.clear()
    assert len(buf) == 0
    out = []
    t = threading.Thread(target=lambda: out.append(buf.wait_match(9, 0, 30.0)))
    t.start()
    while buf.waiting == 0:
        threading.Event().wait(0.001)
    buf.close()
    t.join(5.0)
    assert not t.is_alive() and out == [None]
    buf.put(3, _depth(3))
    assert buf.wait_match(3, 0, 30.0) is None  # closed: never waits, never matches


def test_depth_buffer_flood_keeps_the_newest_stamps_within_the_bound():
    buf = ingest.DepthBuffer(5)
    for stamp in [*range(100, 0, -1), *range(200, 300)]:  # out of order, then in order
        buf.put(stamp, _depth(stamp))
        assert len(buf) <= 5
    assert buf.high_water == 5
    assert [buf.wait_match(s, 0, 0.0) is not None for s in (294, 295, 299)] == [False, True, True]


def test_depth_buffer_recovers_after_time_jumps_back():
    """A bag played in a loop: stamps restart lower. The stale later stamps must age out, not the new."""
    buf = ingest.DepthBuffer(3)
    for stamp in (9000, 9100, 9200):
        buf.put(stamp, _depth(stamp))
    for stamp in (100, 200, 300):
        buf.put(stamp, _depth(stamp))
    got = buf.wait_match(300, 0, 0.0)
    assert got is not None and got[0, 0] == 300 and len(buf) == 2


def test_drop_counter():
    c = ingest.DropCounter()
    for reason in ("a", "b", "a"):
        c.drop(reason)
    c.received()
    c.note(ingest.NO_DEPTH_MATCH)
    assert c.snapshot() == (1, {"a": 2, "b": 1})  # notes are not drops
    assert c.notes() == {"no_depth_match": 1}
    c.reset()
    assert c.snapshot() == (0, {}) and c.notes() == {}


def _buffer_with_chain():
    buf = TfBuffer()
    buf.set_transform("map", "odom", [0, 0, 0], [0, 0, 0, 1], 0, static=True)
    buf.set_transform("odom", "cam", [0.0, 0, 0], [0, 0, 0, 1], 1_000)
    buf.set_transform("odom", "cam", [1.0, 0, 0], [0, 0, 0, 1], 2_000)

    def lookup(target, source, stamp_ns, timeout_s):
        return buf.wait_for_matrix(target, source, stamp_ns, timeout_s)

    return lookup


class _CoreErrors:
    from lerf_ros.compat.tf_buffer import ExtrapolationException, TransformException


def test_lookup_pose_reasons():
    lookup = _buffer_with_chain()
    T, reason, _ = ingest.lookup_pose(lookup, "map", "cam", 1_500, 0.0, _CoreErrors)
    assert reason == "" and T[0, 3] == pytest.approx(0.5)
    T, reason, detail = ingest.lookup_pose(lookup, "map", "ghost", 1_500, 0.0, _CoreErrors)
    assert T is None and reason == ingest.TF_MISSING and "ghost" in detail
    T, reason, detail = ingest.lookup_pose(lookup, "map", "cam", 500, 0.0, _CoreErrors)  # TF only later
    assert T is None and reason == ingest.TF_EXTRAPOLATION and "past" in detail
    T, reason, _ = ingest.lookup_pose(lookup, "map", "cam", 5_000, 0.01, _CoreErrors)  # TF only earlier
    assert T is None and reason == ingest.TF_EXTRAPOLATION

    def nan_lookup(*_):
        T = np.eye(4)
        T[0, 3] = np.nan
        return T

    T, reason, detail = ingest.lookup_pose(nan_lookup, "map", "cam", 0, 0.0, _CoreErrors)
    assert T is None and reason == ingest.BAD_TRANSFORM and "not finite" in detail
    # The exported compat classes work the same (what the node passes).
    T, reason, _ = ingest.lookup_pose(nan_lookup, "map", "cam", 0, 0.0, compat_tf)
    assert reason == ingest.BAD_TRANSFORM


def _info(width=64, height=48, fx=50.0, model="plumb_bob", d=(0.0,) * 5):
    msg = CameraInfo(width=width, height=height, distortion_model=model)
    msg.k = [fx, 0.0, 31.5, 0.0, fx, 23.5, 0.0, 0.0, 1.0]
    msg.d = list(d)
    return msg


def test_intrinsics_from_camera_info():
    intr = ingest.intrinsics_from_camera_info(_info())
    assert (intr.width, intr.height, intr.fx, intr.fy, intr.cx, intr.cy) == (64, 48, 50.0, 50.0, 31.5, 23.5)
    assert intr.distortion_model == "none"  # all-zero D
    intr = ingest.intrinsics_from_camera_info(_info(d=(0.1, 0, 0, 0, 0)))
    assert intr.distortion_model == "plumb_bob" and intr.distortion[0] == 0.1
    zero = ingest.intrinsics_from_camera_info(_info(fx=0.0))  # converted; rejected by validate()
    with pytest.raises(ValueError, match="focal"):
        zero.validate()
    with pytest.raises(ValueError, match="equidistant"):
        ingest.intrinsics_from_camera_info(_info(model="equidistant", d=(0.1, 0, 0, 0)))


def test_room_publisher_poses_are_what_interpolated_tf_gives():
    rp = _load_room_publisher()
    player = rp.RoomPlayer(tf_samples=20, tf_hz=10.0, width=32, height=24)
    buf = TfBuffer(cache_time_s=100.0)
    rig = player.rig
    for name, T in (("camera_link", rig.T_base_link), ("camera_color_optical_frame", rig.T_link_optical)):
        parent = "base_link" if name == "camera_link" else "camera_link"
        buf.set_transform(parent, name, T[:3, 3], matrix_to_quat(T[:3, :3]), 0, static=True)
    t0 = 5 * rp.NS
    for j in range(25):  # beyond one lap: the orbit wraps
        mo, ob = player.links_at(j)
        stamp = t0 + j * player.dt_ns
        buf.set_transform("map", "odom", mo[:3, 3], matrix_to_quat(mo[:3, :3]), stamp)
        buf.set_transform("odom", "base_link", ob[:3, 3], matrix_to_quat(ob[:3, :3]), stamp)
    for t_rel in (player.dt_ns // 3, 7 * player.dt_ns + 12_345_678, 21 * player.dt_ns + player.dt_ns // 2):
        expected = player.camera_pose(t_rel)
        got = buf.lookup_matrix("map", "camera_color_optical_frame", t0 + t_rel)
        np.testing.assert_allclose(got, expected, atol=1e-9)
    # Between samples the pose really is interpolated (not the nearest sample).
    mid = player.camera_pose(player.dt_ns // 2)
    assert np.abs(mid - player.camera_pose(0)).max() > 1e-3
    assert np.abs(mid - player.camera_pose(player.dt_ns)).max() > 1e-3
