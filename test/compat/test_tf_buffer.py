"""TfBuffer against hand-computed transforms on a map -> odom -> base_link -> camera chain.

Tree (T_parent_child, translations in metres, stamps in seconds):
  map -> odom            dynamic: t=0.5 (10, 0, 0) yaw 0;   t=2.5 (10, 4, 0) yaw 0
  odom -> base_link      dynamic: t=1.0 (0, 0, 0)  yaw 0;   t=2.0 (2, 0, 0)  yaw 90 deg
  base_link -> camera_link                static: (0.1, 0, 0.5), identity
  camera_link -> camera_color_optical_frame static: (0, 0, 0), q = (-0.5, 0.5, -0.5, 0.5) (REP-103)
"""

import math
import threading
import time

import numpy as np
import pytest

from lerf_ros.compat.tf_buffer import (
    ConnectivityException,
    ExtrapolationException,
    InvalidArgumentException,
    LookupException,
    TfBuffer,
    TransformException,
)

S = 1_000_000_000
OPT = "camera_color_optical_frame"
C45 = math.sqrt(0.5)  # cos 45 deg = sin 45 deg


def yaw_q(deg):
    h = math.radians(deg) / 2
    return (0.0, 0.0, math.sin(h), math.cos(h))


@pytest.fixture
def buf():
    b = TfBuffer()
    b.set_transform("map", "odom", (10, 0, 0), yaw_q(0), int(0.5 * S))
    b.set_transform("map", "odom", (10, 4, 0), yaw_q(0), int(2.5 * S))
    b.set_transform("odom", "base_link", (0, 0, 0), yaw_q(0), 1 * S)
    b.set_transform("odom", "base_link", (2, 0, 0), yaw_q(90), 2 * S)
    b.set_transform("base_link", "camera_link", (0.1, 0, 0.5), (0, 0, 0, 1), 0, static=True)
    b.set_transform("camera_link", OPT, (0, 0, 0), (-0.5, 0.5, -0.5, 0.5), 0, static=True)
    return b


def test_optical_static_rotation_matches_rep103(buf):
    # Optical axes in camera_link: x = right = -y, y = down = -z, z = forward = +x.
    T = buf.lookup_matrix("camera_link", OPT, 7 * S)
    expected = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(T, expected, atol=1e-12)


def test_interpolated_chain_at_midpoint(buf):
    # At 1.5 s: map->odom = (10, 2, 0); odom->base_link = (1, 0, 0) yaw 45 deg.
    # Camera origin: (10, 2, 0) + (1, 0, 0) + Rz45 (0.1, 0, 0.5) = (11 + 0.1 c, 2 + 0.1 s, 0.5).
    # Rotation Rz45 @ R_opt: columns Rz45(0,-1,0) = (s,-c,0), Rz45(0,0,-1) = (0,0,-1), Rz45(1,0,0) = (c,s,0).
    T, stamp = buf.lookup("map", OPT, int(1.5 * S))
    expected = np.array(
        [
            [C45, 0, C45, 11 + 0.1 * C45],
            [-C45, 0, C45, 2 + 0.1 * C45],
            [0, -1, 0, 0.5],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(T, expected, atol=1e-9)
    assert stamp == int(1.5 * S)


def test_inverse_lookup_maps_world_point_into_camera(buf):
    t = int(1.5 * S)
    T_opt_map = buf.lookup_matrix(OPT, "map", t)
    np.testing.assert_allclose(T_opt_map @ buf.lookup_matrix("map", OPT, t), np.eye(4), atol=1e-12)
    # A point 2 m straight ahead of the camera: origin + 2 * z_opt(map) = origin + 2 * (c, s, 0).
    p_map = np.array([11 + 0.1 * C45 + 2 * C45, 2 + 0.1 * C45 + 2 * C45, 0.5, 1.0])
    np.testing.assert_allclose(T_opt_map @ p_map, [0, 0, 2, 1], atol=1e-9)


def test_rotation_is_slerped_not_nlerped(buf):
    # At 1.25 s slerp gives yaw 22.5 deg exactly; normalised lerp would give 21.59 deg.
    T = buf.lookup_matrix("odom", "base_link", int(1.25 * S))
    yaw = math.degrees(math.atan2(T[1, 0], T[0, 0]))
    assert yaw == pytest.approx(22.5, abs=1e-9)
    np.testing.assert_allclose(T[:3, 3], [0.5, 0, 0], atol=1e-12)


def test_lookup_between_sibling_branches_uses_common_ancestor(buf):
    buf.set_transform("odom", "dock", (5, 0, 0), yaw_q(180), 0, static=True)
    # At 2 s base_link is at (2, 0, 0) yaw 90 in odom; camera_link at (2, 0.1, 0.5).
    # In dock (at (5,0,0), yaw 180): x_dock = 5 - x_odom, y_dock = -y_odom.
    T = buf.lookup_matrix("dock", "camera_link", 2 * S)
    np.testing.assert_allclose(T[:3, 3], [3, -0.1, 0.5], atol=1e-12)
    # camera_link x axis points +y_odom, i.e. -y_dock.
    np.testing.assert_allclose(T[:3, 0], [0, -1, 0], atol=1e-12)


def test_exact_stamp_and_latest_common_time(buf):
    T = buf.lookup_matrix("odom", "camera_link", 2 * S)
    np.testing.assert_allclose(T[:3, 3], [2, 0.1, 0.5], atol=1e-12)
    # Newest map->odom is 2.5 s, newest odom->base_link 2.0 s: stamp 0 resolves to 2.0 s.
    T0, stamp = buf.lookup("map", "camera_link", 0)
    assert stamp == 2 * S
    # map->odom at 2.0 s: ratio 0.75 between y = 0 and y = 4 -> (10, 3, 0); camera_link (2, 0.1, 0.5).
    np.testing.assert_allclose(T0[:3, 3], [10 + 2, 3 + 0.1, 0.5], atol=1e-12)
    # Static-only path: valid at any time, resolved stamp 0.
    T_static, stamp = buf.lookup("base_link", OPT, 0)
    assert stamp == 0
    np.testing.assert_allclose(T_static[:3, 3], [0.1, 0, 0.5])


def test_same_frame_is_identity(buf):
    np.testing.assert_array_equal(buf.lookup_matrix("odom", "odom", 123), np.eye(4))


def test_future_and_past_stamps_raise_extrapolation(buf):
    with pytest.raises(ExtrapolationException, match="future") as err:
        buf.lookup_matrix("map", OPT, 3 * S)
    assert "3.000000000 s" in str(err.value)
    with pytest.raises(ExtrapolationException, match="past") as err:
        buf.lookup_matrix("map", "odom", int(0.2 * S))
    msg = str(err.value)
    assert "[odom]" in msg and "[map]" in msg and "0.200000000 s" in msg and "0.500000000 s" in msg


def test_disconnected_trees_raise_connectivity(buf):
    buf.set_transform("world", "other_robot", (1, 2, 3), (0, 0, 0, 1), 0, static=True)
    with pytest.raises(ConnectivityException, match="other_robot"):
        buf.lookup_matrix("map", "other_robot", 2 * S)
    assert issubclass(ConnectivityException, TransformException)


def test_unknown_frame_and_empty_frame(buf):
    with pytest.raises(LookupException, match="nowhere"):
        buf.lookup_matrix("map", "nowhere", 2 * S)
    with pytest.raises(InvalidArgumentException):
        buf.lookup_matrix("", "map", 0)


@pytest.mark.parametrize(
    ("translation", "quaternion", "match"),
    [
        ((0, 0, 0), (float("nan"), 0, 0, 1), "not finite"),
        ((0, 0, 0), (0, 0, 0, 2), "not a unit quaternion"),
        ((0, 0, 0), (0, 0, 0, 0), "not a unit quaternion"),
        ((float("nan"), 0, 0), (0, 0, 0, 1), "translation"),
        ((0, float("inf"), 0), (0, 0, 0, 1), "translation"),
    ],
)
def test_bad_transforms_rejected_and_buffer_unchanged(buf, translation, quaternion, match):
    before = buf.lookup_matrix("map", OPT, int(1.5 * S))
    frames = buf.frame_names()
    with pytest.raises(ValueError, match=match):
        buf.set_transform("odom", "base_link", translation, quaternion, int(1.5 * S))
    with pytest.raises(ValueError, match=match):
        buf.set_transform("map", "new_frame", translation, quaternion, 0, static=True)
    assert buf.frame_names() == frames
    np.testing.assert_array_equal(buf.lookup_matrix("map", OPT, int(1.5 * S)), before)


def test_single_sample_only_answers_its_own_stamp():
    b = TfBuffer()
    b.set_transform("a", "b", (1, 0, 0), (0, 0, 0, 1), 5 * S)
    np.testing.assert_allclose(b.lookup_matrix("a", "b", 5 * S)[:3, 3], [1, 0, 0])
    np.testing.assert_allclose(b.lookup_matrix("a", "b", 0)[:3, 3], [1, 0, 0])
    with pytest.raises(ExtrapolationException, match=r"only time 5\.000000000 s"):
        b.lookup_matrix("a", "b", 4 * S)


def test_cache_time_prunes_and_rejects_old_data():
    b = TfBuffer(cache_time_s=1.0)
    for k in range(4):  # 0, 1, 2, 3 s: x = k
        assert b.set_transform("a", "b", (k, 0, 0), (0, 0, 0, 1), k * S)
    # Only samples within 1 s of the newest (3 s) survive: 2 s and 3 s.
    np.testing.assert_allclose(b.lookup_matrix("a", "b", int(2.5 * S))[:3, 3], [2.5, 0, 0])
    with pytest.raises(ExtrapolationException, match="past"):
        b.lookup_matrix("a", "b", int(1.5 * S))
    assert not b.set_transform("a", "b", (9, 0, 0), (0, 0, 0, 1), int(1.5 * S))  # older than cache
    assert not b.set_transform("a", "b", (9, 0, 0), (0, 0, 0, 1), 3 * S)  # repeated stamp ignored
    np.testing.assert_allclose(b.lookup_matrix("a", "b", 3 * S)[:3, 3], [3, 0, 0])


def test_out_of_order_insertion_interpolates():
    b = TfBuffer()
    b.set_transform("a", "b", (4, 0, 0), (0, 0, 0, 1), 4 * S)
    b.set_transform("a", "b", (0, 0, 0), (0, 0, 0, 1), 0 * S + 1)
    b.set_transform("a", "b", (2, 0, 0), (0, 0, 0, 1), 2 * S + 1)
    np.testing.assert_allclose(b.lookup_matrix("a", "b", 3 * S + 1)[:3, 3], [3, 0, 0], atol=1e-8)


def test_set_matrix_round_trip():
    b = TfBuffer()
    T = np.array([[0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=float)
    b.set_matrix("a", "b", T, 0, static=True)
    np.testing.assert_allclose(b.lookup_matrix("a", "b"), T, atol=1e-12)
    np.testing.assert_allclose(b.lookup_matrix("b", "a"), np.linalg.inv(T), atol=1e-12)
    with pytest.raises(ValueError, match="not rigid"):
        b.set_matrix("a", "c", np.diag([2.0, 1, 1, 1]), 0)


def test_wait_for_matrix_wakes_on_new_data_and_times_out():
    b = TfBuffer()
    b.set_transform("a", "b", (0, 0, 0), (0, 0, 0, 1), 1 * S)
    result = {}
    started = threading.Event()

    def waiter():
        started.set()
        result["T"] = b.wait_for_matrix("a", "b", int(1.5 * S), timeout_s=10.0)

    th = threading.Thread(target=waiter)
    th.start()
    started.wait(5.0)
    b.set_transform("a", "b", (2, 0, 0), (0, 0, 0, 1), 2 * S)
    th.join(10.0)
    assert not th.is_alive()
    np.testing.assert_allclose(result["T"][:3, 3], [1, 0, 0])
    with pytest.raises(ExtrapolationException, match="future"):
        b.wait_for_matrix("a", "b", 5 * S, timeout_s=0.05)
    assert not b.can_transform("a", "b", 5 * S, timeout_s=0.0)
    assert b.can_transform("a", "b", 2 * S)


def test_static_reparenting_newest_wins_frames_are_kept_and_loops_are_reported():
    b = TfBuffer()
    b.set_transform("a", "b", (1, 0, 0), (0, 0, 0, 1), 0, static=True)
    b.set_transform("c", "b", (0, 1, 0), (0, 0, 0, 1), 0, static=True)
    assert b.parent_of("b") == "c"
    np.testing.assert_allclose(b.lookup_matrix("c", "b")[:3, 3], [0, 1, 0])
    assert b.counters()["parent_changes"] == 1 and b.several_parents() == {"b": ["a", "c"]}
    assert b.counters()["loops"] == 0
    b.take_notices()
    b.set_transform("b", "c", (0, 0, 1), (0, 0, 0, 1), 0, static=True)  # b -> c -> b
    assert b.frame_names() == ["a", "b", "c"]  # tf2 never forgets a frame name
    with pytest.raises(TransformException, match="loop"):
        b.lookup_matrix("c", "b")
    # Counted once when it forms (a sample giving c a new parent), not again for samples along it.
    assert b.counters()["loops"] == 1
    [(kind, text)] = b.take_notices()
    assert kind == "loop" and "c -> b -> c" in text
    b.set_transform("b", "c", (0, 0, 2), (0, 0, 0, 1), 0, static=True)
    assert b.counters()["loops"] == 1


@pytest.fixture
def two_parents():
    """base's parent is odom for its samples at 1 s and 2 s, map for those at 3 s and 5 s; odom is
    static at (100, 0, 0) in map. All translations along x, no rotation."""
    b = TfBuffer()
    b.set_transform("map", "odom", (100, 0, 0), (0, 0, 0, 1), 0, static=True)
    b.set_transform("odom", "base", (1, 0, 0), (0, 0, 0, 1), 1 * S)
    b.set_transform("odom", "base", (3, 0, 0), (0, 0, 0, 1), 2 * S)
    b.set_transform("map", "base", (10, 0, 0), (0, 0, 0, 1), 3 * S)
    b.set_transform("map", "base", (14, 0, 0), (0, 0, 0, 1), 5 * S)
    return b


@pytest.mark.parametrize(
    ("stamp_s", "x_map", "why"),
    [(1.5, 102.0, "odom's samples interpolated: 2 in odom"),
     (2.5, 103.0, "between an odom and a map sample: the older (3 in odom), not interpolated"),
     (4.0, 12.0, "map's samples interpolated"),
     (5.0, 14.0, "the newest sample")],
)
def test_a_frame_with_two_parents_follows_the_parent_at_each_time(two_parents, stamp_s, x_map, why):
    T = two_parents.lookup_matrix("map", "base", int(stamp_s * S))
    np.testing.assert_allclose(T[:3, 3], [x_map, 0, 0], atol=1e-9, err_msg=why)


def test_two_parents_are_counted_reported_and_the_newest_answers_latest(two_parents):
    T, stamp = two_parents.lookup("map", "base", 0)
    assert stamp == 5 * S
    np.testing.assert_allclose(T[:3, 3], [14, 0, 0])
    # Through map (the parent at 4 s) and back down to odom: 12 - 100.
    np.testing.assert_allclose(two_parents.lookup_matrix("odom", "base", 4 * S)[:3, 3], [-88, 0, 0])
    assert two_parents.parent_of("base") == "map"
    assert two_parents.counters() == {"parent_changes": 1, "jumps_back": 0, "old_data": 0, "loops": 0}
    assert two_parents.several_parents() == {"base": ["map", "odom"]}
    notices = two_parents.take_notices()
    assert [kind for kind, _ in notices] == ["parent_change"]
    assert "[base]" in notices[0][1] and "[odom]" in notices[0][1] and "[map]" in notices[0][1]
    assert two_parents.take_notices() == []  # drained
    two_parents.set_transform("odom", "base", (4, 0, 0), (0, 0, 0, 1), 6 * S)  # and back to odom
    assert two_parents.counters()["parent_changes"] == 2


def test_leading_slash_is_stripped_on_insert_and_rejected_on_lookup_as_tf2_does():
    b = TfBuffer()
    assert b.set_transform("/map", "/odom", (1, 2, 3), (0, 0, 0, 1), 0, static=True)
    assert b.frame_names() == ["map", "odom"]
    np.testing.assert_allclose(b.lookup_matrix("map", "odom")[:3, 3], [1, 2, 3])
    for target, source, arg in (("/map", "odom", "target_frame"), ("map", "/odom", "source_frame")):
        with pytest.raises(InvalidArgumentException, match=f"{arg} - in tf2 frame_ids cannot start with"):
            b.lookup_matrix(target, source)
        assert not b.can_transform(target, source)
    t0 = time.monotonic()
    with pytest.raises(InvalidArgumentException):  # never waits: no data can make it valid
        b.wait_for_matrix("/map", "odom", 0, timeout_s=5.0)
    assert time.monotonic() - t0 < 1.0
    np.testing.assert_array_equal(b.lookup_matrix("/map", "/map"), np.eye(4))  # identity comes first in tf2
    with pytest.raises(ValueError, match="parent_frame"):
        b.set_transform("/", "a", (0, 0, 0), (0, 0, 0, 1), 0)


def test_clear_keeps_static_transforms_and_frame_names(buf):
    frames = buf.frame_names()
    buf.clear()
    assert buf.frame_names() == frames
    np.testing.assert_allclose(buf.lookup_matrix("base_link", OPT)[:3, 3], [0.1, 0, 0.5])
    with pytest.raises(ExtrapolationException, match="no data for frame"):
        buf.lookup_matrix("map", OPT, 0)
    buf.set_transform("odom", "base_link", (5, 0, 0), yaw_q(0), 9 * S)
    np.testing.assert_allclose(buf.lookup_matrix("odom", "camera_link", 0)[:3, 3], [5.1, 0, 0.5])


def test_jump_back_in_time_clears_dynamic_transforms_only_when_enabled():
    def fill(b):
        b.set_transform("base", "cam", (0, 0, 1), (0, 0, 0, 1), 0, static=True)
        for stamp_s, x in ((100.0, 1.0), (101.0, 2.0), (100.5, 1.5)):  # 0.5 s out of order: no jump
            assert b.set_transform("odom", "base", (x, 0, 0), (0, 0, 0, 1), int(stamp_s * S))
        b.set_transform("odom", "base", (7, 0, 0), (0, 0, 0, 1), int(99.5 * S))  # 1.5 s back

    looped = TfBuffer(cache_time_s=10.0, jump_back_tolerance_s=1.0)
    fill(looped)
    assert not looped.set_transform("odom", "base", (0, 0, 0), (0, 0, 0, 1), 0)  # unset stamp: old, no jump
    assert looped.counters()["jumps_back"] == 1
    [(kind, text)] = looped.take_notices()
    assert kind == "jump_back" and "99.500000000 s" in text and "101.000000000 s" in text
    with pytest.raises(ExtrapolationException, match=r"only time 99\.500000000 s"):  # 100, 101 s gone
        looped.lookup_matrix("odom", "base", 101 * S)
    T, stamp = looped.lookup("odom", "cam", 0)
    assert stamp == int(99.5 * S)
    np.testing.assert_allclose(T[:3, 3], [7, 0, 1])  # the static link survived the clear

    plain = TfBuffer(cache_time_s=10.0)  # tf2's behaviour: an older sample is just history
    fill(plain)
    assert plain.counters()["jumps_back"] == 0
    np.testing.assert_allclose(plain.lookup_matrix("odom", "base", int(100.25 * S))[:3, 3], [1.25, 0, 0])
    assert not plain.set_transform("odom", "base", (0, 0, 0), (0, 0, 0, 1), 80 * S)  # older than the cache
    assert plain.counters()["old_data"] == 1
    with pytest.raises(ValueError, match="jump_back_tolerance_s"):
        TfBuffer(jump_back_tolerance_s=-1.0)


def test_constructor_and_insert_argument_errors():
    with pytest.raises(ValueError, match="cache_time_s"):
        TfBuffer(cache_time_s=0)
    b = TfBuffer()
    with pytest.raises(ValueError, match="itself"):
        b.set_transform("a", "a", (0, 0, 0), (0, 0, 0, 1), 0)
    with pytest.raises(ValueError, match="child_frame"):
        b.set_transform("a", "", (0, 0, 0), (0, 0, 0, 1), 0)
    with pytest.raises(ValueError, match="stamp_ns"):
        b.set_transform("a", "b", (0, 0, 0), (0, 0, 0, 1), -1)
