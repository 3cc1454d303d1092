"""Drives through random rooms: camera rig ranges, a moving pan joint, TF tree and stamps, a path
through the free floor, every object seen from several frames, determinism."""

import numpy as np
import pytest

from lerf_ros.core.frames.transforms import invert_transform, rotation_angle_deg
from lerf_ros.sim.drive import (
    BASE_FRAME,
    LINK_FRAME,
    OPTICAL_FRAME,
    PAN_FRAME,
    PATH_OBSTACLE_M,
    PATH_WALL_M,
    DriveConfig,
    drive_through,
)
from lerf_ros.sim.rooms import random_room

SEEDS = (2, 10)


@pytest.fixture(scope="module")
def drives():
    return {seed: (random_room(seed), drive_through(random_room(seed))) for seed in SEEDS}


def test_same_seed_same_drive(drives):
    _, drive = drives[10]
    again = drive_through(random_room(10))
    np.testing.assert_array_equal(drive.T_world_cam, again.T_world_cam)
    np.testing.assert_array_equal(drive.recording.image_stamps_ns, again.recording.image_stamps_ns)
    assert drive.views == again.views and drive.intrinsics == again.intrinsics
    other = drives[2][1]
    assert other.image_rate_hz != drive.image_rate_hz or not np.allclose(other.path_xy[0], drive.path_xy[0])


def test_camera_rig_height_tilt_and_moving_pan(drives):
    for seed, (_, drive) in drives.items():
        assert 0.8 <= drive.camera_height_m <= 1.5 and 15.0 <= drive.tilt_down_deg <= 45.0
        np.testing.assert_allclose(drive.T_world_cam[:, 2, 3], drive.camera_height_m, atol=1e-9)
        forward = drive.T_world_cam[:, :3, 2]  # optical z
        pitch_down = np.degrees(np.arcsin(-forward[:, 2]))
        np.testing.assert_allclose(pitch_down, drive.tilt_down_deg, atol=1e-6)
        right = drive.T_world_cam[:, :3, 0]  # optical x stays horizontal: no roll
        assert np.abs(right[:, 2]).max() < 1e-9
        pan = drive.pan_deg()
        assert pan.max() - pan.min() > 30.0, seed  # the joint sweeps (+-20-25 degrees about a bias)
        assert np.abs(pan).max() <= 45.0 + 1e-9
        # The camera's heading differs from the base's by the pan angle: the pan reaches the images.
        series = {s.child: s for s in drive.recording.tf}
        base_yaw = np.degrees(np.arctan2(series[BASE_FRAME].T[:, 1, 0], series[BASE_FRAME].T[:, 0, 0]))
        assert len(np.unique(np.round(base_yaw))) > 20  # the base turns too
        hfov = np.degrees(2 * np.arctan(drive.intrinsics.width / 2 / drive.intrinsics.fx))
        assert 70.0 <= hfov <= 80.0 and (drive.intrinsics.width, drive.intrinsics.height) == (160, 120)


def test_tf_tree_rates_and_stamps(drives):
    for seed, (_, drive) in drives.items():
        rec = drive.recording
        edges = {(s.parent, s.child): s for s in rec.tf}
        assert set(edges) == {("map", "odom"), ("odom", BASE_FRAME), (BASE_FRAME, PAN_FRAME),
                              (PAN_FRAME, LINK_FRAME), (LINK_FRAME, OPTICAL_FRAME)}
        assert edges[(PAN_FRAME, LINK_FRAME)].static and edges[(LINK_FRAME, OPTICAL_FRAME)].static
        pan, odom = edges[(BASE_FRAME, PAN_FRAME)], edges[("odom", BASE_FRAME)]
        loc = edges[("map", "odom")]
        assert not pan.static and len(pan.stamps_ns) == len(odom.stamps_ns)  # joint at the odometry rate
        for series, (lo, hi) in ((odom, (30, 50)), (pan, (30, 50)), (loc, (5, 10))):
            rate = 1e9 / np.median(np.diff(series.stamps_ns))
            assert lo - 0.5 <= rate <= hi + 0.5, (seed, series.child, rate)
        stamps = rec.image_stamps_ns
        rate = 1e9 * (len(stamps) - 1) / (stamps[-1] - stamps[0])  # jitter is a few ms
        assert 5.0 <= drive.image_rate_hz <= 15.0 and rate == pytest.approx(drive.image_rate_hz, rel=0.01)
        assert 20.0 <= drive.duration_s <= 40.0
        # Jittered capture stamps: off the nominal grid by up to 3 ms, never on a TF stamp.
        grid = stamps[0] + np.round(np.arange(len(stamps)) * 1e9 / drive.image_rate_hz)
        jitter = np.abs((stamps - grid) - np.median(stamps - grid))
        assert 0 < jitter.max() <= 6_000_000
        tf_stamps = np.concatenate([s.stamps_ns for s in rec.tf if not s.static])
        assert not set(stamps.tolist()) & set(tf_stamps.tolist())
        assert tf_stamps.min() < stamps.min() and tf_stamps.max() > stamps.max()
        # Localisation drift: map -> odom moves a few cm over the drive.
        drift = np.linalg.norm(loc.T[-1][:2, 3] - loc.T[0][:2, 3])
        assert 0.01 < drift < 0.1


def test_path_goes_through_the_free_floor(drives):
    for seed, (room, drive) in drives.items():
        lo, hi = room.bounds[0, :2], room.bounds[1, :2]
        path = drive.path_xy
        assert np.all(path >= lo + PATH_WALL_M - 1e-9) and np.all(path <= hi - PATH_WALL_M + 1e-9)
        fps = room.floor_footprints
        d = np.maximum(fps[None, :, :2] - path[:, None], path[:, None] - fps[None, :, 2:])
        clearance = np.linalg.norm(np.maximum(d, 0.0), axis=2).min()
        assert clearance >= PATH_OBSTACLE_M - 1e-9, seed
        wall = np.minimum(path - lo, hi - path).min(axis=1)
        assert wall.min() < 1.2 + 0.2 and wall.max() > 1.2, seed  # near the walls and through the middle
        # Heading changes: the loop turns through a full circle, with left and right turns.
        seg = np.diff(path, axis=0)
        turn = np.diff(np.unwrap(np.arctan2(seg[:, 1], seg[:, 0])))
        assert abs(turn.sum()) == pytest.approx(2 * np.pi, abs=0.2)
        assert (turn > 0.01).any() and (turn < -0.01).any(), seed
        # Bases (camera positions) actually follow the path.
        cams = drive.T_world_cam[:, :2, 3]
        near = np.linalg.norm(cams[:, None] - path[None], axis=2).min(axis=1)
        assert near.max() < 0.25


def test_every_object_seen_in_three_frames_from_several_directions(drives):
    room, drive = drives[10]
    intr = drive.intrinsics
    seen = {o.name: [] for o in room.objects}
    for T in drive.T_world_cam:  # every frame at full resolution, independently of the generator's check
        labels = room.render_labels(T, intr)
        counts = np.bincount(labels[labels >= 0], minlength=len(room.objects))
        for o, c in zip(room.objects, counts, strict=True):
            if c >= 12:
                seen[o.name].append(T[:2, 3] - o.center[:2])
    for o in room.objects:
        assert len(seen[o.name]) >= 3, o.name
        bearings = np.sort(np.mod([np.arctan2(v[1], v[0]) for v in seen[o.name]], 2 * np.pi))
        span = np.degrees(2 * np.pi - np.diff(np.r_[bearings, bearings[0] + 2 * np.pi]).max())
        assert span >= 15.0, (o.name, span)
    for seed, (room, drive) in drives.items():  # the generator's own record
        assert min(drive.views.values()) >= 3 and min(drive.view_span_deg.values()) >= 20.0, seed
        assert set(drive.views) == set(room.names)


def test_camera_poses_are_the_tf_chain(drives):
    _, drive = drives[10]
    rec = drive.recording
    buf = rec.tf_buffer()
    i = len(rec.image_stamps_ns) // 2
    s = int(rec.image_stamps_ns[i])
    chain = (buf.lookup_matrix("map", BASE_FRAME, s) @ buf.lookup_matrix(BASE_FRAME, PAN_FRAME, s)
             @ buf.lookup_matrix(PAN_FRAME, OPTICAL_FRAME, s))
    np.testing.assert_allclose(chain, drive.T_world_cam[i], atol=1e-9)
    # Between two odometry samples, the pose is interpolated, not the nearest sample.
    odom = next(x for x in rec.tf if x.child == BASE_FRAME)
    k = int(np.searchsorted(odom.stamps_ns, s))
    T_prev = odom.T[k - 1]
    T_here = buf.lookup_matrix("odom", BASE_FRAME, s)
    step = np.linalg.norm(odom.T[k][:3, 3] - T_prev[:3, 3])
    assert 0 < np.linalg.norm(T_here[:3, 3] - T_prev[:3, 3]) < step
    assert rotation_angle_deg(invert_transform(T_here)[:3, :3], invert_transform(T_prev)[:3, :3]) < 10.0


def test_config_is_validated():
    with pytest.raises(ValueError, match="duration_s"):
        DriveConfig(duration_s=0.1).validate()
    with pytest.raises(ValueError, match="image size"):
        DriveConfig(width=4).validate()
