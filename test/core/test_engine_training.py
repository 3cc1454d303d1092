"""LERFEngine training: NaN never reaches it or kills it (bad inputs refused or masked, a diverged step
skipped and rolled back, an error only after many in a row); convergence judged on held-out pixels, with
a reason when it cannot come (all-black images end at the cap)."""

import dataclasses
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.presets import make_preset
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory
from lerf_ros.tools.cli import _train


def _tiny(**trainer):
    cfg = make_preset("tiny")
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **trainer)) if trainer else cfg


@pytest.fixture(scope="module")
def room_frames():
    room = SyntheticRoom(0)
    return make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))


def _engine(frames, cfg=None) -> LERFEngine:
    engine = LERFEngine(cfg or _tiny(), "cpu")
    for f in frames:
        engine.add_frame(f)
    return engine


def _finite_losses(engine) -> bool:
    losses = engine.status().losses
    return bool(losses) and all(math.isfinite(v) for v in losses.values())


def test_nan_pose_depth_and_feature_map_never_reach_training(room_frames):
    engine = LERFEngine(_tiny(), "cpu")
    good = room_frames[0]
    nan_pose = good.T_world_cam.copy()
    nan_pose[1, 3] = np.nan
    with pytest.raises(ValueError, match="T_world_cam"):
        engine.add_frame(dataclasses.replace(good, T_world_cam=nan_pose))
    assert len(engine.store) == 0
    # The dense encoder returns an all-NaN feature map for the second keyframe.
    real, calls = engine.dino_encoder.encode_dense, []

    def nan_once(image):
        calls.append(1)
        out = real(image)
        return torch.full_like(out, float("nan")) if len(calls) == 2 else out

    engine.dino_encoder.encode_dense = nan_once
    for i, f in enumerate(room_frames):
        depth = f.depth_m.copy()
        depth[: depth.shape[0] // 3] = np.nan  # sensor holes
        depth[:, :4] = np.inf
        depth[-3:, -3:] = -1.0
        depth[5, 5] = 65.535  # 16UC1 saturation, beyond the rays' far end
        if i == 3:
            depth[:] = np.nan  # a frame with no valid depth at all
        engine.add_frame(dataclasses.replace(f, depth_m=depth))
    for _ in range(8):
        engine.step(10)
    st = engine.status()
    assert st.step >= 60 and _finite_losses(engine) and st.nonfinite_steps == 0
    assert "depth" in st.losses
    # the keyframe with NaN features was dropped (and said so); the others train
    assert len(engine.store) == len(room_frames) - 1 and "dropped" in st.last_error
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())


def test_a_diverged_model_is_rolled_back_and_training_goes_on(room_frames):
    engine = _engine(room_frames)
    while engine.train_step < 30:
        engine.step(10)
    with torch.no_grad():  # the state a diverged step would leave: NaN in the density grid
        engine.model.radiance.grid.params[:1000] = float("nan")
    engine.step(20)
    st = engine.status()
    assert (st.nonfinite_steps, st.restores) == (1, 1) and st.step == 30 + 19
    assert _finite_losses(engine) and all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert st.last_error.startswith("NonFiniteStep: non-finite loss at step 30")


def test_error_only_after_max_nonfinite_in_row(room_frames):
    engine = _engine(room_frames, _tiny(max_nonfinite_in_row=3))
    while engine.train_step < 5:
        engine.step(5 - engine.train_step)
    healthy = engine.model.compute_losses
    engine.model.compute_losses = lambda out, batch: {"rgb": torch.tensor(float("nan"), requires_grad=True)}
    engine.step(2)  # two in a row: skipped, rolled back, no error yet
    assert engine.status().nonfinite_steps == 2 and engine.train_step == 5
    with pytest.raises(RuntimeError, match="training diverged"):
        engine.step(5)
    assert engine.status().last_error.startswith("RuntimeError: training diverged")
    engine.model.compute_losses = healthy  # whatever broke is fixed: training resumes
    engine.step(3)
    assert engine.train_step == 8 and _finite_losses(engine)


def test_usable_needs_convergence_and_is_in_the_status(room_frames):
    engine = _engine(room_frames)
    assert not engine.usable() and engine.status().convergence.note == "not evaluated yet"
    while engine.train_step < 10:
        engine.step(10 - engine.train_step)
    sig = engine.evaluate_convergence()
    assert sig.step == 10 and not sig.usable and 0 < sig.progress < 1
    assert math.isfinite(sig.psnr_db) and sig.depth_pairs > 0
    st = engine.status()
    assert st.convergence == sig and st.usable is False and st.progress == sig.progress


def _bar():
    return SimpleNamespace(n=0, set_postfix=lambda **kw: None, refresh=lambda: None)


def test_black_images_never_usable_and_end_at_the_cap(room_frames):
    cfg = make_preset("tiny")
    # blur detection would reject black frames before they reach training; switch it off
    cfg = dataclasses.replace(cfg, keyframes=dataclasses.replace(cfg.keyframes, blur_threshold=0.0))
    engine = _engine([dataclasses.replace(f, image=np.zeros_like(f.image)) for f in room_frames], cfg)
    reason = _train(engine, 250, fixed=False, seconds=None, bar=_bar())
    st = engine.status()
    assert reason == "no convergence signal" and st.step == 250 and not st.usable
    assert st.convergence.note.startswith("no convergence signal: the held-out pixels have no colour")


def test_fixed_steps_mean_exactly_n(room_frames):
    engine = _engine(room_frames)
    assert _train(engine, 37, fixed=True, seconds=None, bar=_bar()) == "steps"
    assert engine.train_step == 37 and engine.status().keyframes_pending == 0


def _oom_first(k: int, real):
    """``real`` that raises torch.cuda.OutOfMemoryError on its first ``k`` calls (k=None: always)."""
    calls = []

    def fn(*args, **kwargs):
        calls.append(1)
        if k is None or len(calls) <= k:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)")
        return real(*args, **kwargs)

    fn.calls = calls
    return fn


def _weights_and_moments(engine):
    params = [p.detach().clone() for p in engine.model.parameters()]
    moments = [v.clone() for o in engine.trainer.optimizers.values() for st in o.state.values()
               for v in st.values() if torch.is_tensor(v)]
    return params, moments


def _unchanged(a, b) -> bool:
    return all(len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
               for x, y in zip(a, b, strict=True))


def test_out_of_memory_halves_the_rays_and_training_goes_on(room_frames):
    engine = _engine(room_frames)  # tiny: 256 rays per step, floor 64
    while engine.train_step < 5:
        engine.step(5 - engine.train_step)
    assert (engine.status().rays_per_step, engine.status().oom_events) == (256, 0)
    sizes, real_losses = [], engine.model.compute_losses
    engine.model.compute_losses = lambda out, batch: sizes.append(len(batch["origins"])) or real_losses(out,
                                                                                                     batch)
    engine.model.forward = _oom_first(2, engine.model.forward)
    before = _weights_and_moments(engine)
    assert engine.step(1).train_steps == 0
    st = engine.status()
    assert _unchanged(_weights_and_moments(engine), before) and st.step == 5
    assert (st.oom_events, st.rays_per_step) == (1, 128)
    assert st.last_error.startswith("OutOfMemoryStep: out of memory at step 5 with 256 rays per step")
    assert "rays per step halved to 128" in st.last_error and "Tried to allocate" in st.last_error
    stats = engine.step(4)  # fails at 128 -> 64 (the floor), then trains on at 64
    st = engine.status()
    assert stats.train_steps == 3 and st.step == 8 and sizes == [64] * 3 and _finite_losses(engine)
    assert st.rays_per_step == 64 and st.oom_events == 2 and "halved to 64 (floor 64" in st.last_error
    engine.step(20)
    assert engine.status().rays_per_step == 64 and sizes == [64] * 23  # kept: no growing back
    assert 0 < st.rays_per_s


def test_out_of_memory_at_the_floor_is_an_error_not_a_loop(room_frames):
    from lerf_ros.core.training.worker import TrainingWorker

    engine = _engine(room_frames, _tiny(rays_per_step=128, min_rays_per_step=64))
    while engine.train_step < 3:
        engine.step(3 - engine.train_step)
    healthy = engine.model.forward
    engine.model.forward = failing = _oom_first(None, healthy)
    with pytest.raises(RuntimeError, match="already at the floor of 64 rays per step"):
        engine.step(10)  # 128 fails -> 64 fails -> error, within the one call
    st = engine.status()
    assert len(failing.calls) == 2 and (st.oom_events, st.rays_per_step, st.step) == (2, 64, 3)
    assert st.last_error.startswith("RuntimeError: training stopped: out of memory at step 3 with 64 rays")
    # In the worker: state "error" with the reason, and no further attempts until resume.
    worker = TrainingWorker(engine, steps_per_tick=5, idle_poll_s=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while worker.state != "error" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.state == "error" and "floor of 64 rays" in worker.last_error
        attempts = len(failing.calls)
        time.sleep(0.5)
        assert len(failing.calls) == attempts == 3 and worker.state == "error"
        engine.model.forward = healthy  # memory was freed: resume trains on at the floor
        worker.resume()
        while engine.train_step < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.train_step >= 6 and engine.status().rays_per_step == 64
    finally:
        worker.stop()


def test_out_of_memory_computing_features_keeps_the_keyframe(room_frames):
    engine = LERFEngine(_tiny(), "cpu")
    for f in room_frames[:3]:
        engine.add_frame(f)
    pending = engine.status().keyframes_pending
    engine.dino_encoder.encode_dense = _oom_first(1, engine.dino_encoder.encode_dense)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.step(0)
    st = engine.status()
    assert st.keyframes_pending == pending and st.keyframes == pending
    assert st.last_error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB (injected)"
    while engine.status().keyframes_pending:
        engine.step(0)  # the retry computes it
    assert len(engine._ready_ids()) == pending == 3


def test_reports_every_n_steps_roll_back_and_give_up_like_per_step_ones(room_frames):
    """log_every = 4 (the GPU presets report every 25 steps, `presets.GPU_LOG_EVERY`): steps found non-finite
    at a report were skipped on the device, are counted, and rolled back; the error still comes only after
    max_nonfinite_in_row in a row, across reports."""
    engine = _engine(room_frames, _tiny(log_every=4, max_nonfinite_in_row=6))
    while engine.train_step < 8:
        engine.step(8 - engine.train_step)
    with torch.no_grad():  # the state a diverged step would leave: NaN in the density grid
        engine.model.param_groups()["radiance"][0].view(-1)[:1000] = float("nan")
    stats = engine.step(12)  # 4 steps until the report finds them, then 8 good ones
    st = engine.status()
    assert (st.nonfinite_steps, st.restores, st.step, stats.train_steps) == (4, 1, 16, 8)
    assert st.last_error.startswith("NonFiniteStep: non-finite loss at step 8")
    assert "4 in a row" in st.last_error
    assert _finite_losses(engine) and all(torch.isfinite(p).all() for p in engine.model.parameters())
    healthy = engine.model.compute_losses
    engine.model.compute_losses = lambda out, batch: {"rgb": torch.tensor(float("nan"), requires_grad=True)}
    engine.step(5)  # a report after 4 and the call's own after the 5th: 5 in a row, no error yet
    assert engine.status().nonfinite_steps == 9 and engine.train_step == 16
    with pytest.raises(RuntimeError, match="training diverged"):
        engine.step(1)
    engine.model.compute_losses = healthy
    engine.step(4)
    assert engine.train_step == 20 and _finite_losses(engine)
