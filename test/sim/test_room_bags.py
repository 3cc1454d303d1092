"""Random-room rosbags: BagFrameReader recovers the drive's camera poses (through the moving pan joint and
interpolated TF), images and depth, with and without depth; the CLI writes them too."""

import numpy as np
import pytest

from lerf_ros.core.frames.transforms import rotation_angle_deg
from lerf_ros.sim.drive import drive_through
from lerf_ros.sim.rooms import random_room
from lerf_ros.tools.bag_io import BagFrameReader, BagTopics
from lerf_ros.tools.cli import main
from lerf_ros.tools.demo_bag import DEMO_TOPICS, write_random_room_bag, write_recording_bag

SEED = 10
DEPTH = BagTopics(depth=DEMO_TOPICS["depth"])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("room_bags")
    room = random_room(SEED)
    drive = drive_through(room)
    return room, drive, write_recording_bag(root / "rgbd", room, drive.recording, with_depth=True)


def _check_poses(frames, T_expected):
    assert len(frames) == len(T_expected)
    for f, T in zip(frames, T_expected, strict=True):
        assert np.linalg.norm(f.T_world_cam[:3, 3] - T[:3, 3]) < 1e-3
        assert rotation_angle_deg(f.T_world_cam[:3, :3], T[:3, :3]) < 0.1


def test_rgbd_bag_round_trip(written):
    room, drive, bag = written
    np.testing.assert_array_equal(bag.T_world_cam, drive.T_world_cam)
    with BagFrameReader(bag.path, DEPTH) as reader:
        frames = list(reader)
    assert reader.stats.frames == len(drive.T_world_cam) == reader.stats.with_depth
    assert not reader.stats.dropped
    assert [f.stamp_ns for f in frames] == drive.recording.image_stamps_ns.tolist()
    _check_poses(frames, drive.T_world_cam)
    for i in (0, len(frames) // 2, len(frames) - 1):
        f = frames[i]
        assert f.intrinsics == drive.intrinsics and f.image.shape == (120, 160, 3)
        rgb, depth = room.render(f.T_world_cam, f.intrinsics)
        np.testing.assert_array_equal(f.image, rgb)
        assert np.abs(f.depth_m - depth).max() <= 0.0005 + 1e-6
    # The bag's topics: TF at the odometry rate (odometry + pan joint) plus localisation.
    n_odom = len(next(s for s in drive.recording.tf if s.child == "base_link").stamps_ns)
    assert bag.counts[DEMO_TOPICS["tf"]] > 2 * n_odom and bag.counts[DEMO_TOPICS["tf_static"]] == 1


def test_rgb_bag_round_trip_through_the_cli(written, tmp_path, capsys):
    room, drive, _ = written
    out = tmp_path / "rgb"
    assert main(["demo-bag", str(out), "--room", "random", "--seed", str(SEED), "--no-depth"]) == 0
    printed = capsys.readouterr().out
    assert "objects: " + ", ".join(room.names) in printed and room.absent_names[0] in printed
    with BagFrameReader(out) as reader:
        frames = list(reader)
    assert all(f.depth_m is None for f in frames)
    _check_poses(frames, drive.T_world_cam)
    with pytest.raises(ValueError, match="depth"), BagFrameReader(out, DEPTH):
        pass  # no depth topic in this bag


def test_cli_refuses_frames_for_a_random_room(tmp_path, capsys):
    assert main(["demo-bag", str(tmp_path / "x"), "--room", "random", "--frames", "5"]) == 1
    assert "--frames applies to the demo room" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exists already"):
        write_random_room_bag(tmp_path, SEED)
