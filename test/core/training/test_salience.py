"""Salient rays: a small object that covers a sliver of the keyframes gets many more training rays."""

import math

import numpy as np
import pytest
import torch

from lerf_ros.core.encoders import DEMO_CLIP, load_encoder
from lerf_ros.core.language.pyramid import ClipPyramid, PyramidConfig
from lerf_ros.core.training import salience
from lerf_ros.core.training.salience import SalienceConfig
from lerf_ros.core.training.trainer import KeyframeTensors, sample_ray_batch

H, W = 60, 80


def _frames_with_a_small_object():
    """Three grey-textured keyframes; a 6 x 6 px red patch in the first two (0.75 % of their pixels)."""
    from lerf_ros.core.frames.camera import CameraIntrinsics
    from lerf_ros.core.frames.frame import Frame
    from lerf_ros.sim.scene import look_at_pose

    rng = np.random.default_rng(0)
    frames, masks = [], []
    for k in range(3):
        img = (rng.uniform(0.35, 0.45, (H, W, 1)) * np.ones((1, 1, 3)) * 255).astype(np.uint8)
        mask = np.zeros((H, W), bool)
        if k < 2:
            mask[30:36, 40 + 5 * k:46 + 5 * k] = True
            img[mask] = (200, 30, 30)
        intr = CameraIntrinsics(W, H, 60.0, 60.0, (W - 1) / 2, (H - 1) / 2)
        frames.append(Frame(img, intr, look_at_pose([2.0, 0.2 * k, 1.0], [0, 0, 0]), k, None))
        masks.append(mask)
    return frames, np.stack(masks)


@pytest.fixture(scope="module")
def setup():
    frames, masks = _frames_with_a_small_object()
    pyr = ClipPyramid(load_encoder(DEMO_CLIP), PyramidConfig(tile_fracs=(0.1, 0.2, 0.4)))
    ids = [3, 4, 5]
    for i, f in zip(ids, frames, strict=True):
        pyr.add(i, f.image)
    kf = KeyframeTensors.from_frames(ids, frames, torch.device("cpu"))
    kf.salience = salience.cell_table(pyr, ids, "cpu")
    return kf, pyr, masks


def _object_share(batch, masks) -> float:
    rows = batch["kf_ids"] - 3
    uv = batch["uv"].long()
    return float(masks[rows.numpy(), uv[:, 1].numpy(), uv[:, 0].numpy()].mean())


def test_salient_share_puts_many_more_rays_on_the_small_object(setup):
    kf, pyr, masks = setup
    uniform = sample_ray_batch(kf, 4000, torch.Generator().manual_seed(0), pyr, None,
                               salience=SalienceConfig(frac=0.0))
    salient = sample_ray_batch(kf, 4000, torch.Generator().manual_seed(0), pyr, None,
                               salience=SalienceConfig(frac=0.5))
    expected = masks.mean()
    assert _object_share(uniform, masks) == pytest.approx(expected, abs=0.004)
    # half the batch drawn by salience: the 0.5 % object gets a large share of it
    assert _object_share(salient, masks) > 20 * expected
    # the other half stays uniform: every part of every keyframe is still drawn
    assert set(salient["kf_ids"].tolist()) == {3, 4, 5}
    assert salient["clip"].shape == (4000, pyr.dim) and torch.isfinite(salient["clip"]).all()


def test_no_targets_before_the_language_phase_but_salience_still_applies(setup):
    kf, pyr, masks = setup
    b = sample_ray_batch(kf, 2000, torch.Generator().manual_seed(1), pyr, None,
                         salience=SalienceConfig(frac=0.5), targets=False)
    assert "clip" not in b and "clip_scale_factor" not in b
    assert _object_share(b, masks) > 4 * masks.mean()


def test_without_a_salience_table_sampling_is_uniform(setup):
    kf, pyr, masks = setup
    plain = KeyframeTensors(kf.kf_ids, kf.images, kf.depth, kf.T_world_cam, kf.intrinsics, kf.sizes)
    b = sample_ray_batch(plain, 4000, torch.Generator().manual_seed(0), pyr, None,
                         salience=SalienceConfig(frac=0.5))
    assert _object_share(b, masks) == pytest.approx(masks.mean(), abs=0.004)


def test_cells_are_drawn_by_weight_and_none_is_excluded(setup):
    kf = setup[0]
    table = kf.salience
    assert table.rows.shape[0] == table.score.shape[0] == table.centre.shape[0] > 0
    assert float(table.score.max()) > 10 * float(table.score.median())  # the red patch's cells stand out
    flat = salience.CellTable(table.rows, table.centre, table.half, torch.zeros_like(table.score))
    flat.weights(SalienceConfig())
    rows, u, v = salience.draw(flat, 20000, kf.sizes, torch.Generator().manual_seed(0))
    # all scores equal: every keyframe in proportion to its cells, pixels spread over the whole image
    share = torch.bincount(rows, minlength=3).double() / 20000
    cells = torch.bincount(table.rows, minlength=3).double() / table.rows.shape[0]
    torch.testing.assert_close(share, cells, atol=0.02, rtol=0)
    assert int(u.min()) <= 2 and int(u.max()) >= W - 3 and int(v.min()) <= 2 and int(v.max()) >= H - 3
    nan = salience.CellTable(table.rows, table.centre, table.half, torch.full_like(table.score, math.nan))
    nan.weights(SalienceConfig())
    assert torch.isfinite(nan.cdf).all() and float(nan.cdf[-1]) > 0


@pytest.mark.parametrize("kwargs", [{"frac": 1.5}, {"frac": -0.1}, {"power": 0.0},
                                    {"floor": 0.0}, {"power": math.inf}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SalienceConfig(**kwargs).validate()


def test_log_uniform_tile_sizes_give_small_tiles_their_share(setup):
    _, pyr, _ = setup
    f = pyr.random_tile_frac(20000, torch.Generator().manual_seed(0))
    lo, hi = pyr.config.tile_fracs[0], pyr.config.tile_fracs[-1]
    assert float(f.min()) >= lo and float(f.max()) <= hi
    # log-uniform over 0.1 .. 0.4: each factor of 2 gets half the draws (uniform would give 1/3 to 0.1-0.2)
    assert float((f < 0.2).float().mean()) == pytest.approx(0.5, abs=0.02)
