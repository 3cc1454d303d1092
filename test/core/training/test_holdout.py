"""Held-out pixels: ~5 % of each keyframe, deterministic, never drawn for training."""

import numpy as np
import torch

from lerf_ros.core.training.holdout import HOLDOUT_FRACTION, is_held_out, training_pixels
from lerf_ros.core.training.trainer import KeyframeTensors, sample_ray_batch


def _grid(kf_id: int, w: int, h: int):
    v, u = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)
    return torch.full_like(u, kf_id), u, v


def test_fraction_pairs_and_determinism():
    ids, u, v = _grid(3, 640, 480)
    held = is_held_out(ids, u, v, torch.tensor(640))
    assert abs(float(held.float().mean()) - HOLDOUT_FRACTION) < 0.003
    # only even columns, each with an in-image right neighbour that is never held out
    assert bool((u[held] % 2 == 0).all()) and int(u[held].max()) <= 638
    swapped = training_pixels(ids, u, v, torch.tensor(640))
    assert not bool(is_held_out(ids, swapped, v, torch.tensor(640)).any())
    assert torch.equal(swapped[held], u[held] + 1) and torch.equal(swapped[~held], u[~held])
    # a function of (keyframe id, pixel) only: the same pixels again, other ones for another keyframe
    assert torch.equal(held, is_held_out(ids, u, v, torch.tensor(640)))
    other = is_held_out(torch.full_like(ids, 4), u, v, torch.tensor(640))
    assert 0 < int((held & other).sum()) < 0.2 * int(held.sum())
    # pinned values: a change of the hash would silently change every saved map's held-out set
    assert torch.nonzero(held[:640]).squeeze(1).tolist()[:4] == [64, 72, 88, 128]


def test_odd_width_last_column_never_held_out():
    ids, u, v = _grid(0, 7, 400)
    held = is_held_out(ids, u, v, torch.tensor(7))
    assert bool(held.any()) and not bool(held[u == 6].any())


def test_training_batches_never_contain_held_out_pixels():
    rng = np.random.default_rng(0)
    k, h, w = 3, 12, 16
    kf = KeyframeTensors(
        kf_ids=torch.tensor([2, 5, 11]),
        images=torch.from_numpy(rng.integers(0, 255, (k, h, w, 3), dtype=np.uint8)),
        depth=torch.full((k, h, w), float("nan")),
        T_world_cam=torch.eye(4).expand(k, 4, 4).clone(),
        intrinsics=torch.tensor([[10.0, 10.0, 7.5, 5.5]] * k),
        sizes=torch.tensor([[w, h]] * k),
    )
    held_all = set()
    for kf_id in kf.kf_ids.tolist():
        ids, u, v = _grid(kf_id, w, h)
        held = is_held_out(ids, u, v, torch.tensor(w))
        held_all |= {(kf_id, int(a), int(b)) for a, b in zip(u[held], v[held], strict=True)}
    assert held_all  # the test means something
    b = sample_ray_batch(kf, 20000, torch.Generator().manual_seed(0))
    uv = b["uv"].long()
    drawn = {(int(i), int(x), int(y)) for i, x, y in zip(b["kf_ids"], uv[:, 0], uv[:, 1], strict=True)}
    assert not drawn & held_all
    assert len(drawn) >= k * h * w - len(held_all) - 5  # every other pixel is still drawn
