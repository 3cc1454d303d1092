"""No host synchronisation per training step: between reports (``TrainerConfig.log_every``) a step never
reads a value back from the device. Counted on the CPU with `HostSyncCounter` (every call that would make
the host wait for a GPU); a per-step ``.item()``, ``bool(t)`` or boolean-mask index anywhere in the step
(ray sampling, targets, rendering, losses, the update) fails these tests."""

import dataclasses

import pytest
import torch
from lerf_test_doubles.host_sync import HostSyncCounter

from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.presets import make_preset
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory


def _engine(log_every: int, device: str = "cpu") -> LERFEngine:
    cfg = make_preset("tiny")
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, log_every=log_every))
    room = SyntheticRoom(0)
    frames = make_frames(room, orbit_trajectory(room, 6), default_intrinsics(48, 36))
    engine = LERFEngine(cfg, device)
    for f in frames:
        engine.add_frame(f)
    while engine.train_step < 3 or engine.status().keyframes_pending:  # features (once per keyframe,
        engine.step(max(0, 3 - engine.train_step))  # not per step), model, keyframe tensors, salience
    # The candidate refresh renders on a wall-time budget, between steps, not in one; off for exact counts.
    engine._refresh_candidates = lambda: None
    return engine


@pytest.mark.parametrize("log_every", [1, 4])
def test_one_read_back_per_report(log_every):
    engine = _engine(log_every)
    kf = engine._keyframe_tensors(engine._ready_ids())
    per_step = []
    with HostSyncCounter() as syncs:
        for _ in range(8):
            before = syncs.count
            engine._train_step(kf, 256)
            per_step.append(syncs.count - before)
    assert engine.train_step == 3 + 8
    # The only read-back is the report: every log_every-th step, one call (the loss records, all at once).
    assert per_step == [1 if (i + 1) % log_every == 0 else 0 for i in range(8)], syncs.sites
    assert set(syncs.sites) == {next(iter(syncs.sites))} and "training/trainer.py" in next(iter(syncs.sites))


def test_engine_step_syncs_once_per_report_and_reports_at_the_end():
    engine = _engine(4)
    assert not engine.trainer.convergence.due(engine.train_step + 10)  # no evaluation in what is counted
    with HostSyncCounter() as syncs:
        stats = engine.step(10)
    # reports after steps 4 and 8, and the call's own report of steps 9 and 10 (the status is current)
    assert stats.train_steps == 10 and syncs.count == 3, syncs.sites
    assert engine.trainer._pending == [] and engine.status().losses == engine.trainer.last_losses
    assert set(engine.status().losses) >= {"rgb", "depth", "clip", "dino", "total"}


def test_reports_replay_every_step_into_the_convergence_monitor():
    """The language-loss EMA sees every step's value, as with a report per step."""
    a, b = _engine(1), _engine(5)
    seen = {id(a): [], id(b): []}
    for engine in (a, b):
        real = engine.trainer.convergence.observe_losses
        engine.trainer.convergence.observe_losses = lambda d, e=engine, real=real: (
            seen[id(e)].append(d["clip"]), real(d))
        engine.step(10)
    assert len(seen[id(a)]) == len(seen[id(b)]) == 10 and seen[id(a)] == seen[id(b)]
    assert a.trainer.convergence._lang_ema == b.trainer.convergence._lang_ema
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


@pytest.mark.cuda
def test_no_step_between_reports_synchronises_on_cuda():
    """The same on a GPU, by CUDA's own check: any synchronising call between reports raises."""
    engine = _engine(4, "cuda")
    kf = engine._keyframe_tensors(engine._ready_ids())
    assert engine.trainer._pending == []  # engine.step reported at its end: a report boundary
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert engine._train_step(kf, 256) == {}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(engine._train_step(kf, 256)) >= {"rgb", "clip", "total"}  # the 4th reports
