"""Scene box from what the cameras see: a robot-height RGB-only camera still gets the floor inside."""

import numpy as np
import pytest

from lerf_ros.core.camera import CameraIntrinsics
from lerf_ros.core.fields.scene_box import SceneBox
from lerf_ros.core.frame import Frame
from lerf_ros.core.scene_region import BELOW_GROUND_M, derive_box, frustum_ends, inside_fraction
from lerf_ros.core.transforms import make_transform

INTR = CameraIntrinsics(40, 30, 30.0, 30.0, 19.5, 14.5)


def _robot_frame(x: float, yaw_deg: float = 0.0, height: float = 1.1, pitch_down_deg: float = 30.0,
                 depth: float | None = None) -> Frame:
    """Optical frame of a camera at (x, 0, height) looking along world yaw, pitched down."""
    yaw, p = np.radians(yaw_deg), np.radians(pitch_down_deg)
    fwd = np.array([np.cos(yaw) * np.cos(p), np.sin(yaw) * np.cos(p), -np.sin(p)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(fwd, right)
    T = make_transform(np.stack([right, down, fwd], axis=1), [x, 0.0, height])
    d = None if depth is None else np.full((30, 40), depth, np.float32)
    return Frame(np.zeros((30, 40, 3), np.uint8), INTR, T, 0, d)


def test_frustum_rays_end_on_the_floor_or_at_max_range():
    f = _robot_frame(0.0)
    ends = frustum_ends(f, 5.0, 0.0)
    dist = np.linalg.norm(ends - f.T_world_cam[:3, 3], axis=1)
    on_floor = np.isclose(ends[:, 2], 0.0)
    assert on_floor.any() and (~on_floor).any()  # the lower rows hit the floor, the upper ones do not
    assert np.all(dist[~on_floor] == pytest.approx(5.0)) and np.all(dist[on_floor] <= 5.0 + 1e-9)
    # the optical axis, 30 deg down from 1.1 m, meets the floor 1.1 / tan(30 deg) ahead
    centre = frustum_ends(f, 50.0, 0.0)[len(ends) // 2]
    assert centre[0] == pytest.approx(1.1 / np.tan(np.radians(30.0)), abs=1e-6)


def test_rgb_only_box_reaches_the_floor_without_wasting_much_below_it():
    frames = [_robot_frame(x, yaw) for x, yaw in ((0.0, 0.0), (0.5, 90.0), (1.0, 200.0))]
    box = derive_box(frames, margin_m=0.5, max_range_m=5.0, ground_z=0.0)
    assert box.min_xyz[2] == pytest.approx(-BELOW_GROUND_M)  # floor inside, 25 cm below it at most
    assert box.max_xyz[2] > 1.1  # the cameras and what they see above them
    # the floor in front of the first camera is inside the box (the old camera-position box missed it)
    assert inside_fraction(frames[0], box, 5.0, 0.0) > 0.9
    old = SceneBox.from_camera_positions([f.T_world_cam[:3, 3] for f in frames], 1.0)
    assert old.min_xyz[2] > 0.0


def test_measured_depth_still_bounds_the_box_and_no_ground_plane_is_allowed():
    frames = [_robot_frame(0.0, depth=2.0), _robot_frame(0.5, 90.0, depth=2.0)]
    box = derive_box(frames, margin_m=0.1, max_range_m=50.0, ground_z=0.0)
    assert max(box.max_xyz) < 5.0  # from the 2 m depth, not from the 50 m range
    free = derive_box([_robot_frame(0.0)], margin_m=0.1, max_range_m=3.0, ground_z=None)
    assert free.min_xyz[2] < -0.5  # no ground plane: the frustum continues below z = 0


def test_engine_counts_keyframes_looking_out_of_a_given_box_and_refuses_a_box_never_seen():
    import dataclasses

    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset

    base = make_preset("tiny")
    frames = [_robot_frame(0.0), _robot_frame(0.0, 180.0)]  # looking along +x, then along -x
    box_cfg = dataclasses.replace(base.scene, box_min=(0.0, -2.0, -0.2), box_max=(4.0, 2.0, 2.0))
    engine = LERFEngine(dataclasses.replace(base, scene=box_cfg), "cpu")
    engine.store.add(frames[0])
    engine.store.add(frames[1])
    engine.scene_box = engine._derive_box()
    assert engine.keyframes_outside_box() == 1  # the camera looking away from the box
    far = dataclasses.replace(base.scene, box_min=(50.0, 50.0, 0.0), box_max=(51.0, 51.0, 1.0))
    engine2 = LERFEngine(dataclasses.replace(base, scene=far), "cpu")
    engine2.store.add(frames[0])
    with pytest.raises(ValueError, match="no keyframe sees inside the scene box"):
        engine2._derive_box()
