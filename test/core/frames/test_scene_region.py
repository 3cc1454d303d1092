"""Scene box from what the cameras see: a robot-height RGB-only camera still gets the floor inside."""

import numpy as np
import pytest

from lerf_ros.core.fields.scene_box import SceneBox
from lerf_ros.core.frames.camera import CameraIntrinsics
from lerf_ros.core.frames.frame import Frame
from lerf_ros.core.frames.scene_region import BELOW_GROUND_M, derive_box, frustum_ends, inside_fraction
from lerf_ros.core.frames.transforms import make_transform

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
    # the 0.1 m margin is not spent below the floor: at most BELOW_GROUND_M under the lowest point seen
    from lerf_ros.core.language.candidates import lift_depth

    lowest = min(float(lift_depth(f, 1)[:, 2].min()) for f in frames)
    assert min(0.0, lowest) - BELOW_GROUND_M - 1e-9 <= box.min_xyz[2] <= lowest
    high = [_robot_frame(0.0, pitch_down_deg=0.0, height=3.0, depth=2.0)]  # everything seen is above 2 m
    # the clamp only ever raises the bottom: here it stays 1 m (the margin) under what was seen
    assert derive_box(high, margin_m=1.0, max_range_m=50.0, ground_z=0.0).min_xyz[2] > 1.0
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


def test_a_derived_box_refits_once_most_keyframes_see_beyond_it():
    """A live robot's box comes from its first keyframes (here: looking along +x); once most keyframes see
    the other side of the room (-x), the fields start over in a box holding both; a given box never."""
    import dataclasses

    from lerf_ros.core import engine as engine_mod
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset

    base = make_preset("tiny")
    cfg = dataclasses.replace(base, ingest=dataclasses.replace(base.ingest, min_keyframes=2),
                              scene=dataclasses.replace(base.scene, margin_m=0.2))
    rng = np.random.default_rng(0)

    def textured(f, i):  # sharp content, increasing stamps: every frame passes the keyframe filters
        return dataclasses.replace(f, image=rng.integers(0, 255, (30, 40, 3), dtype=np.uint8),
                                   stamp_ns=i * 1_000_000_000)

    ahead = [textured(_robot_frame(x, 0.0, depth=2.0), i) for i, x in enumerate((0.0, 0.4))]
    behind = [textured(_robot_frame(x, 180.0, depth=2.0), i + 2) for i, x in enumerate((0.2, 0.6, -0.2))]
    engine = LERFEngine(cfg, "cpu")
    for f in ahead:
        assert engine.add_frame(f).keyframe
    while engine.train_step < 3:
        engine.step(3)
    first = engine.scene_box
    assert first.min_xyz[0] > -0.5  # nothing behind the cameras yet
    for f in behind:
        assert engine.add_frame(f).keyframe
    while engine.status().keyframes_pending:
        engine.step(0)
    assert engine.keyframes_outside_box() == 3
    engine._box_checked_step = -engine_mod.REFIT_CHECK_STEPS  # due now
    engine.step(1)
    assert engine._box_refits == 1 and engine.train_step == 1  # the fields started over
    assert engine.scene_box.min_xyz[0] < -1.5 and engine.scene_box.max_xyz[0] >= first.max_xyz[0]
    assert engine.keyframes_outside_box() == 0 and len(engine.store) == 5
    engine._box_checked_step = -engine_mod.REFIT_CHECK_STEPS
    engine.step(1)
    assert engine._box_refits == 1  # nothing left outside: no second refit
    given = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, box_min=(0.0, -2.0, -0.2),
                                                                box_max=(4.0, 2.0, 2.0)))
    fixed = LERFEngine(given, "cpu")
    for f in ahead + behind:
        fixed.add_frame(f)
    while fixed.train_step < 3:
        fixed.step(3)
    fixed._box_checked_step = -engine_mod.REFIT_CHECK_STEPS
    fixed.step(1)
    assert fixed._box_refits == 0 and fixed.scene_box.max_xyz == (4.0, 2.0, 2.0)


def test_tightened_box_holds_the_rendered_surfaces_and_cameras_inside_the_old_box():
    from lerf_ros.core.frames.scene_region import box_volume, tightened_box

    rng = np.random.default_rng(0)
    box = SceneBox((-10.0, -10.0, -0.25), (10.0, 10.0, 3.0))
    room = rng.uniform((-1.0, -2.0, 0.0), (2.0, 1.0, 1.5), (2000, 3))
    far = np.full((50, 3), 40.0)  # beyond the box (contracted space): ignored
    cams = np.array([[0.0, 0.0, 1.1], [2.5, 0.0, 1.1]])
    t = tightened_box(box, cams, [room, far], margin_m=0.5)
    lo, hi = np.asarray(t.min_xyz), np.asarray(t.max_xyz)
    assert np.all(lo >= np.asarray(box.min_xyz)) and np.all(hi <= np.asarray(box.max_xyz))
    np.testing.assert_allclose(lo[:2], np.percentile(room, 1, axis=0)[:2] - 0.5, atol=1e-9)
    assert hi[0] == pytest.approx(3.0)  # the second camera, 2.5 m, plus the margin
    assert lo[2] == pytest.approx(-0.25)  # never below the old box's floor
    assert box_volume(t) < 0.1 * box_volume(box)
    assert tightened_box(box, cams, [far], margin_m=0.5) is None


def test_an_rgb_only_frustum_box_shrinks_to_the_rendered_room_and_stays_there(monkeypatch):
    """A camera looking nearly level reaches max_range_m everywhere; once the model renders the room's
    surfaces (here: a stand-in renderer returning 2 m everywhere), the box is cut down to them, once, and
    the frusta no longer count as "outside" it."""
    import dataclasses

    from lerf_ros.core import engine as engine_mod
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.frames.scene_region import box_volume
    from lerf_ros.core.language import candidates
    from lerf_ros.core.presets import make_preset

    base = make_preset("tiny")
    cfg = dataclasses.replace(base, ingest=dataclasses.replace(base.ingest, min_keyframes=2),
                              scene=dataclasses.replace(base.scene, margin_m=0.3, max_range_m=8.0))
    rng = np.random.default_rng(1)
    frames = [dataclasses.replace(_robot_frame(x, yaw, pitch_down_deg=10.0),
                                  image=rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), stamp_ns=i * 10**9)
              for i, (x, yaw) in enumerate(((0.0, 0.0), (0.3, 120.0), (0.6, 240.0)))]
    monkeypatch.setattr(engine_mod, "TIGHTEN_MIN_STEPS", 2)

    def two_metres(model, kf, stride, device, chunk=4096):
        h, w = kf.image.shape[:2]
        return np.full(((h + stride - 1) // stride, (w + stride - 1) // stride), 2.0, np.float32)

    monkeypatch.setattr(candidates, "render_depth_grid", two_metres)
    engine = LERFEngine(cfg, "cpu")
    for f in frames:
        assert engine.add_frame(f).keyframe
    while engine.train_step < 3:
        engine.step(3)
    first = engine.scene_box
    assert engine.box_source == "frusta" and max(first.max_xyz) > 7.0  # the 8 m range
    # due at once: no waiting for the next multiple of REFIT_CHECK_STEPS (the fields would be lost anyway)
    assert engine.train_step - engine._box_checked_step < engine_mod.REFIT_CHECK_STEPS
    engine.step(1)
    assert engine.box_source == "rendered" and engine._box_refits == 1 and engine.train_step == 1
    assert box_volume(engine.scene_box) < 0.2 * box_volume(first)
    assert max(engine.scene_box.max_xyz[:2]) < 2.0 + 0.6 + 0.3 + 1e-6  # 2 m ahead + the cameras' spread
    while engine.train_step < 3:
        engine.step(3)
    assert engine.keyframes_outside_box() == 0  # judged by the rendered surfaces, not the frusta
    engine._box_checked_step = -engine_mod.REFIT_CHECK_STEPS
    tight = engine.scene_box
    engine.step(1)
    assert engine._box_refits == 1 and engine.scene_box == tight  # no growing back to the frusta
