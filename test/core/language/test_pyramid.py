"""CLIP pyramid: crop geometry, interpolation at and between crop centres and scales, metric scale,
cache keys and persistence, with an encoder whose output encodes where its crop came from."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lerf_ros.core.encoders import load_encoder
from lerf_ros.core.language.dense_features import Cancelled
from lerf_ros.core.language.pyramid import ClipPyramid, PyramidConfig, level_grid, metric_scale

H, W = 40, 60


class PositionEncoder:
    """Embeds a crop as normalize([mean R, mean G, 1]); on a ramp image that is the crop centre."""

    dim, input_size = 3, 10

    def __init__(self, name="position-encoder"):
        self.name = name
        self.calls = 0

    def encode_images(self, images):
        self.calls += images.shape[0]
        m = images.mean(dim=(2, 3))
        return F.normalize(torch.stack([m[:, 0], m[:, 1], torch.ones_like(m[:, 0])], dim=1), dim=1)

    def encode_texts(self, texts):
        return F.normalize(torch.ones(len(texts), 3), dim=1)


def ramp_image():
    """(3, H, W) float: R = u / (W - 1), G = v / (H - 1), B = 0."""
    u = torch.arange(W, dtype=torch.float32) / (W - 1)
    v = torch.arange(H, dtype=torch.float32) / (H - 1)
    return torch.stack([u.expand(H, W), v[:, None].expand(H, W), torch.zeros(H, W)])


# float32 storage so interpolation is checked to 1e-4; the fp16 default is checked with the demo encoder.
CFG = PyramidConfig(
    tile_fracs=(0.25, 0.5), stride_ratios=(1.0, 0.5), stride_ramp=(0.25, 0.5), batch_size=7, dtype="float32"
)


@pytest.fixture
def pyr():
    p = ClipPyramid(PositionEncoder(), CFG, "cpu")
    p.add(3, ramp_image())
    return p


def _sample(p, u, v, frac, kf=3):
    return p.sample(torch.tensor([kf]), torch.tensor([[u, v]], dtype=torch.float32), torch.tensor([frac]))[0]


def _decode(e):
    """Crop centre (u, v) in pixels from a PositionEncoder embedding."""
    return float(e[0] / e[2]) * (W - 1), float(e[1] / e[2]) * (H - 1)


def test_level_grids_by_hand():
    # 0.25 * 40 = 10 px tiles, stride 10 (no overlap): 6 x 4 crops centred at 4.5 + 10 j, 4.5 + 10 i
    lv0, lv1 = (level_grid(f, H, W, CFG) for f in CFG.tile_fracs)
    assert (lv0.tile_px, lv0.stride_px, lv0.nx, lv0.ny, lv0.centre0) == (10, 10, 6, 4, (4.5, 4.5))
    # 20 px tiles, stride 10 (half overlap): 5 x 3 crops centred at 9.5 + 10 j
    assert (lv1.tile_px, lv1.stride_px, lv1.nx, lv1.ny, lv1.centre0) == (20, 10, 5, 3, (9.5, 9.5))
    # leftover pixels are split evenly: 45 px wide, tile 10, stride 10 -> 4 crops, margin 2
    assert level_grid(0.25, 40, 45, CFG).x_start == 2
    # LERF defaults on 480 x 640: smallest tiles do not overlap, from 0.15 up they overlap by half
    levels = [level_grid(f, 480, 640, PyramidConfig()) for f in PyramidConfig().tile_fracs]
    assert levels[0].tile_px == 24 and levels[0].stride_px == 24
    assert levels[-1].tile_px == 240 and levels[-1].stride_px == 120
    assert len(levels) == 7


def test_exact_at_crop_centres(pyr):
    for frac, (u0, step, nx, ny) in zip(CFG.tile_fracs, [(4.5, 10, 6, 4), (9.5, 10, 5, 3)], strict=True):
        for i in range(ny):
            for j in range(nx):
                u, v = u0 + step * j, u0 + step * i
                e = _sample(pyr, u, v, frac)
                assert _decode(e) == pytest.approx((u, v), abs=1e-4)
                assert torch.allclose(e, pyr.level_embeddings(3, CFG.tile_fracs.index(frac))[i, j], atol=1e-3)
    assert pyr.encoder.calls == 6 * 4 + 5 * 3


def test_halfway_between_two_centres(pyr):
    a, b = _sample(pyr, 14.5, 24.5, 0.25), _sample(pyr, 24.5, 24.5, 0.25)
    mid = _sample(pyr, 19.5, 24.5, 0.25)
    assert torch.allclose(mid, F.normalize(0.5 * a + 0.5 * b, dim=0), atol=1e-4)
    q = _sample(pyr, 17.0, 24.5, 0.25)  # a quarter of the way
    assert torch.allclose(q, F.normalize(0.75 * a + 0.25 * b, dim=0), atol=1e-4)
    # beyond the outermost centre: clamped to the edge crop
    assert torch.allclose(_sample(pyr, 0.0, 0.0, 0.25), _sample(pyr, 4.5, 4.5, 0.25), atol=1e-6)


def test_per_crop_scalars_blend_like_embeddings(pyr):
    """cell_values / sample_cells: a per-crop scalar (here the crop centre's u), bilinear between centres
    and linear between levels; u is linear in the image, so every interior point reads its own u exactly."""
    values = pyr.cell_values(3, lambda g: g[:, 0] / g[:, 2] * (W - 1))
    assert values.shape == (6 * 4 + 5 * 3,)
    uv = torch.tensor([[14.5, 24.5], [17.0, 24.5], [12.3, 11.1], [30.0, 20.0]])
    for frac in (0.25, 0.3, 0.5):
        got = pyr.sample_cells(3, values, uv, torch.full((4,), frac))
        torch.testing.assert_close(got, uv[:, 0], atol=1e-3, rtol=0)
    levels = pyr.cell_levels(3, values, uv)
    assert levels.shape == (2, 4)
    torch.testing.assert_close(pyr.blend_levels(levels, torch.full((4,), 0.3)), uv[:, 0], atol=1e-3, rtol=0)
    # beyond the outermost centre: the edge crop's value, as `sample` clamps
    edge = pyr.sample_cells(3, values, torch.tensor([[0.0, 0.0]]), torch.tensor([0.25]))
    assert float(edge) == pytest.approx(4.5, abs=1e-3)
    with pytest.raises(ValueError):
        pyr.sample_cells(3, values, torch.zeros(2, 2), torch.tensor([0.25]))


def test_corner_table_reads_many_keyframes_of_several_sizes_as_each_alone(pyr):
    """`corner_table` over the concatenated grids of keyframes of two image sizes gives, row by row, what
    `sample_cells` gives for the row's own keyframe (so one gather serves every keyframe of a query)."""
    small = torch.nn.functional.interpolate(ramp_image()[None], size=(30, 44), mode="bilinear")[0]
    pyr.add(5, small)
    pyr.add(7, ramp_image().flip(2))
    ids = [7, 3, 5]
    def fn(g):
        return g[:, 0] * 3.0 + g[:, 1]

    values = fn(pyr.grids_of(ids))
    assert values.shape[0] == sum(pyr.cell_values(k, fn).shape[0] for k in ids)
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 3, (50,), generator=gen)
    uv = torch.rand(50, 2, generator=gen) * torch.tensor([W - 1.0, H - 1.0])
    frac = 0.25 + 0.25 * torch.rand(50, generator=gen)
    cells, w = pyr.corner_table(ids, pos, uv)
    assert cells.shape == w.shape == (2, 50, 4)
    got = pyr.blend_levels((values[cells] * w).sum(-1), frac)
    for r in range(50):
        k = ids[int(pos[r])]
        want = pyr.sample_cells(k, pyr.cell_values(k, fn), uv[r:r + 1], frac[r:r + 1])
        torch.testing.assert_close(got[r:r + 1], want, atol=1e-5, rtol=0)
    # only the levels asked for, per row: the same cells and weights as the full table's
    pick = torch.stack([torch.randint(0, 2, (50,), generator=gen), torch.randint(0, 2, (50,), generator=gen)])
    some, sw = pyr.corner_table(ids, pos, uv, levels=pick)
    rows = torch.arange(50)
    assert some.shape == (2, 50, 4)
    for k in range(2):
        assert torch.equal(some[k], cells[pick[k], rows]) and torch.equal(sw[k], w[pick[k], rows])


def test_between_scales(pyr):
    # (14.5, 14.5) is a level-0 centre and the midpoint of four level-1 centres (9.5 / 19.5)
    e0 = _sample(pyr, 14.5, 14.5, 0.25)
    corners = [_sample(pyr, u, v, 0.5) for u in (9.5, 19.5) for v in (9.5, 19.5)]
    e1 = sum(corners) / 4
    for t in (0.0, 0.3, 0.5, 1.0):
        got = _sample(pyr, 14.5, 14.5, 0.25 + 0.25 * t)
        assert torch.allclose(got, F.normalize((1 - t) * e0 + t * e1, dim=0), atol=1e-4), t
    # outside the tile range: clamped to the nearest level
    assert torch.allclose(_sample(pyr, 14.5, 14.5, 0.05), e0, atol=1e-6)


def test_batch_over_keyframes_and_sizes(pyr):
    img2 = ramp_image().flip(2)  # mirrored: R decreases with u
    pyr.add(7, img2)
    small = F.interpolate(ramp_image()[None], size=(20, 40), mode="bilinear", align_corners=False)[0]
    pyr.add(9, small)
    kf = torch.tensor([3, 7, 9, 3])
    uv = torch.tensor([[4.5, 4.5], [4.5, 4.5], [4.5, 4.5], [54.5, 34.5]])
    out = pyr.sample(kf, uv, torch.full((4,), 0.25))
    assert out.shape == (4, 3) and torch.allclose(out.norm(dim=1), torch.ones(4))
    assert _decode(out[0]) == pytest.approx((4.5, 4.5), abs=1e-4)
    assert _decode(out[1])[0] == pytest.approx(W - 1 - 4.5, abs=1e-4)  # mirrored image
    assert _decode(out[3]) == pytest.approx((54.5, 34.5), abs=1e-4)
    assert torch.allclose(out[2], _sample(pyr, 4.5, 4.5, 0.25, kf=9))
    with pytest.raises(ValueError, match="42"):
        pyr.sample(torch.tensor([42]), uv[:1], torch.tensor([0.25]))
    assert pyr.remove(7) and not pyr.ready(7) and pyr.ready(3)
    with pytest.raises(ValueError, match="7"):
        pyr.sample(torch.tensor([7]), uv[:1], torch.tensor([0.25]))
    assert torch.allclose(pyr.sample(kf[[0, 3]], uv[[0, 3]], torch.full((2,), 0.25)), out[[0, 3]])


def test_metric_scale_by_hand():
    # a 10 %-of-480 px tile (48 px) at 2 m with fy = 500 px spans 48 * 2 / 500 = 0.192 m
    assert metric_scale(0.1, 480, 500.0, 2.0) == pytest.approx(0.192)
    t = metric_scale(torch.tensor([0.05, 0.5]), 480, 600.0, torch.tensor([1.0, 3.0]))
    assert torch.allclose(t, torch.tensor([0.04, 1.2]))


def test_random_tile_frac_range_and_determinism(pyr):
    a = pyr.random_tile_frac(1000, torch.Generator().manual_seed(0))
    b = pyr.random_tile_frac(1000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and float(a.min()) >= 0.25 and float(a.max()) <= 0.5
    assert float(a.max() - a.min()) > 0.2


def test_cache_key_changes_with_content_encoder_and_settings():
    img = (np.arange(H * W * 3) % 251).astype(np.uint8).reshape(H, W, 3)
    base = ClipPyramid(PositionEncoder(), CFG)
    k = base.cache_key(img)
    assert k == base.cache_key(img.copy())
    # the same content as a (3, H, W) float tensor gives the same key
    assert k == base.cache_key(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
    changed = img.copy()
    changed[5, 5, 1] ^= 1
    assert base.cache_key(changed) != k
    assert ClipPyramid(PositionEncoder("other"), CFG).cache_key(img) != k
    other_cfg = PyramidConfig(**{**CFG.__dict__, "stride_ratios": (1.0, 0.4)})
    assert ClipPyramid(PositionEncoder(), other_cfg).cache_key(img) != k
    assert base.add(0, img) == k and base.key(0) == k


def test_state_dict_round_trip_and_validation(pyr):
    state = pyr.state_dict()
    fresh = ClipPyramid(PositionEncoder(), CFG)
    fresh.load_state_dict(state)
    uv = torch.tensor([[11.0, 7.0], [30.0, 22.0]])
    fr = torch.tensor([0.3, 0.45])
    assert torch.equal(fresh.sample(torch.tensor([3, 3]), uv, fr), pyr.sample(torch.tensor([3, 3]), uv, fr))
    assert fresh.key(3) == pyr.key(3) and fresh.encoder.calls == 0
    with pytest.raises(ValueError, match="encoder_name"):
        ClipPyramid(PositionEncoder("other"), CFG).load_state_dict(state)
    with pytest.raises(ValueError, match="config"):
        ClipPyramid(PositionEncoder(), PyramidConfig()).load_state_dict(state)
    bad = {**state, "keyframes": {3: {**state["keyframes"][3], "grid": state["keyframes"][3]["grid"][:-1]}}}
    with pytest.raises(ValueError, match="keyframe 3"):
        fresh.load_state_dict(bad)
    assert fresh.ready(3)  # a failed load changes nothing
    with pytest.raises(ValueError, match="format"):
        fresh.load_state_dict({"format": "something else"})


def test_config_validation():
    with pytest.raises(ValueError, match="tile_fracs"):
        PyramidConfig(tile_fracs=(0.5, 0.25)).validate()
    with pytest.raises(ValueError, match="dtype"):
        PyramidConfig(dtype="int8").validate()


def test_demo_encoder_pyramid_stores_fp16_unit_embeddings():
    enc = load_encoder("lerf_ros.core.encoders.demo:colour_name_encoder")
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32] = (200, 30, 30)
    img[:, 32:] = (30, 60, 200)
    p = ClipPyramid(enc, PyramidConfig(tile_fracs=(0.25, 0.5)))
    p.add(0, img)
    assert p.store.dtype == torch.float16
    red, blue = enc.encode_texts(["red", "blue"])
    out = p.sample(
        torch.tensor([0, 0]), torch.tensor([[5.0, 20.0], [60.0, 20.0]]), torch.tensor([0.25, 0.25])
    )
    assert float(out[0] @ red) > 0.8 and float(out[1] @ blue) > 0.8


# ---- dense (DINO) feature cache: same store, one grid per keyframe -------------------------------


def test_dense_cache_bilinear_at_and_between_cell_centres():
    from lerf_ros.core.language.dense_features import DenseFeatureCache

    enc = load_encoder("lerf_ros.core.encoders.demo:colour_dense_encoder", dense=True)  # patch 8
    cache = DenseFeatureCache(enc, "cpu", dtype="float32")
    cache.add(5, ramp_image())  # 40 x 60 -> 5 x 8 cells (60 / 8 rounds to 8: cells 7.5 px wide)
    cell_w, cell_h = W / 8, H / 5

    def red_green(u, v):
        f = cache.sample(torch.tensor([5]), torch.tensor([[u, v]], dtype=torch.float32))[0]
        return float(f[0]), float(f[1])

    # channels 0/1 are the mean R/G of the cell = the ramp at the cell centre (within resampling error)
    for i, j in [(0, 0), (2, 3), (4, 7)]:
        u, v = (j + 0.5) * cell_w - 0.5, (i + 0.5) * cell_h - 0.5
        r, g = red_green(u, v)
        assert r == pytest.approx(u / (W - 1), abs=2e-3) and g == pytest.approx(v / (H - 1), abs=2e-3)
    # halfway between two cell centres: the mean of both samples
    u_a, u_b, v = 2.5 * cell_w - 0.5, 3.5 * cell_w - 0.5, 2.5 * cell_h - 0.5
    a = cache.sample(torch.tensor([5, 5, 5]), torch.tensor([[u_a, v], [u_b, v], [(u_a + u_b) / 2, v]]))
    assert torch.allclose(a[2], (a[0] + a[1]) / 2, atol=1e-6)
    assert cache.ready(5) and not cache.ready(6)
    state = cache.state_dict()
    other = DenseFeatureCache(enc, "cpu", dtype="float32")
    other.load_state_dict(state)
    uv = torch.tensor([[13.0, 17.0]])
    assert torch.equal(other.sample(torch.tensor([5]), uv), cache.sample(torch.tensor([5]), uv))
    state["keyframes"][5]["grid"] = state["keyframes"][5]["grid"][:, :3]
    with pytest.raises(ValueError, match="keyframe 5"):
        other.load_state_dict(state)
    assert cache.remove(5) and not cache.ready(5)


def test_adding_from_a_worker_while_sampling(pyr):
    import threading

    uv = torch.tensor([[14.5, 14.5], [33.0, 21.0]])
    fr = torch.tensor([0.25, 0.4])
    ids = torch.tensor([3, 3])
    before = pyr.sample(ids, uv, fr)
    errors = []

    def worker():
        try:
            for k in range(10, 22):  # forces the slot tensor to grow twice while the main thread samples
                pyr.add(k, ramp_image())
        except Exception as exc:  # re-raised below in the main thread
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        assert torch.equal(pyr.sample(ids, uv, fr), before)
    t.join()
    assert not errors
    assert all(pyr.ready(k) for k in range(10, 22))
    assert torch.equal(pyr.sample(torch.tensor([21, 21]), uv, fr), before)


# ---------------------------------------------------------------------------- cancellation


class SlowEncoder(PositionEncoder):
    """PositionEncoder that sleeps per batch and counts batches (a CPU ViT stand-in)."""

    def __init__(self, sleep_s=0.02):
        super().__init__("slow-position-encoder")
        self.sleep_s, self.batches = sleep_s, 0
        self.started = threading.Event()

    def encode_images(self, images):
        self.batches += 1
        self.started.set()
        threading.Event().wait(self.sleep_s)
        return super().encode_images(images)


def test_cancel_between_batches_stores_nothing():
    enc = SlowEncoder()
    pyr = ClipPyramid(enc, PyramidConfig(batch_size=8, dtype="float32"))
    n_batches = sum(-(-lv.nx * lv.ny // 8) for lv in pyr.levels(H, W))
    cancel, errors = threading.Event(), []

    def run():
        try:
            pyr.add(7, ramp_image(), cancel)
        except Cancelled as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert enc.started.wait(10)
    at_cancel = enc.batches
    cancel.set()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1 and "cancelled" in str(errors[0])
    assert enc.batches <= at_cancel + 1 < n_batches // 2  # at most the batch in flight, far from all
    assert not pyr.ready(7) and pyr.keyframe_ids() == [] and pyr.key(7) is None
    # not cancelled: the full pyramid, every batch
    enc.batches, enc.sleep_s = 0, 0.0
    pyr.add(7, ramp_image(), threading.Event())
    assert pyr.ready(7) and enc.batches == n_batches


def test_crops_cut_from_a_full_resolution_source_match_the_same_crops_of_the_image():
    """The crop grid stays the image's; each crop is cut from the larger view (LERF crops full frames)."""
    k = 3
    x = (torch.arange(W * k, dtype=torch.float32) + 0.5) / k - 0.5  # source pixel centres in image pixels
    y = (torch.arange(H * k, dtype=torch.float32) + 0.5) / k - 0.5
    source = torch.stack([(x / (W - 1)).expand(H * k, W * k), (y / (H - 1))[:, None].expand(H * k, W * k),
                          torch.zeros(H * k, W * k)])
    plain = ClipPyramid(PositionEncoder(), CFG, "cpu")
    size, grid = plain.compute(ramp_image())
    full = ClipPyramid(PositionEncoder(), CFG, "cpu")
    size_s, grid_s = full.compute(ramp_image(), source=source)
    assert size == size_s
    torch.testing.assert_close(grid_s, grid, atol=2e-3, rtol=0)
    assert plain.cache_key(ramp_image()) != full.cache_key(ramp_image(), source)
    with pytest.raises(ValueError, match="aspect"):
        full.compute(ramp_image(), source=torch.zeros(3, H * 2, W * 3))


# ---- training-batch sampling: no host sync, several image sizes ------------------------------------


def test_training_samples_of_several_sizes_need_no_host_sync(pyr):
    """``check_ids=False`` (a training batch): no read-back at all, even with keyframes of two image sizes
    (two store layouts: every row is interpolated in each, its own kept), and the same values."""
    from lerf_test_doubles.host_sync import HostSyncCounter

    from lerf_ros.core.language.dense_features import DenseFeatureCache

    small = F.interpolate(ramp_image()[None], size=(20, 40), mode="bilinear", align_corners=False)[0]
    pyr.add(9, small)
    dense = DenseFeatureCache(load_encoder("lerf_ros.core.encoders.demo:colour_dense_encoder", dense=True),
                              "cpu", dtype="float32")
    dense.add(3, ramp_image())
    dense.add(9, small)
    g = torch.Generator().manual_seed(0)
    kf = torch.tensor([3, 9])[torch.randint(0, 2, (50,), generator=g)]
    uv = torch.rand(50, 2, generator=g) * torch.tensor([39.0, 19.0])
    frac = 0.25 + 0.25 * torch.rand(50, generator=g)
    with HostSyncCounter() as syncs:
        emb = pyr.sample(kf, uv, frac, check_ids=False)
        feats = dense.sample(kf, uv, check_ids=False)
    assert syncs.count == 0, syncs.sites
    with HostSyncCounter() as checked:
        torch.testing.assert_close(pyr.sample(kf, uv, frac), emb, rtol=0, atol=0)
    assert checked.count > 0  # the id check reads back: the counter sees it
    for i in (0, 1, 17, 49):  # each row as its own keyframe alone gives it
        one = pyr.sample(kf[i:i + 1], uv[i:i + 1], frac[i:i + 1])
        torch.testing.assert_close(emb[i:i + 1], one, rtol=0, atol=1e-7)
        torch.testing.assert_close(feats[i:i + 1], dense.sample(kf[i:i + 1], uv[i:i + 1]), rtol=0, atol=1e-7)


# ---- crop batches: fp16 channels-last on CUDA, fp32 on the CPU --------------------------------------


class SpyEncoder(PositionEncoder):
    """Records the dtype and layout of every crop batch it is handed."""

    def __init__(self):
        super().__init__("spy-encoder")
        self.seen = []

    def encode_images(self, images):
        self.seen.append((images.dtype, images.is_contiguous(memory_format=torch.channels_last),
                          images.shape[0]))
        return super().encode_images(images.float())


def test_crop_batch_format_by_device():
    from lerf_ros.core.language.pyramid import crop_batch_format, encoder_batch

    assert crop_batch_format(torch.device("cuda")) == (torch.float16, torch.channels_last)
    assert crop_batch_format(torch.device("cpu")) == (torch.float32, torch.preserve_format)
    crops = torch.rand(5, 3, 10, 10, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    gpu = encoder_batch(crops, torch.device("cuda"))  # the conversion itself runs anywhere
    assert gpu.dtype == torch.float16 and gpu.is_contiguous(memory_format=torch.channels_last)
    assert not gpu.is_contiguous() and gpu.shape == crops.shape
    torch.testing.assert_close(gpu.float(), crops.clamp(0, 1), rtol=0, atol=1e-3)
    cpu = encoder_batch(crops, torch.device("cpu"))
    assert cpu.dtype == torch.float32 and torch.equal(cpu, crops.clamp(0, 1))
    # On the CPU the pyramid hands fp32 batches of batch_size crops; batched equals one crop at a time.
    spy = SpyEncoder()
    p = ClipPyramid(spy, CFG, "cpu")
    _, grid = p.compute(ramp_image())
    assert {(dt, cl) for dt, cl, _ in spy.seen} == {(torch.float32, False)}
    assert max(n for *_, n in spy.seen) == CFG.batch_size
    one = ClipPyramid(PositionEncoder(), PyramidConfig(**{**CFG.__dict__, "batch_size": 1}), "cpu")
    torch.testing.assert_close(one.compute(ramp_image())[1], grid, rtol=0, atol=1e-6)
