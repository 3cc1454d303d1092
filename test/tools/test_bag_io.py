"""rosbag2 writing and reading: poses recovered through TF, images, depth, clear errors."""

import numpy as np
import pytest

from lerf_ros.tools.bag_io import BagError, BagFrameReader, BagTopics, camera_info_to_intrinsics
from lerf_ros.tools.demo_bag import DEMO_TOPICS, DemoBagConfig, write_demo_bag

DEPTH = BagTopics(depth=DEMO_TOPICS["depth"])


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    return {st: write_demo_bag(root / st, config=DemoBagConfig(frames=12, storage=st))
            for st in ("mcap", "sqlite3")}


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_frames_match_rendered_ground_truth(bags, storage):
    bag = bags[storage]
    with BagFrameReader(bag.path, DEPTH) as reader:
        frames = list(reader)
        assert reader.image_count == 12
    assert reader.stats.frames == 12 and reader.stats.with_depth == 12 and not reader.stats.dropped
    assert [f.stamp_ns for f in frames] == bag.stamps_ns.tolist()
    for i in (0, 5, 11):
        f = frames[i]
        np.testing.assert_allclose(f.T_world_cam, bag.T_world_cam[i], atol=1e-9)
        rgb, depth = bag.room.render(f.T_world_cam, f.intrinsics)
        np.testing.assert_array_equal(f.image, rgb)
        valid = np.isfinite(depth) & (depth > 0)
        # 16UC1 millimetres: rounding error at most half a millimetre.
        assert np.abs(f.depth_m[valid] - depth[valid]).max() <= 0.0005 + 1e-6
    assert frames[0].intrinsics == bag.intrinsics


def test_bag_rates_and_topics(bags):
    bag = bags["mcap"]
    # 12 images at 5 Hz = 2.2 s (+0.4 s margin) of odometry at 40 Hz and localisation at 10 Hz.
    assert bag.counts[DEMO_TOPICS["image"]] == 12 and bag.counts[DEMO_TOPICS["tf_static"]] == 1
    assert 125 <= bag.counts[DEMO_TOPICS["tf"]] <= 135  # ~104 odometry + ~27 localisation
    assert np.all(np.diff(bag.stamps_ns) > 190_000_000) and np.all(np.diff(bag.stamps_ns) < 210_000_000)
    # The camera actually moves along the path (one loop over the bag).
    assert np.linalg.norm(bag.T_world_cam[0, :3, 3] - bag.T_world_cam[6, :3, 3]) > 1.0


def test_without_depth_topic_frames_have_no_depth(bags):
    with BagFrameReader(bags["mcap"].path) as reader:
        frames = list(reader)
    assert len(frames) == 12 and all(f.depth_m is None for f in frames)


def test_missing_topic_lists_what_exists(bags):
    with pytest.raises(BagError, match=r"image topic '/nope' not in the bag.*\n.*/camera/color/camera_info"):
        BagFrameReader(bags["mcap"].path, BagTopics(image="/nope"))


def test_wrong_world_frame_is_a_disconnected_tree(bags):
    with BagFrameReader(bags["sqlite3"].path, world_frame="world") as reader, \
            pytest.raises(BagError, match="never connects world frame 'world'"):
        list(reader)


def test_camera_frame_with_a_leading_slash_is_refused_as_tf2_refuses_it(bags):
    # tf2 strips one '/' from published frame ids but rejects lookups of one; so does the node.
    with BagFrameReader(bags["mcap"].path, camera_frame="/camera_color_optical_frame") as reader, \
            pytest.raises(BagError, match=r"cannot start with a '/'.*--camera-frame 'camera_color_optical"):
        list(reader)


def test_tree_without_localisation_never_connects(tmp_path):
    bag = write_demo_bag(tmp_path / "noloc", config=DemoBagConfig(frames=3, localisation=False))
    with BagFrameReader(bag.path) as reader, pytest.raises(BagError, match=r"roots: \['map', 'odom'\]|roots"):
        list(reader)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_file_is_a_clear_error(bags, tmp_path, storage):
    import shutil

    dst = tmp_path / storage
    shutil.copytree(bags[storage].path, dst)
    data = next(p for p in dst.iterdir() if p.suffix in (".mcap", ".db3"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(BagError, match="corrupt or truncated"):
        with BagFrameReader(dst) as reader:
            list(reader)


def test_not_a_bag(tmp_path):
    with pytest.raises(BagError, match=r"no metadata\.yaml"):
        BagFrameReader(tmp_path)
    with pytest.raises(BagError, match="not found"):
        BagFrameReader(tmp_path / "missing")


def test_camera_info_distortion_passes_through():
    class Info:
        width, height = 640, 480
        k = (600.0, 0, 320.5, 0, 610.0, 240.5, 0, 0, 1)
        distortion_model = "rational_polynomial"
        d = (0.1, -0.05, 0.001, 0.002, 0.01, 0.0, 0.0, 0.003)

    intr = camera_info_to_intrinsics(Info)
    assert (intr.fx, intr.fy, intr.cx, intr.cy) == (600.0, 610.0, 320.5, 240.5)
    assert intr.distortion_model == "rational_polynomial" and intr.distortion == tuple(Info.d)
    Info.distortion_model = "fisheye"
    with pytest.raises(ValueError, match="fisheye"):
        camera_info_to_intrinsics(Info)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_images(tmp_path, fmt):
    bag = write_demo_bag(tmp_path / fmt, config=DemoBagConfig(frames=3, compressed=fmt, with_depth=False))
    assert bag.counts[DEMO_TOPICS["image"] + "/compressed"] == 3
    with pytest.raises(BagError, match="image topic '/camera/color/image_raw' not in the bag"):
        BagFrameReader(bag.path)
    with BagFrameReader(bag.path, BagTopics(image=DEMO_TOPICS["image"] + "/compressed")) as reader:
        frames = list(reader)
    assert len(frames) == 3
    rgb, _ = bag.room.render(bag.T_world_cam[1], bag.intrinsics)
    err = np.abs(frames[1].image.astype(int) - rgb).mean()
    assert err == 0 if fmt == "png" else 0 < err < 8  # png is lossless, jpeg at quality 90 is close


def test_depth_joins_in_either_order(tmp_path):
    bag = write_demo_bag(tmp_path / "late", config=DemoBagConfig(frames=5, depth_after_image=True))
    with BagFrameReader(bag.path, DEPTH) as reader:
        frames = list(reader)
    assert reader.stats.with_depth == 5 and [f.stamp_ns for f in frames] == bag.stamps_ns.tolist()
    _, depth = bag.room.render(frames[2].T_world_cam, frames[2].intrinsics)
    valid = np.isfinite(depth) & (depth > 0)
    assert np.abs(frames[2].depth_m[valid] - depth[valid]).max() <= 0.0005 + 1e-6
