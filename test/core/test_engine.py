"""LERFEngine facade: bad input -> ValueError with the engine unchanged; queries before a model;
training-worker states; presets round trip; maps that do not fit the engine."""

import dataclasses
import json
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from lerf_ros.core import engine as engine_mod
from lerf_ros.core.encoders import EncoderSpec
from lerf_ros.core.engine import LERFEngine, StepStats, _auto_to_torch
from lerf_ros.core.frames.frame import Frame
from lerf_ros.core.frames.scene_region import BELOW_GROUND_M
from lerf_ros.core.language import candidates, query_embed
from lerf_ros.core.language.query_embed import GridFeatureCache, multiscale_embed_fn
from lerf_ros.core.language.relevancy import closest_negative
from lerf_ros.core.model import LanguagePointQueries, LanguageSnapshot
from lerf_ros.core.presets import PRESETS, EngineConfig, IngestConfig, make_preset
from lerf_ros.core.training.engine_lock import PriorityLock
from lerf_ros.core.training.worker import (
    GIL_SWITCH_INTERVAL_S,
    TrainingWorker,
    set_gil_switch_interval,
    torch_threads_for,
)
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

# --------------------------------------------------------------------------- broken encoders


class _BrokenClip:
    """A VisionLanguageEncoder that misbehaves in a chosen way."""

    def __init__(self, mode: str):
        self.mode, self.dim, self.input_size = mode, 4, 8
        self.name = f"broken-{mode}"

    def encode_images(self, images):
        n = images.shape[0]
        if self.mode == "shape":
            return torch.nn.functional.normalize(torch.ones(n, self.dim + 1), dim=1)
        if self.mode == "norm":
            return torch.ones(n, self.dim) * 3.0
        return torch.nn.functional.normalize(torch.ones(n, self.dim), dim=1)

    def encode_texts(self, texts):
        n = len(texts)
        if self.mode == "text_norm":
            return torch.ones(n, self.dim) * 0.1
        return torch.nn.functional.normalize(torch.ones(n, self.dim), dim=1)


def broken_clip(device="cpu", mode="shape"):
    return _BrokenClip(mode)


class _SlowClip(_BrokenClip):
    """A well-behaved encoder that sleeps per image batch once armed and counts batches."""

    def __init__(self):
        super().__init__("ok")
        self.name, self.batches, self.sleep_s = "slow-clip", 0, 0.0

    def encode_images(self, images):
        self.batches += 1
        threading.Event().wait(self.sleep_s)
        return super().encode_images(images)


_SLOW: list[_SlowClip] = []


def slow_clip(device="cpu"):
    _SLOW.append(_SlowClip())
    return _SLOW[-1]


# Encoder specs name an importable "module:factory"; this test module's own import name depends on
# pytest's import mode, so the factory is published under a fixed module name.
_PLUGIN = types.ModuleType("lerf_test_broken_encoders")
_PLUGIN.broken_clip = broken_clip
_PLUGIN.slow_clip = slow_clip
sys.modules[_PLUGIN.__name__] = _PLUGIN
_SPEC = "lerf_test_broken_encoders:broken_clip"


def _tiny(**ingest) -> EngineConfig:
    cfg = make_preset("tiny")
    if ingest:
        cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, **ingest))
    return cfg


@pytest.fixture(scope="module")
def room_frames():
    room = SyntheticRoom(0)
    return make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))


def _snapshot(engine: LERFEngine):
    return (len(engine.store), engine.store.ids(), list(engine._pending), engine.data_version,
            engine.train_step, engine.selector._last_T is None)


# --------------------------------------------------------------------------- bad frames


def _bad_frames(good: Frame):
    T = good.T_world_cam.copy()
    nan_pose = T.copy()
    nan_pose[0, 3] = np.nan
    shear = T.copy()
    shear[:3, :3] = shear[:3, :3] @ np.diag([1.0, 1.2, 1.0])
    i = good.intrinsics
    return {
        "non-finite pose": dataclasses.replace(good, T_world_cam=nan_pose),
        "non-rigid pose": dataclasses.replace(good, T_world_cam=shear),
        "zero focal": dataclasses.replace(good, intrinsics=dataclasses.replace(i, fx=0.0)),
        "negative focal": dataclasses.replace(good, intrinsics=dataclasses.replace(i, fy=-5.0)),
        "size mismatch": dataclasses.replace(good, intrinsics=dataclasses.replace(i, width=i.width + 2)),
        "depth size": dataclasses.replace(good, depth_m=np.ones((3, 3), np.float32)),
        "image dtype": dataclasses.replace(good, image=good.image.astype(np.float32)),
    }


@pytest.mark.parametrize("case", ["non-finite pose", "non-rigid pose", "zero focal", "negative focal",
                                  "size mismatch", "depth size", "image dtype"])
def test_bad_frame_raises_and_changes_nothing(room_frames, case):
    engine = LERFEngine(_tiny(), "cpu")
    engine.add_frame(room_frames[0])
    before = _snapshot(engine)
    with pytest.raises(ValueError):
        engine.add_frame(_bad_frames(room_frames[1])[case])
    assert _snapshot(engine) == before
    # the selector's reference is still frame 0: the next good frame is judged against it
    assert engine.add_frame(room_frames[1]).keyframe


def test_first_bad_frame_leaves_empty_engine(room_frames):
    engine = LERFEngine(_tiny(), "cpu")
    with pytest.raises(ValueError, match="not rigid"):
        engine.add_frame(_bad_frames(room_frames[0])["non-rigid pose"])
    assert len(engine.store) == 0 and engine.selector._last_T is None
    assert engine.add_frame(room_frames[0]).reason == "first"


def test_second_camera_of_another_size_is_its_own_keyframe_stream(room_frames):
    engine = LERFEngine(_tiny(), "cpu")
    engine.add_frame(room_frames[0])
    room = SyntheticRoom(0)
    # A wrist camera of another size: its first frame is "first" (not judged against the head camera's
    # keyframe), the same pose again is redundant for it, and the head camera's next frame still is too.
    wrist = dataclasses.replace(
        make_frames(room, orbit_trajectory(room, 8)[3:4], default_intrinsics(40, 30))[0], camera="wrist")
    assert engine.add_frame(wrist).reason == "first"
    assert engine.add_frame(dataclasses.replace(wrist, stamp_ns=wrist.stamp_ns + 1)).reason == "redundant"
    assert engine.add_frame(dataclasses.replace(room_frames[0], stamp_ns=1)).reason == "redundant"
    st = engine.status()
    assert (st.keyframes, st.keyframes_by_camera) == (2, {"": 1, "wrist": 1})
    assert [engine.store.get(i).image.shape for i in engine.store.ids()] == [(36, 48, 3), (30, 40, 3)]


def test_distortion_undistorted_once_and_downsized(room_frames):
    f = room_frames[0]
    distorted = dataclasses.replace(
        f, intrinsics=dataclasses.replace(f.intrinsics, distortion_model="plumb_bob",
                                          distortion=(0.05, 0.0, 0.0, 0.0, 0.0)))
    engine = LERFEngine(_tiny(max_image_side=24), "cpu")
    res = engine.add_frame(distorted)
    kf = engine.store.get(res.keyframe_id)
    assert kf.intrinsics.distortion_model == "none"
    assert kf.image.shape == (18, 24, 3) and kf.depth_m.shape == (18, 24)
    assert kf.intrinsics.fx == pytest.approx(f.intrinsics.fx * 0.5)


# --------------------------------------------------------------------------- queries


def test_empty_query_raises(room_frames):
    engine = LERFEngine(_tiny(), "cpu")
    for text in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="non-empty"):
            engine.query(text)
    with pytest.raises(ValueError, match="sequence of strings"):
        engine.query("red box", negatives="blue")


def test_query_before_training_not_found(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=3), "cpu")
    r = engine.query("red box")
    assert not r.found and r.message.startswith("no model yet") and r.location_world is None
    assert r.cloud_xyz.shape == (0, 3) and r.model_step == 0
    engine.add_frame(room_frames[0])
    engine.step(5)  # one keyframe with features: below min_keyframes, no training
    r = engine.query("red box")
    assert not r.found and "1 keyframes with features (need 3)" in r.message
    assert engine.status().step == 0 and not engine.ready()


def test_a_cpu_engine_trains_with_denormals_flushed_and_leaves_the_thread_as_it_was(room_frames, monkeypatch):
    """Adam's moments of rarely-touched hash rows go denormal, ~100x slower on a CPU: a step flushes them
    to zero, in the thread that trains, and only during the step (a packed RGB float is a denormal that
    must survive elsewhere; threads started later inherit the flag)."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    for f in room_frames[:3]:
        engine.add_frame(f)
    inside, real = [], engine._step

    def spy(*args, **kwargs):
        inside.append(engine_mod._denormals_flushed())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_step", spy)
    try:
        for already in (False, True):
            torch.set_flush_denormal(already)
            engine.step(2)
            assert inside[-1] is True and engine_mod._denormals_flushed() is already
    finally:
        torch.set_flush_denormal(False)
    assert engine.train_step > 0 and (torch.tensor([1e-39]) * 1.0).item() > 0.0


# --------------------------------------------------------------------------- broken encoders


@pytest.mark.parametrize("mode", ["shape", "norm"])
def test_broken_image_encoder_rejected_at_construction(mode):
    cfg = dataclasses.replace(_tiny(), clip_encoder=EncoderSpec(_SPEC, (("mode", mode),)))
    with pytest.raises(ValueError, match="broken-" + mode):
        LERFEngine(cfg, "cpu")


def test_broken_text_encoder_rejected_at_construction():
    cfg = dataclasses.replace(_tiny(), clip_encoder=EncoderSpec(_SPEC, (("mode", "text_norm"),)))
    with pytest.raises(ValueError, match="non-unit"):
        LERFEngine(cfg, "cpu")


def test_encoder_breaking_later_caught_at_query(room_frames, monkeypatch):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    for f in room_frames[:3]:
        engine.add_frame(f)
    while engine.train_step < 2:
        engine.step(2)

    def bad_texts(texts):
        return torch.ones(len(texts), engine.clip_encoder.dim)  # not unit

    monkeypatch.setattr(engine.clip_encoder, "encode_texts", bad_texts)
    with pytest.raises(ValueError, match="non-unit"):
        engine.query("a never seen text")


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trip(name):
    cfg = make_preset(name)
    back = EngineConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_presets_differ_where_documented():
    tiny, lite, default = (make_preset(n) for n in PRESETS)
    assert default.trainer.rays_per_step == 4096 and lite.trainer.rays_per_step < 4096
    assert tiny.trainer.rays_per_step < 1000
    assert "demo" in tiny.clip_encoder.target and "openclip" in default.clip_encoder.target
    assert "dino" in default.dino_encoder.target
    assert len(default.pyramid.tile_fracs) == 7  # LERF's 7 scales
    with pytest.raises(ValueError, match="unknown preset"):
        make_preset("huge")


def test_from_dict_rejects_unknown_keys():
    d = make_preset("tiny").to_dict()
    d["trainer"]["warp_speed"] = 9
    with pytest.raises(ValueError, match="warp_speed"):
        EngineConfig.from_dict(d)


def test_ingest_config_validation():
    with pytest.raises(ValueError):
        IngestConfig(min_keyframes=0).validate()


# --------------------------------------------------------------------------- worker


class _FakeEngine:
    """Counts steps; ``fail_at`` raises once at that step; 'trainable' only after data arrives."""

    def __init__(self, fail_at=None):
        self.train_step = 0
        self.data_version = 0
        self.has_data = False
        self.fail_at = fail_at
        self.calls = 0
        self._cond = threading.Condition()

    def step(self, n):
        self.calls += 1
        if not self.has_data:
            return StepStats()
        if self.fail_at is not None and self.train_step >= self.fail_at:
            self.fail_at = None
            raise RuntimeError("boom")
        self.train_step += n
        return StepStats(train_steps=n)

    def add(self):
        with self._cond:
            self.has_data = True
            self.data_version += 1
            self._cond.notify_all()

    def wait_for_data(self, version, timeout):
        with self._cond:
            self._cond.wait_for(lambda: self.data_version != version, timeout)
            return self.data_version

    def wake(self):
        with self._cond:
            self._cond.notify_all()


def _wait(pred, timeout=10.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if pred():
            return True
        ev.wait(0.01)
    return pred()


def test_worker_states_and_idle_without_spinning():
    eng = _FakeEngine()
    w = TrainingWorker(eng, steps_per_tick=5, max_steps=20, idle_poll_s=5.0)
    assert w.state == "stopped"
    w.start()
    try:
        assert _wait(lambda: w.state == "waiting" and eng.calls >= 1)
        calls = eng.calls
        threading.Event().wait(0.3)
        assert eng.calls == calls  # blocked on wait_for_data, not polling step()
        eng.add()
        assert _wait(lambda: w.state == "ready")
        assert eng.train_step == 20  # exactly max_steps, last tick trimmed
        w.pause()
        assert _wait(lambda: w.state == "paused")
        w.resume()
        assert _wait(lambda: w.state == "ready")
    finally:
        w.stop(timeout=5)
    assert w.state == "stopped" and not w.alive


def test_worker_started_paused_takes_no_step_until_resumed():
    # A paused node that loads a map starts a fresh worker on it: a step between start() and pause()
    # would train the map the user paused.
    for _ in range(20):  # the race needs the thread to get in first; try it a few times
        eng = _FakeEngine()
        eng.add()
        w = TrainingWorker(eng, steps_per_tick=5, max_steps=20, idle_poll_s=5.0)
        w.start(paused=True)
        try:
            assert w.state == "paused"
            threading.Event().wait(0.02)
            assert eng.train_step == 0 and eng.calls == 0 and w.state == "paused"
        finally:
            w.stop(timeout=5)
    w = TrainingWorker(eng, steps_per_tick=5, max_steps=20, idle_poll_s=5.0)
    w.start(paused=True)
    try:
        w.resume()
        assert _wait(lambda: w.state == "ready") and eng.train_step == 20
    finally:
        w.stop(timeout=5)


def test_gil_switch_interval_is_shortened_once_for_training_beside_python_threads():
    import sys

    before = sys.getswitchinterval()
    try:
        lines = []
        got = set_gil_switch_interval(lines.append)
        assert got == pytest.approx(GIL_SWITCH_INTERVAL_S) == pytest.approx(sys.getswitchinterval())
        assert GIL_SWITCH_INTERVAL_S < 0.005  # under CPython's default (an earlier test may have set it)
        assert lines == ["GIL switch interval: 0.50 ms (training steps wait less for the GIL behind "
                         "Python threads)"]
        # a worker's start shortens a longer interval, and leaves a shorter one as it is
        sys.setswitchinterval(0.005)
        worker = TrainingWorker(_FakeEngine())
        worker.start(paused=True)
        worker.stop()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        sys.setswitchinterval(0.0001)
        worker.start(paused=True)
        worker.stop()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(before)


def test_torch_threads_leave_a_core_to_the_executor_where_training_runs():
    assert torch_threads_for(0, 2) == 1 and torch_threads_for(0, 16) == 15 and torch_threads_for(0, 1) == 1
    assert torch_threads_for(3, 2) == 3 and torch_threads_for(0, None) == 1
    # nothing trains (the query node alone on a map): all the cores, or what was asked for
    assert torch_threads_for(0, 2, trains=False) == 2 and torch_threads_for(0, 1, trains=False) == 1
    assert torch_threads_for(3, 16, trains=False) == 3 and torch_threads_for(0, None, trains=False) == 2


def test_an_omp_num_threads_the_user_set_caps_the_automatic_choice(monkeypatch):
    """OMP_NUM_THREADS set to share the CPU is an upper bound for torch_threads 0, never for an explicit
    torch_threads; unset, empty or not a positive integer: no bound."""
    from lerf_ros.core.training import worker

    assert torch_threads_for(0, 16, omp_limit=4) == 4 and torch_threads_for(0, 16, False, 4) == 4
    assert torch_threads_for(0, 2, omp_limit=8) == 1 and torch_threads_for(6, 16, omp_limit=4) == 6
    assert worker.omp_thread_limit({"OMP_NUM_THREADS": "3"}) == 3
    assert worker.omp_thread_limit({"OMP_NUM_THREADS": "4,2"}) == 4  # one entry per nesting level
    for bad in ({}, {"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "x"}):
        assert worker.omp_thread_limit(bad) is None
    lines = []
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(worker, "available_cpus", lambda: 16)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert worker.set_torch_threads(0, lines.append) == 3 == torch.get_num_threads()
        assert "at most OMP_NUM_THREADS=3" in lines[-1], lines
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert worker.set_torch_threads(0, lines.append, trains=False) == 16
        assert "OMP_NUM_THREADS" not in lines[-1], lines
    finally:
        torch.set_num_threads(before)


def test_available_cpus_follow_the_affinity(monkeypatch):
    """A container's cpuset (or taskset) limits the CPUs, not the machine's count."""
    import os

    from lerf_ros.core.training import worker

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert worker.available_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert worker.available_cpus() == 32


def test_worker_catches_errors_and_recovers():
    eng = _FakeEngine(fail_at=10)
    eng.add()
    w = TrainingWorker(eng, steps_per_tick=5, max_steps=30, idle_poll_s=5.0)
    w.start()
    try:
        assert _wait(lambda: w.state == "error")
        assert w.last_error == "RuntimeError: boom" and w.alive
        assert eng.train_step == 10
        w.resume()
        assert _wait(lambda: w.state == "ready") and eng.train_step == 30
    finally:
        w.stop(timeout=5)


def test_worker_computes_late_keyframes_features_after_step_budget(room_frames):
    """Keyframes arriving after max_steps still get their features: 'ready' means none is pending."""
    eng = LERFEngine(_tiny(min_keyframes=2), device="cpu")
    for frame in room_frames[:3]:
        eng.add_frame(frame)
    w = TrainingWorker(eng, steps_per_tick=2, max_steps=2, idle_poll_s=0.2)
    w.start()
    try:
        assert _wait(lambda: w.state == "ready", timeout=60)
        assert eng.train_step == 2
        late = [eng.add_frame(f) for f in room_frames[3:]]
        assert sum(r.keyframe for r in late) >= 2
        assert _wait(lambda: eng.status().keyframes_pending == 0 and w.state == "ready", timeout=60)
        assert eng.train_step == 2  # the budget holds: features only, no more training
    finally:
        w.stop(timeout=5)


def test_worker_bad_arguments():
    with pytest.raises(ValueError, match="steps_per_tick"):
        TrainingWorker(_FakeEngine(), steps_per_tick=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainingWorker(_FakeEngine(), max_steps=-1)


# --------------------------------------------------------------------------- maps that do not fit


def test_load_rejects_other_encoder_and_shape_mismatch(tmp_path, room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    for f in room_frames[:3]:
        engine.add_frame(f)
    while engine.train_step < 1:
        engine.step(1)
    engine.save(tmp_path / "m")
    manifest_path = tmp_path / "m" / "config.json"
    good = json.loads(manifest_path.read_text())

    other = json.loads(json.dumps(good))
    other["config"]["clip_encoder"]["kwargs"] = [["dim", 20]]  # a different demo encoder -> other name
    manifest_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"config\.json: map was built with clip encoder"):
        LERFEngine.load(tmp_path / "m", "cpu")

    grown = json.loads(json.dumps(good))
    grown["config"]["model"]["language"]["clip_mlp"]["hidden_dim"] += 8  # weights no longer fit
    manifest_path.write_text(json.dumps(grown))
    with pytest.raises(ValueError, match=r"weights\.pt: .* has shape"):
        LERFEngine.load(tmp_path / "m", "cpu")

    manifest_path.write_text(json.dumps(good))
    back = LERFEngine.load(tmp_path / "m", "cpu")
    assert back.train_step == engine.train_step and back.store.ids() == engine.store.ids()
    for k, v in engine.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v)



def test_evicted_keyframes_leave_every_cache(room_frames):
    cfg = _tiny(min_keyframes=2)
    cfg = dataclasses.replace(cfg, keyframes=dataclasses.replace(cfg.keyframes, max_keyframes=3))
    engine = LERFEngine(cfg, "cpu")
    for f in room_frames[:3]:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(1)
    assert engine.pyramid.keyframe_ids() == engine.store.ids() == [0, 1, 2]
    for f in room_frames[3:6]:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(1)
    ids = engine.store.ids()
    assert len(ids) == 3 and 5 in ids  # bounded, newest kept
    assert engine.pyramid.keyframe_ids() == ids and engine.dense.store.ids() == ids
    assert sorted(engine._keyframe_tensors(engine._ready_ids()).kf_ids.tolist()) == ids


def test_a_map_saved_while_a_query_reads_an_evicted_keyframe_holds_only_stored_ones(room_frames, tmp_path):
    """A keyframe evicted while a query scores outside the lock keeps its pyramid entry until the query ends
    (`_evict`); a map saved meanwhile must not hold that entry (the loader refuses features of unknown
    keyframes: a saved map that would not load, seen in the ROS integration test)."""
    cfg = _tiny(min_keyframes=2)
    cfg = dataclasses.replace(cfg, keyframes=dataclasses.replace(cfg.keyframes, max_keyframes=3))
    engine = LERFEngine(cfg, "cpu")
    _train_a_little(engine, room_frames[:3])
    while engine.status().keyframes_pending:
        engine.step(1)
    assert engine.pyramid.keyframe_ids() == engine.store.ids() == [0, 1, 2]
    with engine._readers_lock:  # a query in flight, as `query` counts it while it scores
        engine._readers += 1
    for f in room_frames[3:5]:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(1)
    ids = engine.store.ids()
    assert len(ids) == 3 and set(engine.pyramid.keyframe_ids()) > set(ids)  # the evicted entries wait
    engine.save(tmp_path / "map")
    loaded = LERFEngine.load(tmp_path / "map", "cpu")
    assert loaded.store.ids() == ids and loaded.pyramid.keyframe_ids() == [
        i for i in engine.pyramid.keyframe_ids() if i in ids]
    # a map an earlier version saved in that race (every pyramid entry) loads: the stray entry is dropped
    full = engine.pyramid.state_dict
    engine.pyramid.state_dict = lambda ids=None: full()
    engine.save(tmp_path / "old")
    old = LERFEngine.load(tmp_path / "old", "cpu")
    assert old.store.ids() == ids and old.pyramid.keyframe_ids() == loaded.pyramid.keyframe_ids()
    with engine._readers_lock:
        engine._readers -= 1


def _train_a_little(engine, frames, steps=2):
    for f in frames:
        engine.add_frame(f)
    while engine.train_step < steps:
        engine.step(steps)


def test_scene_box_derived_once_from_cameras_and_depth(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3])
    box = engine.scene_box
    lo, hi = np.array(box.min_xyz), np.array(box.max_xyz)
    margin = engine.config.scene.margin_m
    cams = np.stack([f.T_world_cam[:3, 3] for f in room_frames[:3]])
    assert np.all(lo[:2] <= cams.min(0)[:2] - margin + 1e-9) and np.all(hi >= cams.max(0) + margin - 1e-9)
    # the floor (z = 0) seen in the depth images is inside, with at most BELOW_GROUND_M under it (not the
    # whole margin), and the box stays near the 4 x 4 x 2.5 m room
    assert -BELOW_GROUND_M - 1e-6 <= lo[2] <= -BELOW_GROUND_M + 0.05
    assert np.all(hi - lo < np.array([4.0, 4.0, 2.5]) + 2 * margin + 0.1)
    for f in room_frames[3:6]:  # later keyframes do not move the box: the grids are indexed in it
        engine.add_frame(f)
    engine.step(3)
    assert engine.scene_box == box


def test_scene_box_from_config(room_frames):
    cfg = _tiny(min_keyframes=2)
    cfg = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, box_min=(-2.0, -2.0, 0.0),
                                                            box_max=(2.0, 2.0, 2.5)))
    engine = LERFEngine(cfg, "cpu")
    _train_a_little(engine, room_frames[:3])
    assert engine.scene_box.min_xyz == (-2.0, -2.0, 0.0) and engine.scene_box.max_xyz == (2.0, 2.0, 2.5)


def test_reset_forgets_everything(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3])
    version = engine.data_version
    engine.reset()
    st = engine.status()
    assert (st.step, st.keyframes, st.keyframes_pending, st.ready) == (0, 0, 0, False)
    assert engine.model is None and engine.pyramid.keyframe_ids() == [] and engine.data_version > version
    assert engine.query("red box").message.startswith("no model yet")
    assert engine.add_frame(room_frames[0]).reason == "first"


def test_candidates_from_rendered_depth_without_measured_depth(room_frames):
    frames = [dataclasses.replace(f, depth_m=None) for f in room_frames[:4]]
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, frames, steps=3)
    pts, rgb, views = engine._candidate_points()
    assert pts.shape[0] > 0 and pts.shape == rgb.shape and views.shape == (pts.shape[0],)
    assert torch.isfinite(pts).all() and int(views.max()) >= 1
    # rendered depth changes as the model trains: the training step refreshes a keyframe's grid (the
    # stalest), and a query merges it in without rendering anything itself
    assert engine._candidate_points()[0] is pts
    calls = candidates.render_calls()
    # the refresh's time budget (10 % of the wall time, at the last grid's cost) allows one grid now ...
    engine._refresh_cost, engine._last_refresh = 1.0, time.perf_counter() - 9.5
    engine.step(1)
    assert candidates.render_calls() == calls + 1
    # ... and after a long stretch, several (every stale keyframe here), never more than the cap
    calls = candidates.render_calls()
    engine._refresh_cost, engine._last_refresh = 0.01, time.perf_counter() - 100.0
    engine.step(1)
    assert candidates.render_calls() == calls + min(len(frames), engine_mod.MAX_REFRESH_GRIDS)
    calls = candidates.render_calls()
    assert engine._candidate_points()[0] is not pts
    r = engine.query("red box")
    assert candidates.render_calls() == calls
    assert r.model_step == engine.train_step and isinstance(r.found, bool)


def test_keyframes_without_a_grid_or_with_a_young_models_grid_get_the_larger_share(room_frames, monkeypatch):
    """Right after a start or a box refit, and while new keyframes come in, a query during training cannot
    see what keyframes without a grid show: the refresh then takes URGENT_REFRESH_FRACTION of the wall time
    instead of REFRESH_FRACTION; a grid from a model trained for under URGENT_AGE_RATIO of the steps trained
    now counts as missing. Not while a frustum box waits to be tightened (its grids die with its fields)."""
    monkeypatch.setattr(engine_mod, "URGENT_MIN_STEPS", 0)
    frames = [dataclasses.replace(f, depth_m=None) for f in room_frames[:4]]
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, frames, steps=4)
    engine._candidate_points()  # idle: every keyframe's grid, at step 4
    cache = engine.candidates
    ids = engine.store.ids()
    assert not cache.urgent(ids, 4, engine_mod.URGENT_AGE_RATIO)
    assert not cache.urgent(ids, 8, 0.5) and cache.urgent(ids, 9, 0.5)  # step 4 < half of 9

    def grids_in(seconds_since_last: float) -> int:
        calls = candidates.render_calls()
        engine._refresh_cost, engine._last_refresh = 1.0, time.perf_counter() - seconds_since_last
        engine._render_grids()
        return candidates.render_calls() - calls

    # 2 s at the routine share (0.1 / 0.9 of it: 0.22 s) affords no 1 s grid ...
    assert grids_in(2.0) == 0
    # ... with a keyframe missing its grid, the urgent share (0.4 / 0.6: 1.33 s) affords one
    del cache._grids[ids[-1]]
    assert cache.urgent(ids, engine.train_step, engine_mod.URGENT_AGE_RATIO)
    assert engine.box_source == "frusta" and grids_in(2.0) == 0  # a tightening to come: routine share
    engine.box_source = "rendered"
    assert grids_in(2.0) == 1 and ids[-1] in cache._grids
    # the rendered grids are all current again: back to the routine share
    assert not cache.urgent(ids, engine.train_step, engine_mod.URGENT_AGE_RATIO)
    assert grids_in(2.0) == 0


def test_a_feature_backlog_is_worked_off_for_as_long_as_the_last_call_trained(room_frames):
    """pyramid_keyframes_per_step keyframes get features per step call; while more wait, further ones for
    as long as the previous call spent training (keyframes without features are not trained on)."""
    engine = LERFEngine(_tiny(min_keyframes=2, pyramid_keyframes_per_step=1), "cpu")
    for f in room_frames[:2]:
        engine.add_frame(f)
    while engine.train_step < 1:
        engine.step(1)
    for f in room_frames[2:8]:
        engine.add_frame(f)
    waiting = engine.status().keyframes_pending
    assert waiting >= 4
    engine._last_train_s = 0.0  # the last call took no time training: one keyframe, as configured
    engine.step(1)
    assert engine.status().keyframes_pending == waiting - 1
    engine._last_train_s = 60.0  # a long training call: the whole backlog
    engine.step(1)
    assert engine.status().keyframes_pending == 0
    assert engine._last_train_s < 60.0  # measured again by that call


def test_a_training_call_in_flight_keeps_queries_from_rendering_or_merging(room_frames):
    """A worker's step call waiting for the lock (behind a query storm) still counts as training: a query
    then reads the last merged candidates instead of rendering and merging under the lock."""
    frames = [dataclasses.replace(f, depth_m=None) for f in room_frames[:4]]
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, frames, steps=2)
    engine.query("red box", with_cloud=False)
    for f in room_frames[4:6]:
        engine.add_frame(dataclasses.replace(f, depth_m=None))  # new keyframes without grids
    engine._last_train_time = -1e9  # no step finished lately
    engine._steps_in_flight = 1  # but one is under way
    calls, tensors = candidates.render_calls(), engine.candidates._tensors
    engine.query("red box", with_cloud=False)
    assert candidates.render_calls() == calls and engine.candidates._tensors is tensors
    engine._steps_in_flight = 0  # idle: the query makes the missing grids and merges them itself
    engine.query("red box", with_cloud=False)
    assert candidates.render_calls() > calls and engine.candidates._tensors is not tensors


def test_candidate_grids_render_from_a_copy_outside_the_lock(room_frames, monkeypatch):
    """The worker renders a keyframe's depth grid (seconds for a large image on a CPU) from a frozen copy of
    the model without holding the engine lock; the grid is the one the model itself renders. A model that
    cannot be copied (tinycudann) is rendered from under the lock, as before."""
    frames = [dataclasses.replace(f, depth_m=None) for f in room_frames[:4]]
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, frames, steps=2)
    real = candidates.render_depth_grid
    seen = []

    def watching(model, kf, *a, **k):
        seen.append((engine.lock._owner == threading.get_ident(), model is engine.model))
        return real(model, kf, *a, **k)

    monkeypatch.setattr(candidates, "render_depth_grid", watching)
    engine._refresh_cost, engine._last_refresh = 0.01, time.perf_counter() - 100.0
    engine.step(1)
    assert seen and all(not held and not live for held, live in seen)
    kf_id = max(engine.candidates._grids, key=lambda i: engine.candidates._grids[i][1])
    grid, step = engine.candidates._grids[kf_id]
    assert step == engine.train_step
    want = real(engine.model, engine.store.get(kf_id), engine.config.candidates.pixel_stride, engine.device)
    np.testing.assert_array_equal(grid, want)
    assert engine.model.language is not None and engine._geometry.language is not engine.model.language

    seen.clear()
    monkeypatch.setattr(engine_mod, "geometry_snapshot", lambda model: None)
    engine._refresh_cost, engine._last_refresh = 0.01, time.perf_counter() - 100.0
    engine.step(1)
    assert seen and all(held and live for held, live in seen)


# --------------------------------------------------------------------------- lock fairness


def test_priority_lock_urgent_caller_waits_for_at_most_one_background_hold():
    lock = PriorityLock()
    held, stop = [0], threading.Event()

    def train():  # a training loop that re-takes the lock at once, holding the GIL between holds
        while not stop.is_set():
            with lock.background():
                held[0] += 1
                end = time.perf_counter() + 0.002
                while time.perf_counter() < end:
                    pass

    t = threading.Thread(target=train)
    t.start()
    try:
        assert _wait(lambda: held[0] > 5)
        waits = []
        for _ in range(20):
            before = held[0]
            with lock:
                with lock:  # reentrant
                    waits.append(held[0] - before)
    finally:
        stop.set()
        t.join(5)
    assert max(waits) <= 2, waits  # the hold in progress (+1 that began while this thread read `held`)
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


def test_priority_lock_background_caller_is_not_starved_by_back_to_back_urgent_callers():
    """Two clients that take the lock one after the other without a gap (a query storm) keep an urgent caller
    waiting at every moment: a background caller (a training step, a candidate merge) still goes next once
    it has waited its patience, and an urgent caller then waits for that one hold only."""
    lock = PriorityLock(patience_s=0.05)
    stop = threading.Event()
    urgent_holds = [0]

    def client():
        while not stop.is_set():
            with lock:
                urgent_holds[0] += 1
                end = time.perf_counter() + 0.003
                while time.perf_counter() < end:
                    pass

    clients = [threading.Thread(target=client) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        assert _wait(lambda: urgent_holds[0] > 20)
        waits = []
        for _ in range(10):
            t = time.perf_counter()
            with lock.background():
                waits.append(time.perf_counter() - t)
                time.sleep(0.002)
        before = urgent_holds[0]
        time.sleep(0.05)
        assert urgent_holds[0] > before  # the clients go on between background holds
    finally:
        stop.set()
        for c in clients:
            c.join(5)
    assert max(waits) < 0.05 + 0.5, waits  # its patience, then the client hold in progress (slack: 2 cores)
    assert min(waits) >= 0.03, waits  # it did give way first: the clients always had a caller waiting


def test_query_and_status_while_worker_trains_flat_out(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=1)
    worker = TrainingWorker(engine, steps_per_tick=10)
    worker.start()
    try:
        assert _wait(lambda: engine.train_step >= 3)
        start, waited = engine.train_step, []
        for _ in range(3):
            before = engine.train_step
            waited.append(engine.query("red box", with_cloud=False).model_step - before)
            before = engine.train_step
            waited.append(engine.status().step - before)
        assert _wait(lambda: engine.train_step > start + 2) and worker.alive  # training went on
    finally:
        worker.stop(timeout=30)
    # Each call got the lock after at most the step in progress (+1 begun while reading train_step).
    assert max(waited) <= 2, waited


# --------------------------------------------------------------------------- stop during pyramid work


def test_worker_stop_mid_pyramid_returns_within_a_batch(room_frames):
    cfg = _tiny(min_keyframes=2)
    cfg = dataclasses.replace(cfg, clip_encoder=EncoderSpec(f"{_PLUGIN.__name__}:slow_clip"),
                              pyramid=dataclasses.replace(cfg.pyramid, batch_size=8))
    engine = LERFEngine(cfg, "cpu")
    enc = _SLOW[-1]
    enc.sleep_s = 0.05
    for f in room_frames[:2]:
        engine.add_frame(f)
    assert list(engine._pending) == [0, 1]
    worker = TrainingWorker(engine, steps_per_tick=5)
    enc.batches = 0
    worker.start()
    assert _wait(lambda: enc.batches >= 2)
    at_stop = enc.batches
    worker.stop(timeout=10)
    assert enc.batches <= at_stop + 1, (at_stop, enc.batches)  # the batch in flight, no more
    # nothing half-built was stored; the keyframe went back to the front of the queue
    assert engine.pyramid.keyframe_ids() == [] and engine.dense.store.ids() == []
    assert list(engine._pending) == [0, 1] and not engine.cancel_event.is_set()
    enc.sleep_s = 0.0
    assert engine.step(1).pyramid_keyframes == 2 and engine.pyramid.keyframe_ids() == [0, 1]  # tiny: 2


# --------------------------------------------------------------------------- multiscale query embedding


def test_multiscale_embed_matches_per_scale_and_evaluates_grids_once_per_block(room_frames, monkeypatch):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    model = engine.model.eval()
    pts = engine._candidate_points()[0][:40]
    scales = engine.config.query.scales_m
    calls = {"multi": 0, "single": 0}
    multi, single = model.clip_multiscale, model.clip_at_points

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(model, "clip_multiscale", count("multi", multi))
    fn = multiscale_embed_fn(model, scales, budget_bytes=pts.shape[0] * model.clip_dim * 4 * 5)
    with torch.no_grad():
        for s in torch.tensor(scales, dtype=torch.float32).tolist():  # as scale_search passes them
            torch.testing.assert_close(fn(pts, s), single(pts, s), atol=1e-5, rtol=1e-5)
        assert calls["multi"] == -(-len(scales) // 5)  # one grid pass per block of 5 scales
        torch.testing.assert_close(fn(pts, 0.1234), single(pts, 0.1234))  # not a configured scale

        # a subset at its own scales is read from the block held (the last one: scales 10 and 11)
        calls["multi"] = 0
        idx = torch.tensor([3, 17, 17, 39])
        own = torch.tensor([scales[10], scales[11], scales[10], scales[11]], dtype=torch.float32)
        got = fn.rows(pts, idx, own)
        want = torch.stack([single(pts[i:i + 1], float(s))[0]
                            for i, s in zip(idx.tolist(), own.tolist(), strict=True)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert calls["multi"] == 0
        assert fn.rows(pts, idx, own.fill_(float(scales[0]))) is None  # a scale the block does not hold
        assert fn.rows(pts.clone(), idx, own.fill_(float(scales[10]))) is None  # not the block's points

    # the engine's queries read a copy of the language field (`LanguageSnapshot`): counted on the class
    calls["multi"] = 0
    monkeypatch.setattr(LanguagePointQueries, "clip_multiscale",
                        count("multi", LanguagePointQueries.clip_multiscale))
    monkeypatch.setattr(LanguagePointQueries, "clip_at_points",
                        count("single", LanguagePointQueries.clip_at_points))
    r = engine.query("red box", with_cloud=False)
    assert r.model_step == 2 and calls == {"multi": 1, "single": 0}  # all scales from one pass


def test_query_scores_outside_the_lock_and_keeps_evicted_crops_until_it_ends(room_frames, monkeypatch):
    """While a query scores, training steps and frames go on (they used to wait for it), the query reads
    the weights of its own step, and a keyframe evicted meanwhile keeps its pyramid entry (its slot could
    otherwise be refilled under the query) until the query has ended."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    engine.query("red box", with_cloud=False)  # warm: candidates and text embeddings
    seen: dict = {}
    scoring = LanguagePointQueries.clip_multiscale

    def during_query(self, *a, **k):
        if not seen:
            victim = engine.store.ids()[0]

            def other_thread():
                engine.step(1)  # needs the lock
                with engine.lock:
                    engine.store.remove(victim)
                    engine._evict(victim)
                seen["kept"] = engine.pyramid.ready(victim)

            t = threading.Thread(target=other_thread)
            t.start()
            t.join(60)
            seen.update(blocked=t.is_alive(), victim=victim, step=engine.train_step,
                        same_weights=self is not engine.model)
        return scoring(self, *a, **k)

    monkeypatch.setattr(LanguagePointQueries, "clip_multiscale", during_query)
    engine._grid_features = GridFeatureCache()  # the warm query's embeddings would serve without scoring
    r = engine.query("red box", with_cloud=False)
    assert seen["blocked"] is False, "a training step waited for the query to end"
    assert seen["step"] == 3 and r.model_step == 2 and seen["same_weights"]
    assert seen["kept"] is True  # evicted while the query read the pyramid: kept for it
    assert engine.pyramid.ready(seen["victim"])
    engine.step(0)  # the next locked call removes it
    assert not engine.pyramid.ready(seen["victim"])


def test_grid_feature_cache_reuses_features_until_points_or_weights_change(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    model = engine.model.eval()
    pts = engine._candidate_points()[0][:60]
    cache = GridFeatureCache()
    first = cache.get(model, pts, "v1")
    torch.testing.assert_close(first, model.language_features(pts), atol=0, rtol=0)
    assert cache.get(model, pts.clone(), "v1") is first and cache.hits == 1  # same content, another tensor
    assert cache.get(model, pts[:30], "v1") is not first and cache.hits == 1  # other points
    scales = engine.config.query.scales_m
    cached = multiscale_embed_fn(model, scales, cache=cache, version="v1")
    plain = multiscale_embed_fn(model, scales)
    s3 = float(np.float32(scales[3]))  # as locate passes it
    torch.testing.assert_close(cached(pts, s3), plain(pts, s3), atol=0, rtol=0)
    assert cache.get(model, pts, "v2") is not first  # another version of the weights

    # the engine's version changes with every training call (fused Adam changes weights in place)
    engine._grid_features = GridFeatureCache()
    a = engine.query("red box", with_cloud=False)
    engine.step(1)
    misses = engine._grid_features.hits
    engine.query("red box", with_cloud=False)
    assert engine._grid_features.hits == misses  # recomputed after the step

    # an idle engine's queries score the same points: the second pays no grid pass, and answers the same
    a = engine.query("red box", with_cloud=False)
    hits = engine._grid_features.hits
    b = engine.query("red box", with_cloud=False)
    assert engine._grid_features.hits > hits
    assert a.found == b.found and a.relevancy == b.relevancy
    if a.found:
        np.testing.assert_array_equal(a.location_world, b.location_world)


def test_grid_feature_cache_keeps_the_multiscale_embeddings_within_its_budget(room_frames, monkeypatch):
    """An idle map's scale search runs the language MLP once for the candidate points (its embeddings do not
    depend on the query text), not once per query; beyond the budget they are computed every time."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    model = engine.model.eval()
    pts = engine._candidate_points()[0][:50]
    scales = torch.tensor(engine.config.query.scales_m[:4])
    calls = []
    real = LanguagePointQueries.clip_multiscale

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(LanguagePointQueries, "clip_multiscale", counting)
    cache = GridFeatureCache()
    first = cache.multiscale(model, pts, "v1", scales)
    torch.testing.assert_close(first, real(model, pts, scales), atol=0, rtol=0)
    assert cache.multiscale(model, pts.clone(), "v1", scales) is first and len(calls) == 1
    assert cache.multiscale(model, pts, "v1", scales[:2]) is not first and len(calls) == 2  # other scales
    assert cache.multiscale(model, pts, "v2", scales) is not first and len(calls) == 3  # other weights
    small = GridFeatureCache(embed_budget_bytes=first.numel() * first.element_size() - 1)
    small.multiscale(model, pts, "v1", scales)
    small.multiscale(model, pts, "v1", scales)
    assert len(calls) == 5  # over the budget: computed each time, still right
    torch.testing.assert_close(small.multiscale(model, pts, "v1", scales), first, atol=0, rtol=0)

    # the engine: a second idle query with another text runs no language MLP pass over the candidates
    engine._last_train_time = -1e9
    engine.query("red box", with_cloud=False)
    n = len(calls)
    engine.query("blue box", with_cloud=False)
    assert len(calls) == n

    # a one-member cluster's embedding (one point, its own scale) is computed alone: it must not replace
    # the scale search's points in the cache
    fn = multiscale_embed_fn(model, engine.config.query.scales_m, cache=cache, version="v1")
    s0 = float(np.float32(engine.config.query.scales_m[0]))
    fn(pts, s0)
    hits = cache.hits
    s5 = torch.tensor([engine.config.query.scales_m[5]])  # a searched scale, as locate reads members at
    single = fn(pts[:1], s5)
    torch.testing.assert_close(single, model.clip_at_points(pts[:1], s5), atol=0, rtol=0)
    fn2 = multiscale_embed_fn(model, engine.config.query.scales_m, cache=cache, version="v1")
    fn2(pts, s0)
    assert cache.hits == hits + 1


def test_the_scale_searchs_closest_negatives_are_kept_with_the_embeddings_checked_once(room_frames,
                                                                                      monkeypatch):
    """Each candidate point's closest negative per scale (the query-independent half of the scale search's
    relevancy) is kept with the block's embeddings: the next query's search reads it. A block is checked
    finite once, when computed (a non-finite one raises and is not kept); locate does not check it again."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    model = engine.model.eval()
    pts = engine._candidate_points()[0][:50]
    scales = engine.config.query.scales_m
    g = torch.Generator().manual_seed(0)
    negs = torch.nn.functional.normalize(torch.randn(4, model.clip_dim, generator=g), dim=1)
    counted = []
    real_closest = query_embed.closest_negative
    monkeypatch.setattr(query_embed, "closest_negative", lambda *a: counted.append(1) or real_closest(*a))
    cache = GridFeatureCache()
    s = float(np.float32(scales[2]))  # as locate passes it
    fn = multiscale_embed_fn(model, scales, cache=cache, version="v1")
    with torch.no_grad():
        e = fn(pts, s)
        near = fn.closest(pts, s, negs)
    torch.testing.assert_close(near, closest_negative(e, negs), atol=0, rtol=0)
    block = len(scales) - 2  # the block holds scales 2.. (one grid pass for them)
    assert len(counted) == block  # one per scale of the block, once
    assert fn.verified(pts, s) and not fn.verified(pts.clone(), s)
    assert fn.closest(pts.clone(), s, negs) is None  # not the block's points
    nxt = multiscale_embed_fn(model, scales, cache=cache, version="v1")  # the next query
    with torch.no_grad():
        nxt(pts, s)
        torch.testing.assert_close(nxt.closest(pts, s, negs), near, atol=0, rtol=0)
    assert len(counted) == block  # read, not computed
    with torch.no_grad():
        nxt.closest(pts, s, negs[:2])  # other negatives: computed
    assert len(counted) == 2 * block
    with torch.no_grad():
        for k in range(query_embed.MAX_NEGATIVE_SETS + 2):  # queries with negatives of their own
            nxt.closest(pts, s, negs[: 1 + k % 4] * (1.0 + 0.01 * k))
    assert len(cache._closest) == query_embed.MAX_NEGATIVE_SETS  # the oldest sets dropped
    plain = multiscale_embed_fn(model, scales)  # no cache: computed, never taken as checked
    with torch.no_grad():
        plain(pts, s)
        torch.testing.assert_close(plain.closest(pts, s, negs), near, atol=0, rtol=0)
    assert not plain.verified(pts, s)

    real = LanguagePointQueries.clip_multiscale
    monkeypatch.setattr(LanguagePointQueries, "clip_multiscale",
                        lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    bad = GridFeatureCache()
    with pytest.raises(ValueError, match="non-finite"), torch.no_grad():
        bad.multiscale(model, pts, "v1", torch.tensor(scales[:3]))
    assert bad._held() == 0


def test_warm_up_builds_the_caches_the_first_idle_query_reuses(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    assert engine.warm_up_queries() == 0.0  # no model yet: nothing to build
    _train_a_little(engine, room_frames[:3], steps=2)
    engine._last_train_time = -1e9  # idle, as a loaded map
    assert engine.warm_up_queries() > 0.0
    grid_hits, view_hits = engine._grid_features.hits, engine._view_index.hits
    engine.query("purple teapot", with_cloud=False)  # nothing there: the field and the views are searched
    assert engine._grid_features.hits > grid_hits and engine._view_index.hits > view_hits


def test_auto_backend_becomes_torch_for_cpu_engines():
    """A CPU engine must never get tinycudann modules, even where "auto" would pick them (CUDA present)."""

    def impls(cfg, out):
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if f.name == "implementation":
                out.append(v)
            elif dataclasses.is_dataclass(v):
                impls(v, out)
            elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
                for x in v:
                    impls(x, out)
        return out

    cfg = EngineConfig().model
    before = impls(cfg, [])
    assert len(before) >= 8 and set(before) == {"auto"}  # grids + MLPs of every field and proposal net
    assert impls(_auto_to_torch(cfg), []) == ["torch"] * len(before)
    pinned = dataclasses.replace(cfg, radiance=dataclasses.replace(
        cfg.radiance, grid=dataclasses.replace(cfg.radiance.grid, implementation="tcnn")))
    assert impls(_auto_to_torch(pinned), []).count("tcnn") == 1  # an explicit choice is kept


def test_query_before_training_answers_from_keyframe_views():
    """RGB-D keyframes with features but no trained field: the keyframes' own crop embeddings answer."""
    room = SyntheticRoom(0)
    frames = make_frames(room, orbit_trajectory(room, 12), default_intrinsics(96, 72))
    engine = LERFEngine(_tiny(), "cpu")
    for f in frames:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(0)  # features only, no training step
    assert not engine.ready()
    located = 0
    for obj in room.objects:
        res = engine.query(obj.name)
        assert res.source == "views" and "language field has not trained" in res.message
        if res.found:
            located += bool(np.all(res.location_world >= obj.box_min - 0.05)
                            and np.all(res.location_world <= obj.box_max + 0.05))
    assert located >= 5, located
    absent = engine.query(room.absent_names[0])
    assert not absent.found and absent.source == "views"
    # RGB only: no candidates without a model, so the answer is "no model yet"
    bare = LERFEngine(_tiny(), "cpu")
    for f in frames[:6]:
        bare.add_frame(dataclasses.replace(f, depth_m=None))
    while bare.status().keyframes_pending:
        bare.step(0)
    assert bare.query("red box").message.startswith("no model yet")


def test_objects_the_field_has_not_learnt_are_found_from_the_keyframe_views():
    """A field trained two steps knows nothing: the field's answer is "not found", and the views fallback
    (QueryConfig.views_fallback) finds the object from the keyframes' own crops, marked as such."""
    room = SyntheticRoom(0)
    frames = make_frames(room, orbit_trajectory(room, 12), default_intrinsics(96, 72))
    cfg = _tiny()
    engine = LERFEngine(cfg, "cpu")
    _train_a_little(engine, frames)
    assert engine.ready()
    obj = next(o for o in room.objects if o.name == "red box")
    engine.config = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, views_fallback=False))
    field = engine.query(obj.name)
    assert not field.found and field.source == "field", field.message  # precondition: the field misses it
    engine.config = cfg
    res = engine.query(obj.name)
    assert res.found and res.source == "views" and "language field does not show it" in res.message
    p = res.location_world
    assert np.all(p >= obj.box_min - 0.05) and np.all(p <= obj.box_max + 0.05)
    absent = engine.query(room.absent_names[0])
    assert not absent.found


def test_pyramid_crops_come_from_the_full_resolution_frame(room_frames):
    """Ingest downsizes keyframes, but their CLIP crops are cut from the frame as it arrived."""
    big = [dataclasses.replace(f, image=np.repeat(np.repeat(f.image, 2, 0), 2, 1),
                               intrinsics=f.intrinsics.scaled(2.0), depth_m=None) for f in room_frames[:3]]
    engine = LERFEngine(_tiny(min_keyframes=2, max_image_side=48), "cpu")
    for f in big:
        engine.add_frame(f)
    kf_id = engine.store.ids()[0]
    source = engine._sources[kf_id]
    assert source.shape == big[0].image.shape and engine.store.get(kf_id).image.shape == (36, 48, 3)
    while engine.status().keyframes_pending:
        engine.step(0)
    assert engine._sources == {}  # freed once the pyramid is cut
    assert engine.pyramid.key(kf_id) == engine.pyramid.cache_key(engine.store.get(kf_id).image, source)


def test_training_is_reproducible_whatever_the_global_rng(room_frames):
    """The fields' initialisation and the sampler's jitter do not depend on torch's global generator."""
    losses = []
    for k in range(2):
        torch.rand(k + 3)  # whatever else in the process drew from the global generator
        engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
        _train_a_little(engine, room_frames[:4], steps=12)
        losses.append(engine.status().losses["total"])
    assert losses[0] == losses[1]


def test_a_query_before_the_map_is_usable_says_it_is_still_converging(room_frames):
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    assert engine.ready() and not engine.usable()
    res = engine.query("red box")
    assert "map still converging" in res.message  # from the field or, where it shows nothing, the views
    assert res.source in ("field", "views") and res.model_step == 2



def test_engine_counts_as_training_from_its_first_step_not_from_the_end_of_the_call(room_frames):
    """A query that arrives while the worker's first long ``step(n)`` call runs must see "training" (and so
    never render every keyframe's candidate grid itself: a 6 s first query was measured before)."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    for f in room_frames[:3]:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(0)
    engine._ensure_model()
    seen = []
    step = engine.trainer.step

    def spy(batch):
        seen.append(time.perf_counter() - engine._last_train_time < engine_mod.TRAINING_ACTIVE_S)
        return step(batch)

    engine.trainer.step = spy
    engine.step(3)
    assert seen == [False, True, True]  # from the second step of the very first call on


def test_the_box_grows_when_the_robot_drives_out_of_it(room_frames, monkeypatch):
    """A keyframe camera outside the scene box (the robot drove out of what its first keyframes bounded)
    refits the fields in a box that holds every camera, even when no keyframe is judged to look out of it;
    with every camera inside, nothing happens."""
    from lerf_ros.core.fields.scene_box import SceneBox

    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:4])
    monkeypatch.setattr(engine, "keyframes_outside_box", lambda: 0)  # only the cameras speak
    cams = np.stack([f.T_world_cam[:3, 3] for f in engine.store.frames()])

    def check(box):
        engine.scene_box = box
        engine._box_checked_step = engine.train_step - engine_mod.REFIT_CHECK_STEPS
        refits = engine._box_refits
        with engine.lock:
            engine._maybe_refit_box()
        return engine._box_refits - refits

    roomy = SceneBox(tuple(cams.min(0) - 1.0), tuple(cams.max(0) + 1.0))
    assert check(roomy) == 0 and engine.scene_box == roomy
    lo = cams.min(0) - 1.0
    lo[0] = cams[:, 0].min() + 0.05  # the left-most camera is outside
    small = SceneBox(tuple(lo), tuple(cams.max(0) + 1.0))
    assert check(small) == 1
    assert np.all(cams >= np.asarray(engine.scene_box.min_xyz)) and np.all(cams <= engine.scene_box.max_xyz)


def test_training_merges_the_candidates_so_that_a_query_during_training_does_not(room_frames, monkeypatch):
    """The candidate set is merged by `step` (outside the lock), not by a query while training runs: merging
    is O(points x keyframes), seconds on a CPU with many large keyframes, and used to hold the lock."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    merged = []
    real = candidates.merge_candidates

    def counting(frames, *a, **k):
        merged.append(len(frames))
        return real(frames, *a, **k)

    monkeypatch.setattr(candidates, "merge_candidates", counting)
    new_id = engine.add_frame(room_frames[6]).keyframe_id
    assert new_id is not None
    engine._last_merge = 0.0  # the merge's share of the wall time is due
    engine.step(1)
    assert merged == [len(engine.store)] and new_id in engine.candidates.current.grid_ids.tolist()
    r = engine.query("red box", with_cloud=False)  # within TRAINING_ACTIVE_S of the step: training
    assert len(merged) == 1 and r.model_step == 3
    assert engine.add_frame(room_frames[4]).keyframe  # not merged by the worker yet: the query does not wait
    engine.query("red box", with_cloud=False)
    assert len(merged) == 1
    engine._last_train_time = -1e9  # idle: a query brings the set up to date itself
    engine.query("red box", with_cloud=False)
    assert len(merged) == 2


def test_a_language_field_that_cannot_be_copied_is_read_under_the_lock(room_frames, monkeypatch):
    """tinycudann's native modules do not deepcopy: `LanguageSnapshot.of` says None and the query scores the
    model itself, holding the lock as before (no training step can change the weights under it)."""
    engine = LERFEngine(_tiny(min_keyframes=2), "cpu")
    _train_a_little(engine, room_frames[:3], steps=2)
    copied = engine.query("red box", with_cloud=False)

    def no_copy(memo):
        raise TypeError("cannot pickle 'tinycudann_bindings.Module' object")

    monkeypatch.setattr(type(engine.model.language), "__deepcopy__", no_copy, raising=False)
    engine._serving_key = None
    assert LanguageSnapshot.of(engine.model) is None
    held = []
    real = LanguagePointQueries.clip_multiscale

    def scoring(self, *a, **k):
        held.append((self is engine.model, engine.lock._owner == threading.get_ident()))
        return real(self, *a, **k)

    monkeypatch.setattr(LanguagePointQueries, "clip_multiscale", scoring)
    engine._grid_features = GridFeatureCache()
    direct = engine.query("red box", with_cloud=False)
    assert held and all(h == (True, True) for h in held)
    assert (direct.found, direct.relevancy) == (copied.found, copied.relevancy)
