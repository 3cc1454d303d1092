"""Trainer: schedules, ray batches against the camera module, per-group optimisers, loss gating."""

import math

import numpy as np
import pytest
import torch

from lerf_ros.core.frames.camera import CameraIntrinsics, pixel_rays, z_to_ray_distance
from lerf_ros.core.training.recovery import OutOfMemoryStep, halved_rays
from lerf_ros.core.training.trainer import (
    KeyframeTensors,
    NonFiniteStep,
    Trainer,
    TrainerConfig,
    lr_factor,
    pixel_rays_batched,
    sample_ray_batch,
)
from lerf_ros.sim.scene import look_at_pose


def test_lr_schedule_hand_values():
    cfg = TrainerConfig(warmup_steps=10, lr_decay_steps=100, lr_final_factor=0.01)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(5, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1)  # halfway through the decay: sqrt(0.01)
    assert lr_factor(110, cfg) == pytest.approx(0.01)
    assert lr_factor(10_000, cfg) == pytest.approx(0.01)


@pytest.mark.parametrize("kwargs", [
    {"rays_per_step": 0}, {"lr": -1.0}, {"lr_by_group": (("radiance", math.nan),)},
    {"lr_final_factor": 0.0}, {"amp_dtype": "fp8"}, {"max_grad_norm": 0.0},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TrainerConfig(**kwargs).validate()


def _keyframes(device="cpu"):
    intr_a = CameraIntrinsics(8, 6, 10.0, 11.0, 3.5, 2.5)
    intr_b = CameraIntrinsics(6, 4, 7.0, 7.5, 2.5, 1.5)
    poses = [look_at_pose([1.0, 0.5, 1.0], [0, 0, 0.3]), look_at_pose([-1.0, 0.2, 1.2], [0.1, 0, 0.2])]
    rng = np.random.default_rng(0)
    images = np.zeros((2, 6, 8, 3), np.uint8)
    images[0] = rng.integers(0, 255, (6, 8, 3))
    images[1, :4, :6] = rng.integers(0, 255, (4, 6, 3))
    depth = np.full((2, 6, 8), np.nan, np.float32)
    depth[0] = rng.uniform(1, 3, (6, 8))
    kf = KeyframeTensors(
        kf_ids=torch.tensor([7, 9]),
        images=torch.from_numpy(images),
        depth=torch.from_numpy(depth),
        T_world_cam=torch.tensor(np.stack(poses), dtype=torch.float32),
        intrinsics=torch.tensor([[10.0, 11.0, 3.5, 2.5], [7.0, 7.5, 2.5, 1.5]]),
        sizes=torch.tensor([[8, 6], [6, 4]]),
    )
    return kf, (intr_a, intr_b), poses, images, depth


def test_batched_rays_match_camera_module():
    kf, intrs, poses, _, _ = _keyframes()
    u = torch.tensor([0.0, 3.0, 7.0, 5.0])
    v = torch.tensor([0.0, 2.0, 5.0, 3.0])
    for row in (0, 1):
        rows = torch.full((4,), row, dtype=torch.int64)
        o, d, f = pixel_rays_batched(kf, rows, u, v)
        o_ref, d_ref = pixel_rays(intrs[row], poses[row], u, v)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(f, z_to_ray_distance(intrs[row], u, v), atol=1e-5, rtol=0)


class _FakePyramid:
    """Target = (kf_id, u, v, tile_frac) padded: lets the test check what was asked for."""

    def random_tile_frac(self, n, generator=None):
        return torch.rand(n, generator=generator) * 0.4 + 0.1

    def sample(self, kf_ids, uv, tile_frac, check_ids=True):
        return torch.stack([kf_ids.float(), uv[:, 0], uv[:, 1], tile_frac], dim=1)


class _FakeDense:
    def sample(self, kf_ids, uv, check_ids=True):
        return torch.stack([kf_ids.float(), uv[:, 0] + uv[:, 1]], dim=1)


def test_ray_batch_targets():
    kf, intrs, poses, images, depth = _keyframes()
    gen = torch.Generator().manual_seed(3)
    b = sample_ray_batch(kf, 500, gen, _FakePyramid(), _FakeDense())
    ids, uv = b["kf_ids"], b["uv"].long()
    assert set(ids.tolist()) == {7, 9}  # both keyframes drawn
    rows = (ids == 9).long()
    # pixels stay inside each keyframe's own size (keyframe 9 is 6 x 4 inside 8 x 6 padding)
    assert int(uv[rows == 1, 0].max()) <= 5 and int(uv[rows == 1, 1].max()) <= 3
    assert int(uv[rows == 0, 0].max()) == 7 and int(uv[rows == 0, 1].max()) == 5
    expect_rgb = images[rows.numpy(), uv[:, 1].numpy(), uv[:, 0].numpy()] / 255.0
    np.testing.assert_allclose(b["rgb"].numpy(), expect_rgb, atol=1e-6)
    # depth: z * |d_cam| for keyframe 7, NaN (unknown) for keyframe 9
    m = rows == 0
    z = depth[0, uv[m, 1].numpy(), uv[m, 0].numpy()]
    factor = z_to_ray_distance(intrs[0], uv[m, 0].float(), uv[m, 1].float()).numpy()
    np.testing.assert_allclose(b["depth"][m].numpy(), z * factor, rtol=1e-5)
    assert torch.isnan(b["depth"][~m]).all()
    # CLIP target asked at the ray's own keyframe, pixel and tile size; scale factor = tile * H / fy
    torch.testing.assert_close(b["clip"][:, 0], ids.float())
    torch.testing.assert_close(b["clip"][:, 1:3], b["uv"])
    tile = b["clip"][:, 3]
    h = torch.where(rows == 0, 6.0, 4.0)
    fy = torch.where(rows == 0, 11.0, 7.5)
    torch.testing.assert_close(b["clip_scale_factor"], tile * h / fy)
    torch.testing.assert_close(b["dino"][:, 1], b["uv"].sum(1))
    # origins are the camera centres of each ray's keyframe
    centres = torch.tensor(np.stack(poses)[:, :3, 3], dtype=torch.float32)[rows]
    torch.testing.assert_close(b["origins"], centres)


class _ToyModel(torch.nn.Module):
    """rgb = sigmoid(a + b . dir); 'clip' output only when a scale factor is passed."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(3, 3))
        self.c = torch.nn.Parameter(torch.zeros(2))
        self.seen_batches = []

    def forward(self, origins, directions, clip_scale_factor=None, surface_depth=None):
        out = {"rgb": torch.sigmoid(self.a + directions @ self.b)}
        if clip_scale_factor is not None:
            out["clip"] = self.c.expand(origins.shape[0], 2)
        return out

    def compute_losses(self, outputs, batch):
        self.seen_batches.append(set(batch))
        losses = {"rgb": ((outputs["rgb"] - batch["rgb"]) ** 2).mean()}
        if "clip" in batch and "clip" in outputs:
            losses["clip"] = ((outputs["clip"] - batch["clip"]) ** 2).mean()
        return losses

    def param_groups(self):
        return {"radiance": [self.a, self.b], "language": [self.c]}


def _toy_batch(n=64):
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return {"origins": torch.zeros(n, 3), "directions": d, "rgb": torch.full((n, 3), 0.8),
            "clip": torch.ones(n, 2), "clip_scale_factor": torch.ones(n)}


def test_trainer_groups_schedule_and_loss_gate():
    model = _ToyModel()
    cfg = TrainerConfig(lr=0.1, lr_by_group=(("language", 0.05),), lr_decay_steps=10, lr_final_factor=0.5,
                        clip_loss_start_step=3, language=None)
    tr = Trainer(model, cfg, "cpu")
    assert set(tr.optimizers) == {"radiance", "language"}
    assert not tr.use_amp  # CPU: never autocast
    first = tr.step(_toy_batch())
    assert "clip" not in first and "clip" not in model.seen_batches[-1]
    assert float(model.c.detach().abs().sum()) == 0.0  # language untouched before clip_loss_start_step
    for _ in range(2):
        tr.step(_toy_batch())
    out = tr.step(_toy_batch())
    assert "clip" in out and out["total"] == pytest.approx(out["rgb"] + out["clip"])
    assert float(model.c.detach().abs().sum()) > 0.0
    # lr of each group follows its own base value times the shared schedule (step 3 was the last set)
    f = lr_factor(3, cfg)
    assert tr.optimizers["radiance"].param_groups[0]["lr"] == pytest.approx(0.1 * f)
    assert tr.optimizers["language"].param_groups[0]["lr"] == pytest.approx(0.05 * f)
    for _ in range(60):
        last = tr.step(_toy_batch())
    assert last["rgb"] < first["rgb"] * 0.2
    assert tr.step_count == 64


def test_non_finite_loss_leaves_weights_unchanged():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1), "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    batch = _toy_batch()
    batch["rgb"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite loss"):
        tr.step(batch)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert tr.step_count == 0


def test_grad_clipping_bounds_the_update():
    m1, m2 = _ToyModel(), _ToyModel()
    big = _toy_batch()
    big["rgb"] = torch.full_like(big["rgb"], 50.0)  # huge error -> huge gradient
    Trainer(m1, TrainerConfig(lr=1.0, adam_eps=1e3), "cpu").step(big)
    Trainer(m2, TrainerConfig(lr=1.0, adam_eps=1e3, max_grad_norm=1e-3), "cpu").step(big)
    # with a large eps Adam's step is ~ lr * grad / eps, so clipping shrinks it proportionally
    assert float(m2.a.detach().abs().max()) < 0.01 * float(m1.a.detach().abs().max())


def test_state_dict_round_trip():
    m = _ToyModel()
    tr = Trainer(m, TrainerConfig(), "cpu")
    tr.step(_toy_batch())
    tr2 = Trainer(_ToyModel(), TrainerConfig(), "cpu")
    tr2.load_state_dict(tr.state_dict())
    assert tr2.step_count == 1
    assert torch.equal(tr2.optimizers["radiance"].state_dict()["state"][0]["exp_avg"],
                       tr.optimizers["radiance"].state_dict()["state"][0]["exp_avg"])


def test_non_finite_gradient_skips_the_step():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1), "cpu")
    tr.step(_toy_batch())
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.b.register_hook(lambda g: g * float("nan"))  # finite loss, NaN gradient
    with pytest.raises(NonFiniteStep, match="grad:radiance") as info:
        tr.step(_toy_batch())
    hook.remove()
    assert info.value.terms == ("grad:radiance",) and info.value.in_row == 1 and not info.value.restored
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert (tr.step_count, tr.nonfinite_steps) == (1, 1)
    tr.step(_toy_batch())  # training goes on
    assert (tr.step_count, tr.nonfinite_in_row) == (2, 0)


def test_second_non_finite_step_in_a_row_rolls_back_to_the_snapshot():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1, snapshot_every=2), "cpu")
    for _ in range(2):
        tr.step(_toy_batch())  # snapshot at step 2 (a clean stretch of 2 steps)
    at_snapshot = [p.detach().clone() for p in model.parameters()]
    adam_at_snapshot = tr.optimizers["radiance"].state[model.a]["exp_avg"].clone()
    tr.step(_toy_batch())
    at_3 = [p.detach().clone() for p in model.parameters()]
    bad = _toy_batch()
    bad["rgb"][0, 0] = float("nan")
    with pytest.raises(NonFiniteStep) as first:
        tr.step(bad)
    assert not first.value.restored  # one bad batch: skipped, nothing rolled back
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), at_3, strict=True))
    with pytest.raises(NonFiniteStep, match="rolled back to the snapshot of step 2") as second:
        tr.step(bad)
    assert second.value.restored and second.value.in_row == 2 and tr.restores == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), at_snapshot, strict=True))
    assert torch.equal(tr.optimizers["radiance"].state[model.a]["exp_avg"], adam_at_snapshot)
    out = tr.step(_toy_batch())
    assert math.isfinite(out["total"]) and tr.nonfinite_in_row == 0 and tr.step_count == 4
    # no snapshot within snapshot_every steps of a bad one: step 4 keeps the old snapshot
    assert tr._snapshot.step == 2


def test_non_finite_weights_are_rolled_back_at_once():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1), "cpu")
    tr.step(_toy_batch())
    with torch.no_grad():
        model.a[0] = float("nan")  # e.g. a corrupted state: every forward is NaN from now on
    with pytest.raises(NonFiniteStep) as info:
        tr.step(_toy_batch())
    assert info.value.restored and torch.isfinite(model.a).all()
    assert math.isfinite(tr.step(_toy_batch())["total"])


def test_language_field_has_lerfs_own_optimiser_and_schedule():
    """LERF's 1e-2 -> 1e-3 over 4000 steps, weight decay 1e-9 (Adam by default, RAdam on request)."""
    from lerf_ros.core.training.trainer import GroupSchedule

    sched = GroupSchedule()
    assert (sched.optimizer, sched.lr, sched.lr_final, sched.decay_steps) == ("adam", 1e-2, 1e-3, 4000)
    assert sched.factor(0) == 1.0 and sched.factor(2000) == pytest.approx(10 ** -0.5)
    assert sched.factor(4000) == pytest.approx(0.1) and sched.factor(9000) == pytest.approx(0.1)
    radam = TrainerConfig(rays_per_step=8, lr=5e-3, lr_decay_steps=100, language=GroupSchedule("radam"))
    trainer = Trainer(_ToyModel(), radam, "cpu")
    assert isinstance(trainer.optimizers["language"], torch.optim.RAdam)
    assert trainer.optimizers["language"].param_groups[0]["weight_decay"] == 1e-9
    assert isinstance(trainer.optimizers["radiance"], torch.optim.Adam)
    trainer.step_count = 4000
    trainer._set_lr()
    assert trainer.optimizers["language"].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert trainer.optimizers["radiance"].param_groups[0]["lr"] == pytest.approx(5e-3 * 0.01)
    plain = Trainer(_ToyModel(), TrainerConfig(rays_per_step=8, language=None), "cpu")
    assert isinstance(plain.optimizers["language"], torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer"):
        GroupSchedule(optimizer="sgd").validate()


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _state(tr, model):
    """Copies of the weights and of every optimiser state tensor."""
    params = [p.detach().clone() for p in model.parameters()]
    adam = {(n, i, k): v.clone() for n, o in tr.optimizers.items() for i, st in enumerate(o.state.values())
            for k, v in st.items()}
    return params, adam


def _same_state(tr, model, saved) -> bool:
    params, adam = _state(tr, model)
    return (all(torch.equal(p, q) for p, q in zip(params, saved[0], strict=True))
            and adam.keys() == saved[1].keys() and all(torch.equal(adam[k], saved[1][k]) for k in adam))


def test_out_of_memory_in_backward_applies_nothing():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1), "cpu")
    tr.step(_toy_batch())
    saved = _state(tr, model)
    hook = model.b.register_hook(_oom)  # during backward, after some gradients may exist
    with pytest.raises(OutOfMemoryStep, match="out of memory at step 1 with 64 rays per step") as info:
        tr.step(_toy_batch())
    hook.remove()
    assert not info.value.restored and not info.value.partial and info.value.rays == 64
    assert "Tried to allocate" in str(info.value) and "\n" not in str(info.value)
    assert _same_state(tr, model, saved) and tr.step_count == 1
    assert all(p.grad is None for p in model.parameters())
    tr.step(_toy_batch(16))  # training goes on with a smaller batch
    assert tr.step_count == 2 and not _same_state(tr, model, saved)


def test_out_of_memory_inside_the_update_is_rolled_back():
    """Adam allocates its moments on a group's first step: running out of memory there leaves one group
    updated and the other not; the snapshot of the initial weights undoes it."""
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1, language=None), "cpu")
    saved = _state(tr, model)
    assert list(tr.optimizers) == ["radiance", "language"]  # radiance steps first
    tr.optimizers["language"].step = _oom
    with pytest.raises(OutOfMemoryStep, match="rolled back to the snapshot of step 0") as info:
        tr.step(_toy_batch())
    assert info.value.restored and not info.value.partial and tr.restores == 1
    assert _same_state(tr, model, saved) and tr.step_count == 0
    assert not tr.optimizers["radiance"].state  # the moments of the undone step are gone too
    del tr.optimizers["language"].step
    tr.step(_toy_batch())
    assert tr.step_count == 1 and float(model.a.detach().abs().max()) > 0


def test_out_of_memory_inside_the_update_without_snapshot_is_partial():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1, language=None, snapshot_every=0), "cpu")
    tr.optimizers["language"].step = _oom
    with pytest.raises(OutOfMemoryStep, match="no snapshot to undo it") as info:
        tr.step(_toy_batch())
    assert info.value.partial and not info.value.restored


def test_halved_rays_and_floor():
    assert [halved_rays(r, 64) for r in (4096, 256, 128, 100, 65, 64, 8)] == [2048, 128, 64, 64, 64, None,
                                                                             None]
    assert TrainerConfig().rays_floor == 64
    assert TrainerConfig(rays_per_step=32).rays_floor == 32  # never above the configured size
    with pytest.raises(ValueError, match="min_rays_per_step"):
        TrainerConfig(min_rays_per_step=0).validate()


def _nan_batch():
    bad = _toy_batch()
    bad["rgb"][0, 0] = float("nan")
    return bad


def test_deferred_report_skips_a_bad_step_on_the_device():
    """log_every = 4: the steps between reports return {} and never read back; a non-finite step is skipped
    on the device (fused Adam's found_inf) and counted, raised and taken out of the step count at the
    report."""
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1, log_every=4), "cpu")
    assert tr.step(_toy_batch()) == {}
    before = _state(tr, model)
    assert tr.step(_nan_batch()) == {}  # nothing known on the host yet
    assert _same_state(tr, model, before)  # nothing applied: weights, Adam moments and Adam's step count
    assert tr.step(_toy_batch()) == {} and tr.nonfinite_steps == 0
    with pytest.raises(NonFiniteStep, match=r"at step 1 \(rgb, grad:radiance\); skipped, 1 in a row") as info:
        tr.step(_toy_batch())
    assert (info.value.count, info.value.in_row, info.value.restored) == (1, 1, False)
    assert (tr.step_count, tr.nonfinite_steps, tr.nonfinite_in_row) == (3, 1, 0)
    assert all(float(st["step"]) == 3 for o in tr.optimizers.values() for st in o.state.values())
    for _ in range(3):
        assert tr.step(_toy_batch()) == {}
    out = tr.step(_toy_batch())
    assert set(out) == {"rgb", "clip", "total"} and math.isfinite(out["total"]) and tr.step_count == 7


def test_deferred_reports_train_exactly_as_reports_every_step():
    models = [_ToyModel(), _ToyModel()]
    trainers = [Trainer(m, TrainerConfig(lr=0.1, snapshot_every=2, log_every=n), "cpu")
                for m, n in zip(models, (1, 3), strict=True)]
    reported = [[], []]
    for i in range(9):
        batch = _toy_batch()
        batch["rgb"] = batch["rgb"] - 0.05 * i
        for k, tr in enumerate(trainers):
            out = tr.step(batch)
            if out:
                reported[k].append(out)
    assert len(reported[0]) == 9 and len(reported[1]) == 3
    assert reported[1] == reported[0][2::3]  # the same floats, every third step
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models), strict=True))
    # the same rule, applied at reports: the first report at or after each multiple of snapshot_every
    assert (trainers[0]._snapshot.step, trainers[1]._snapshot.step) == (8, 9)
    assert trainers[0].convergence._lang_ema == trainers[1].convergence._lang_ema


def test_a_report_ending_in_bad_steps_rolls_back_and_one_ending_well_does_not():
    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1, snapshot_every=2, log_every=4), "cpu")
    for _ in range(4):
        tr.step(_toy_batch())
    assert tr._snapshot.step == 4  # a clean report across a multiple of snapshot_every
    at_snapshot = _state(tr, model)
    tr.step(_toy_batch())
    tr.step(_toy_batch())
    tr.step(_nan_batch())
    with pytest.raises(NonFiniteStep, match="rolled back to the snapshot of step 4") as info:
        tr.step(_nan_batch())
    assert (info.value.count, info.value.in_row, info.value.restored, info.value.step) == (2, 2, True, 6)
    assert _same_state(tr, model, at_snapshot)
    assert (tr.step_count, tr.restores, tr.nonfinite_in_row) == (6, 1, 2)
    # Bad steps followed by good ones in the same report: counted, not rolled back (the state recovered).
    tr.step(_nan_batch())
    for _ in range(2):
        tr.step(_toy_batch())
    with pytest.raises(NonFiniteStep, match="; skipped, 3 in a row") as info:
        tr.step(_toy_batch())
    assert (info.value.count, info.value.in_row, info.value.restored) == (1, 3, False)
    assert (tr.step_count, tr.nonfinite_steps, tr.nonfinite_in_row, tr.restores) == (9, 3, 0, 1)
    assert tr._snapshot.step == 9  # the report's clean stretch since its bad step reached snapshot_every


def test_an_optimiser_that_cannot_skip_on_the_device_checks_every_step():
    """RAdam is not fused (no found_inf): its steps check on the host before updating, as before."""
    from lerf_ros.core.training.trainer import GroupSchedule

    model = _ToyModel()
    tr = Trainer(model, TrainerConfig(lr=0.1, log_every=4, language=GroupSchedule("radam")), "cpu")
    assert tr.step(_toy_batch()) == {}
    before = _state(tr, model)
    with pytest.raises(NonFiniteStep) as info:
        tr.step(_nan_batch())
    assert info.value.count == 1 and _same_state(tr, model, before) and tr.step_count == 1
