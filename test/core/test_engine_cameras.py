"""One map from two cameras of different image sizes and intrinsics (issue 11, "More than one camera"): a
head camera (96 x 72, 75 deg) that never sees the yellow box and a wrist camera (80 x 45, 87 deg) that
circles it (`lerf_ros.sim.two_cameras`). Both cameras' keyframes are kept (each judged against its own last
keyframe), features are computed per image size, training samples rays inside each keyframe's own image,
and the map locates objects that only one camera saw; a saved map and a journal keep every keyframe's size
and camera. Tiny preset, CPU, RGB-D."""

import dataclasses

import numpy as np
import pytest
import torch

from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.journal import Journal, JournalConfig
from lerf_ros.core.presets import make_preset
from lerf_ros.core.training.trainer import sample_ray_batch
from lerf_ros.sim import two_cameras
from lerf_ros.sim.scene import SyntheticRoom, make_frames

N_HEAD, N_WRIST = 8, 6
GROW_M = 0.10  # answers are the centre of the seen surface: inside the box grown by this much


@pytest.fixture(scope="module")
def room():
    return SyntheticRoom(0)


@pytest.fixture(scope="module")
def frames(room):
    """Head and wrist frames interleaved by stamp, as two drivers deliver them."""
    head = make_frames(room, [two_cameras.head_pose(s) for s in two_cameras.phases(N_HEAD)],
                       two_cameras.HEAD_INTRINSICS, t0_ns=0, dt_ns=300_000_000)
    wrist = make_frames(room, [two_cameras.wrist_pose(room, s) for s in two_cameras.phases(N_WRIST)],
                        two_cameras.WRIST_INTRINSICS, t0_ns=100_000_000, dt_ns=400_000_000)
    out = [dataclasses.replace(f, camera="head") for f in head]
    out += [dataclasses.replace(f, camera="wrist") for f in wrist]
    return sorted(out, key=lambda f: f.stamp_ns)


def _inside(room, name, location, grow=GROW_M) -> bool:
    obj = room.object(name)
    return location is not None and bool(np.all(location >= obj.box_min - grow)
                                         and np.all(location <= obj.box_max + grow))


def _recorded(frames, journal=None) -> LERFEngine:
    engine = LERFEngine(make_preset("tiny"), "cpu")
    if journal is not None:
        engine.attach_journal(journal)
    for f in frames:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(0)  # features only
    return engine


def test_the_scene_splits_the_objects_between_the_cameras(room, frames):
    """The premise of the other tests: the yellow box is in wrist frames only, the head-only objects in head
    frames only (pixel counts of the exact renderer)."""
    idx = {o.name: k for k, o in enumerate(room.objects)}
    seen = {"head": np.zeros(6, int), "wrist": np.zeros(6, int)}
    for f in frames:
        labels = room.render_labels(f.T_world_cam, f.intrinsics)
        seen[f.camera] += np.array([(labels == k).sum() for k in range(6)])
    wrist_only = idx[two_cameras.WRIST_ONLY]
    assert seen["head"][wrist_only] == 0 and seen["wrist"][wrist_only] > 1000
    for name in two_cameras.HEAD_ONLY:
        assert seen["head"][idx[name]] > 300 and seen["wrist"][idx[name]] == 0, (name, seen)


def test_both_cameras_keyframes_are_kept_with_their_own_size(frames):
    engine = _recorded(frames)
    st = engine.status()
    assert st.keyframes_by_camera == {"head": N_HEAD, "wrist": N_WRIST}
    shapes = {engine.store.get(i).camera: engine.store.get(i).image.shape for i in engine.store.ids()}
    assert shapes == {"head": (72, 96, 3), "wrist": (45, 80, 3)}
    # Features per image size: the crop grid and the DINO map of each keyframe follow its own size.
    layouts = {engine.store.get(i).camera: (engine.pyramid.store.layout(i), engine.dense.store.layout(i)[:2])
               for i in engine.store.ids()}
    assert layouts == {"head": ((72, 96), (72, 96)), "wrist": ((45, 80), (45, 80))}


def test_training_rays_stay_inside_each_keyframes_own_image(frames):
    engine = _recorded(frames)
    ids = engine._ready_ids()
    kf = engine._keyframe_tensors(ids)
    assert kf.images.shape[1:3] == (72, 96) and kf.sizes.tolist().count([80, 45]) == N_WRIST
    batch = sample_ray_batch(kf, 4000, torch.Generator().manual_seed(0), engine.pyramid, engine.dense)
    rows = torch.searchsorted(kf.kf_ids, batch["kf_ids"])
    size = kf.sizes[rows].float()
    uv = batch["uv"]
    assert bool((uv[:, 0] < size[:, 0]).all() and (uv[:, 1] < size[:, 1]).all() and (uv >= 0).all())
    wrist_rows = size[:, 1] == 45
    assert 0.2 < float(wrist_rows.float().mean()) < 0.6  # both cameras' keyframes are drawn
    # A wrist pixel's colour is the wrist image's, not the zero padding below it.
    assert float(batch["rgb"][wrist_rows].mean()) > 0.15
    stats = engine.step(30)
    assert stats.train_steps == 30 and np.isfinite(stats.losses["total"])


def test_the_map_locates_what_only_one_camera_saw(room, frames, tmp_path):
    engine = _recorded(frames)
    names = (two_cameras.WRIST_ONLY, *two_cameras.HEAD_ONLY)
    answers = {n: engine.query(n, with_cloud=False) for n in names}
    for name, a in answers.items():
        assert a.found and a.source == "views", (name, a.message)
        assert _inside(room, name, a.location_world), (name, a.location_world, room.object(name).center)
    # Saved and loaded: every keyframe keeps its size, intrinsics and camera, and the answers stay.
    engine.save(tmp_path / "map")
    loaded = LERFEngine.load(tmp_path / "map", "cpu")
    assert loaded.status().keyframes_by_camera == {"head": N_HEAD, "wrist": N_WRIST}
    for i in engine.store.ids():
        a, b = engine.store.get(i), loaded.store.get(i)
        assert (a.image.shape, a.intrinsics, a.camera) == (b.image.shape, b.intrinsics, b.camera)
    again = loaded.query(two_cameras.WRIST_ONLY, with_cloud=False)
    assert again.found
    np.testing.assert_allclose(again.location_world, answers[two_cameras.WRIST_ONLY].location_world,
                               atol=1e-6)


def test_a_journal_resumes_both_cameras(frames, tmp_path):
    recorded = _recorded(frames, Journal(JournalConfig(str(tmp_path / "j"))))
    resumed = LERFEngine(make_preset("tiny"), "cpu")
    report = Journal(JournalConfig(str(tmp_path / "j"))).resume(resumed)
    assert report.skipped == () and report.keyframes == N_HEAD + N_WRIST
    assert resumed.status().keyframes_by_camera == {"head": N_HEAD, "wrist": N_WRIST}
    for i in recorded.store.ids():
        a, b = recorded.store.get(i), resumed.store.get(i)
        assert (a.image.shape, a.camera) == (b.image.shape, b.camera)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.depth_m, b.depth_m)
