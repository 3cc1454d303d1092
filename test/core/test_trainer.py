"""Trainer: schedules, ray batches against the camera module, per-group optimisers, loss gating."""

import math

import numpy as np
import pytest
import torch

from lerf_ros.core.camera import CameraIntrinsics, pixel_rays, z_to_ray_distance
from lerf_ros.core.scene import look_at_pose
from lerf_ros.core.trainer import (
    KeyframeTensors,
    Trainer,
    TrainerConfig,
    lr_factor,
    pixel_rays_batched,
    sample_ray_batch,
)


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

    def sample(self, kf_ids, uv, tile_frac):
        return torch.stack([kf_ids.float(), uv[:, 0], uv[:, 1], tile_frac], dim=1)


class _FakeDense:
    def sample(self, kf_ids, uv):
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

    def forward(self, origins, directions, clip_scale_factor=None):
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
                        clip_loss_start_step=3)
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
