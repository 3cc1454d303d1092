"""Synthetic room: hand-computed depths, colours, ground-truth boxes, determinism, TF rig."""

import numpy as np
import pytest

from lerf_ros.core.frames.camera import CameraIntrinsics
from lerf_ros.core.frames.transforms import make_transform, validate_rigid
from lerf_ros.sim.scene import (
    AMBIENT,
    LIGHT_DIR,
    R_LINK_OPTICAL,
    SyntheticRoom,
    camera_rig,
    default_intrinsics,
    heldout_poses,
    look_at_pose,
    make_frames,
    orbit_trajectory,
    robot_path,
)

# 5 x 5 camera, principal point on pixel (2, 2), one pixel = 0.25 in normalised coordinates.
SMALL = CameraIntrinsics(5, 5, 4.0, 4.0, 2.0, 2.0)
# Odd size so the principal point (47, 35) is a pixel centre.
ODD = default_intrinsics(95, 71)


@pytest.fixture(scope="module")
def room():
    return SyntheticRoom(seed=0)


def _chroma(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 1.0)


def test_wall_and_floor_depth_by_hand(room):
    # At (0, 0, 1.2) looking along +x: every pixel that hits the x = 2 wall is 2.0 m deep along the
    # optical axis, whatever its column; nothing stands 1.2 m high in between.
    rgb, depth = room.render(look_at_pose([0.0, 0.0, 1.2], [1.0, 0.0, 1.2]), SMALL)
    assert depth.dtype == np.float32 and rgb.shape == (5, 5, 3)
    np.testing.assert_allclose(depth[1:4], 2.0, atol=1e-6)
    # Wall colour: off-white/grey, low saturation.
    assert _chroma(rgb[2, 2]).min() > 0.85
    # From (-1.5, 0, 1.2), pixel (2, 4) looks down with slope 0.5: hits the floor 2.4 m ahead at
    # x = 0.9, y = 0 (clear of the objects), i.e. depth 1.2 / 0.5.
    _, depth = room.render(look_at_pose([-1.5, 0.0, 1.2], [0.0, 0.0, 1.2]), SMALL)
    assert depth[4, 2] == pytest.approx(2.4, abs=1e-6)
    np.testing.assert_allclose(depth[2, :], 3.5, atol=1e-6)  # the x = 2 wall, 3.5 m ahead


def test_object_tops_depth_and_colour_by_hand(room):
    # Looking straight down from 2.0 m onto each object's centre: depth = 2.0 - top height, and the
    # colour is the base colour times the Lambert shade of an upward normal.
    R_down = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    shade = AMBIENT + (1 - AMBIENT) * LIGHT_DIR[2]
    for k, obj in enumerate(room.objects):
        T = make_transform(R_down, [obj.center[0], obj.center[1], 2.0])
        rgb, depth = room.render(T, SMALL)
        assert depth[2, 2] == pytest.approx(2.0 - obj.box_max[2], abs=1e-6), obj.name
        np.testing.assert_array_equal(rgb[2, 2], np.rint(np.array(obj.rgb) * shade).astype(np.uint8))
        assert room.render_labels(T, SMALL)[2, 2] == k


def test_projected_centre_rendered_in_object_colour(room):
    for k, obj in enumerate(room.objects):
        radial = obj.center[:2] / np.linalg.norm(obj.center[:2])
        eye = np.r_[obj.center[:2] + 1.0 * radial, 0.9]  # outside the ring, looking inwards and down
        T = look_at_pose(eye, obj.center)
        rgb, _ = room.render(T, ODD)
        # Project the centre with K: it must land on the principal point pixel.
        p_cam = np.linalg.inv(T) @ np.r_[obj.center, 1.0]
        u = ODD.fx * p_cam[0] / p_cam[2] + ODD.cx
        v = ODD.fy * p_cam[1] / p_cam[2] + ODD.cy
        assert (u, v) == (pytest.approx(47.0), pytest.approx(35.0))
        pixel = rgb[35, 47].astype(np.float64)
        np.testing.assert_allclose(_chroma(pixel), _chroma(obj.rgb), atol=0.03, err_msg=obj.name)
        ratio = pixel.max() / max(obj.rgb)
        assert 0.5 - 0.01 <= ratio <= 1.0 + 0.01, (obj.name, ratio)
        assert room.render_labels(T, ODD)[35, 47] == k


def test_ground_truth_boxes_contain_and_fit_surface_points(room):
    intr = default_intrinsics()
    frames = make_frames(room, orbit_trajectory(room, 12), intr)
    v, u = np.mgrid[0 : intr.height, 0 : intr.width].astype(np.float64)
    rays = np.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, np.ones_like(u)], -1)
    for obj in room.objects:
        pts = []
        for f in frames:
            # Select the object by colour alone (not by label) and back-project its depth.
            mask = np.abs(_chroma(f.image) - _chroma(obj.rgb)).max(axis=-1) < 0.04
            p_cam = rays[mask] * f.depth_m[mask, None]
            pts.append(p_cam @ f.T_world_cam[:3, :3].T + f.T_world_cam[:3, 3])
        pts = np.concatenate(pts)
        assert len(pts) > 200, (obj.name, len(pts))
        assert np.all(pts >= obj.box_min - 1e-4) and np.all(pts <= obj.box_max + 1e-4), obj.name
        # The box is tight: the seen surface reaches within 3 cm of the top and of both sides in x, y.
        assert pts[:, 2].max() > obj.box_max[2] - 0.03
        assert np.all(pts[:, :2].min(axis=0) < obj.box_min[:2] + 0.03)
        assert np.all(pts[:, :2].max(axis=0) > obj.box_max[:2] - 0.03)


def test_layout_names_and_bounds(room):
    assert room.names == (
        "red box",
        "green sphere",
        "blue cylinder",
        "yellow box",
        "cyan sphere",
        "magenta cylinder",
    )
    assert set(room.absent_names).isdisjoint(room.names)
    np.testing.assert_array_equal(room.bounds, [[-2, -2, 0], [2, 2, 2.5]])
    for seed in range(12):
        objs = SyntheticRoom(seed).objects
        for i, a in enumerate(objs):
            assert 0.25 <= a.size.max() <= 0.5 and a.box_min[2] == 0.0
            assert np.all(a.box_min[:2] > -1.4) and np.all(a.box_max[:2] < 1.4)  # inside the camera loop
            for b in objs[i + 1 :]:
                overlap = np.minimum(a.box_max, b.box_max) - np.maximum(a.box_min, b.box_min)
                assert overlap[:2].min() < 0, (seed, a.name, b.name)
    with pytest.raises(ValueError, match="orange cone"):
        room.object("orange cone")


def test_determinism_by_seed():
    intr = default_intrinsics()
    T = orbit_trajectory(SyntheticRoom(0), 5)[2]
    a, b, c = SyntheticRoom(3), SyntheticRoom(3), SyntheticRoom(4)
    rgb_a, depth_a = a.render(T, intr)
    rgb_b, depth_b = b.render(T, intr)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(depth_a, depth_b)
    assert np.abs(rgb_a.astype(int) - c.render(T, intr)[0]).mean() > 1.0
    assert not np.allclose(a.objects[0].center, c.objects[0].center)
    np.testing.assert_allclose(SyntheticRoom(0).objects[0].center, [0.75 * np.cos(np.pi / 6), 0.375, 0.2])
    for p, q in zip(orbit_trajectory(a, 6, seed=1), orbit_trajectory(b, 6, seed=1), strict=True):
        np.testing.assert_array_equal(p, q)


def test_trajectories_stay_inside_and_look_at_objects(room):
    intr = default_intrinsics()
    train, held = orbit_trajectory(room, 16), heldout_poses(room, 6)
    for T in train + held:
        validate_rigid(T)
        assert np.all(np.abs(T[:2, 3]) < 1.9) and 0.8 < T[2, 3] < 1.4
        forward = T[:3, 2]
        assert -0.7 < forward[2] < -0.2  # pitched down, mildly
        assert (room.render_labels(T, intr) >= 0).mean() > 0.05  # objects in view
    dist = np.linalg.norm(
        np.array([T[:3, 3] for T in held])[:, None] - np.array([T[:3, 3] for T in train])[None], axis=2
    )
    assert dist.min() > 0.1  # held-out views are off the training path
    with pytest.raises(ValueError, match="radius"):
        orbit_trajectory(room, 4, radius_m=2.5)


def test_intrinsics_and_frames(room):
    intr = default_intrinsics(96, 72, 75.0)
    assert intr.fx == pytest.approx(48.0 / np.tan(np.radians(37.5)))
    assert (intr.cx, intr.cy) == (47.5, 35.5)
    frames = make_frames(room, orbit_trajectory(room, 3), intr, t0_ns=10, dt_ns=5)
    assert [f.stamp_ns for f in frames] == [10, 15, 20]
    for f in frames:
        f.validate()
        assert f.depth_m.shape == (72, 96) and np.all(f.depth_m > 0.1)
    with pytest.raises(ValueError, match="T_world_cam"):
        room.render(np.diag([1.0, 1.0, 2.0, 1.0]), intr)


def test_rig_decomposition_reproduces_poses(room):
    rig = camera_rig()
    np.testing.assert_array_equal(rig.T_link_optical[:3, :3], R_LINK_OPTICAL)
    # Optical z (forward) is camera_link x, optical x (right) is camera_link -y.
    np.testing.assert_allclose(R_LINK_OPTICAL @ [0, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(R_LINK_OPTICAL @ [1, 0, 0], [0, -1, 0])
    poses = orbit_trajectory(room, 20)
    path = robot_path(poses, rig, drift_m=0.05, drift_yaw_deg=2.0)
    for i, T in enumerate(poses):
        chain = path.T_map_odom[i] @ path.T_odom_base[i] @ rig.T_base_link @ rig.T_link_optical
        np.testing.assert_allclose(chain, T, atol=1e-9)
        validate_rigid(path.T_odom_base[i])
        # The robot base stays near the floor and nearly upright (rig pitch ~ trajectory pitch).
        assert abs(path.T_odom_base[i][2, 3]) < 0.2 and path.T_odom_base[i][2, 2] > 0.98
    np.testing.assert_allclose(path.T_map_odom[0], np.eye(4), atol=1e-12)
    assert np.linalg.norm(path.T_map_odom[-1][:3, 3]) == pytest.approx(0.05 * np.hypot(1, 0.5))


def test_surface_points_project_back_to_their_pixels(room):
    # Agreement with the core's camera model: the traced surface point of pixel (u, v) projects
    # to (u, v) at z = rendered depth.
    from lerf_ros.core.frames.camera import project_points

    intr = default_intrinsics(40, 30)
    T = orbit_trajectory(room, 7)[3]
    depth, _, points, _ = room.trace(T, intr)
    uv, z = project_points(points.reshape(-1, 3), T, intr)
    v, u = np.mgrid[0:30, 0:40]
    np.testing.assert_allclose(uv, np.stack([u.ravel(), v.ravel()], 1), atol=1e-6)
    np.testing.assert_allclose(z, depth.ravel(), atol=1e-9)
