"""PLY round trip and PNG pictures: exact points back, valid images of the stated size."""

import numpy as np
import pytest
from PIL import Image

from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, look_at_pose
from lerf_ros.tools.pictures import (
    PANEL_SIZE,
    KeyframeView,
    best_keyframe,
    heat_colours,
    project,
    query_picture,
    save_png,
)
from lerf_ros.tools.ply import VERTEX_DTYPE, read_ply, write_ply


def test_ply_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(500, 3)).astype(np.float32)
    rel = rng.uniform(size=500).astype(np.float32)
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    path = write_ply(tmp_path / "c.ply", xyz, rel, rgb, frame_id="map")
    head = path.read_bytes()[:400]
    assert head.startswith(b"ply\nformat binary_little_endian 1.0\n") and b"element vertex 500\n" in head
    assert path.stat().st_size == head.index(b"end_header\n") + 11 + 500 * VERTEX_DTYPE.itemsize
    back = read_ply(path)
    np.testing.assert_array_equal(back.xyz, xyz)
    np.testing.assert_array_equal(back.relevancy, rel)
    np.testing.assert_array_equal(back.rgb, rgb)
    assert back.frame_id == "map"


def test_ply_empty_and_bad_input(tmp_path):
    back = read_ply(write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3), np.uint8)))
    assert back.xyz.shape == (0, 3)
    with pytest.raises(ValueError, match="point count mismatch"):
        write_ply(tmp_path / "x.ply", np.zeros((3, 3)), np.zeros(2), np.zeros((3, 3), np.uint8))
    (tmp_path / "t.ply").write_bytes((tmp_path / "e.ply").read_bytes().replace(b"vertex 0", b"vertex 9"))
    with pytest.raises(ValueError, match="truncated"):
        read_ply(tmp_path / "t.ply")


def test_heat_colours_monotone_brightness():
    c = heat_colours(np.linspace(0, 1, 11)).astype(int).sum(1)
    assert np.all(np.diff(c) > 0)
    assert heat_colours([-1.0])[0].tolist() == heat_colours([0.0])[0].tolist()


def test_best_keyframe_prefers_centred_near_view():
    intr = default_intrinsics()
    target = np.array([0.5, 0.3, 0.2])
    views = [
        KeyframeView(np.zeros((72, 96, 3), np.uint8), intr, look_at_pose([-1.5, 0, 1], [-3, 0, 0])),  # away
        KeyframeView(np.zeros((72, 96, 3), np.uint8), intr, look_at_pose([2.0, 1.5, 1], [0.5, 0.0, 0.2])),
        KeyframeView(np.zeros((72, 96, 3), np.uint8), intr, look_at_pose([1.5, 0.3, 1], target)),  # centred
    ]
    uv, _z = project(target[None], intr, views[2].T_world_cam)
    np.testing.assert_allclose(uv[0], [intr.cx, intr.cy], atol=1e-9)
    assert best_keyframe(views, target) == 2
    assert best_keyframe(views[:1], target) is None


def test_query_picture_size_and_determinism(tmp_path):
    room = SyntheticRoom(0)
    intr = default_intrinsics()
    obj = room.object("red box")
    poses = [look_at_pose([1.6 * np.cos(a), 1.6 * np.sin(a), 1.2], [0, 0, 0.3]) for a in (0.3, 1.2, 2.5)]
    views = [KeyframeView(room.render(T, intr)[0], intr, T) for T in poses]
    rng = np.random.default_rng(1)
    xyz = rng.uniform(room.bounds[0], room.bounds[1] * [1, 1, 0.1], (2000, 3))
    rel = np.exp(-np.linalg.norm(xyz[:, :2] - obj.center[:2], axis=1) ** 2 / 0.1)
    rgb = rng.integers(0, 256, (2000, 3)).astype(np.uint8)
    boxes = [(o.name, o.box_min, o.box_max) for o in room.objects]
    pic = query_picture(views, xyz, rel, rgb, obj.center, "red box", boxes)
    assert pic.size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])
    a = save_png(pic, tmp_path / "a.png")
    b = save_png(query_picture(views, xyz, rel, rgb, obj.center, "red box", boxes), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        im.verify()
    with Image.open(a) as im:
        assert im.format == "PNG" and im.size == (1280, 480) and im.mode == "RGB"
        arr = np.asarray(im)
    # The target cross (cyan) is drawn in both panels.
    cyan = np.all(arr == [0, 255, 255], axis=2)
    assert cyan[:, :640].sum() > 20 and cyan[:, 640:].sum() > 20
    # Not-found query (no target) still draws both panels.
    pic2 = query_picture(views, xyz, rel * 0.1, rgb, None, "orange cone")
    assert pic2.size == (1280, 480)
