"""Hash encoding (torch backend vs hand-computed tinycudann semantics), scene box, fields."""

import math

import numpy as np
import pytest
import torch

from lerf_ros.core.fields import (
    MLP,
    HashEncoding,
    HashEncodingConfig,
    LanguageField,
    LanguageFieldConfig,
    MLPConfig,
    RadianceField,
    RadianceFieldConfig,
    SceneBox,
)
from lerf_ros.core.fields.hash_encoding import _GridInterp, level_layout, resolve_implementation
from lerf_ros.core.fields.radiance_field import sh_encoding, trunc_exp

DENSE = HashEncodingConfig(2, 2, 14, 4, 8, "torch")  # res 4 and 8 vertices: both dense (<= 2^14)
MIXED = HashEncodingConfig(4, 2, 12, 8, 64, "torch")  # 2^12 table: coarse dense, fine hashed


def _indexed_table(enc: HashEncoding) -> None:
    with torch.no_grad():
        rows = torch.arange(enc.total_entries, dtype=torch.float32)
        enc.params.copy_(torch.stack([rows, -2 * rows], -1).reshape(-1))


def test_layout_matches_tinycudann_rules():
    scales, res, sizes, offsets = level_layout(MIXED)
    # per_level_scale = (64/8)^(1/3) = 2: scales 7, 15, 31, 63 -> resolutions 8, 16, 32, 64.
    assert scales == pytest.approx([7.0, 15.0, 31.0, 63.0])
    assert res == [8, 16, 32, 64]
    assert sizes == [512, 4096, 4096, 4096]  # 8^3, 16^3 fit; 32^3, 64^3 are capped at 2^12 (hashed)
    assert offsets == [0, 512, 4608, 8704]


def test_exact_value_at_dense_vertex_and_shape():
    enc = HashEncoding(DENSE)
    _indexed_table(enc)
    scales, res, _, offsets = level_layout(DENSE)
    vertex = (2, 1, 3)
    # Level 0: vertex i sits at x = (i - 0.5) / scale.
    x = torch.tensor([[(i - 0.5) / scales[0] for i in vertex]])
    out = enc(x)
    assert out.shape == (1, DENSE.output_dim) and out.dtype == torch.float32
    row = vertex[0] + vertex[1] * res[0] + vertex[2] * res[0] ** 2 + offsets[0]
    torch.testing.assert_close(out[0, :2], torch.tensor([row, -2.0 * row]))


def test_trilinear_interpolation_and_continuity():
    enc = HashEncoding(DENSE)
    _indexed_table(enc)
    scales = level_layout(DENSE)[0]
    a = torch.tensor([(1 - 0.5) / scales[0], (2 - 0.5) / scales[0], (1 - 0.5) / scales[0]])
    b = a + torch.tensor([1.0 / scales[0], 0.0, 0.0])  # next vertex along x
    t = torch.linspace(0, 1, 11)[:, None]
    out = enc(a + t * (b - a))[:, :2]
    # Indexed table is linear in the row, so along one edge the output is exactly linear in t.
    expected = out[0] + t * (out[-1] - out[0])
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-5)
    assert (out[-1, 0] - out[0, 0]).item() == pytest.approx(1.0)  # one step in x = one row
    # Continuity across a cell boundary (random table so the cells differ).
    enc2 = HashEncoding(MIXED)
    x = torch.rand(200, 3) * 0.9 + 0.05
    with torch.no_grad():
        enc2.params.normal_()
    assert (enc2(x + 1e-5) - enc2(x)).abs().max() < 0.05


def test_hashed_level_uses_coherent_prime_hash():
    enc = HashEncoding(MIXED)
    _indexed_table(enc)
    scales, _, sizes, offsets = level_layout(MIXED)
    level = 3
    vertex = (5, 9, 17)
    x = torch.tensor([[(i - 0.5) / scales[level] for i in vertex]])
    h = (vertex[0] * 1) ^ (vertex[1] * 2654435761) ^ (vertex[2] * 805459861)
    row = (h & 0xFFFFFFFF) % sizes[level] + offsets[level]
    out = enc(x)[0, 2 * level : 2 * level + 2]
    torch.testing.assert_close(out, torch.tensor([float(row), -2.0 * row]))


def _reference_encoding(enc: HashEncoding, x: np.ndarray) -> np.ndarray:
    """Point-by-point tinycudann HashGrid semantics, written independently of the vectorised code."""
    cfg = enc.config
    scales, res, sizes, offsets = level_layout(cfg)
    table = enc.params.detach().view(-1, cfg.features_per_level).numpy().astype(np.float64)
    out = np.zeros((len(x), cfg.num_levels * cfg.features_per_level))
    for i, p in enumerate(x):
        for lvl in range(cfg.num_levels):
            pos = p * scales[lvl] + 0.5
            base = np.floor(pos).astype(np.int64)
            frac = pos - base
            for corner in range(8):
                bits = np.array([(corner >> a) & 1 for a in range(3)])
                vert = base + bits
                weight = np.prod(np.where(bits == 1, frac, 1 - frac))
                if res[lvl] ** 3 <= sizes[lvl]:
                    row = vert[0] + vert[1] * res[lvl] + vert[2] * res[lvl] ** 2
                else:
                    row = (int(vert[0]) * 1) ^ (int(vert[1]) * 2654435761) ^ (int(vert[2]) * 805459861)
                row = (row & 0xFFFFFFFF) % sizes[lvl] + offsets[lvl]
                f = cfg.features_per_level
                out[i, lvl * f : (lvl + 1) * f] += weight * table[row]
    return out


def test_matches_pointwise_reference():
    enc = HashEncoding(MIXED)
    with torch.no_grad():
        enc.params.normal_()
    x = np.random.default_rng(3).uniform(0.0, 0.95, size=(40, 3))  # away from the wrap region
    got = enc(torch.as_tensor(x, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(got, _reference_encoding(enc, x), atol=2e-4)


def test_gradients_flow_and_match_autograd():
    enc = HashEncoding(MIXED)
    x = torch.rand(64, 3)
    enc(x).sum().backward()
    g = enc.params.grad.view(-1, 2)
    # 64 points x 4 levels, corner weights summing to 1 per level: total gradient 64 * 4 per feature.
    assert g[:, 0].sum().item() == pytest.approx(64 * 4, rel=1e-4)
    assert (g[:, 0] != 0).sum() > 100
    table = torch.randn(50, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 50, (3, 8, 7))  # (L, 8, N)
    w = torch.rand(3, 8, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: _GridInterp.apply(t, idx, w), (table,))


def test_implementation_selection():
    assert resolve_implementation("torch") == "torch"
    if not torch.cuda.is_available():
        assert resolve_implementation("auto") == "torch"
        with pytest.raises(ValueError, match="tinycudann"):
            HashEncoding(HashEncodingConfig(implementation="tcnn"))
    with pytest.raises(ValueError, match="implementation"):
        HashEncodingConfig(implementation="cuda").validate()


# The backends against PyTorch on a GPU (tinycudann, Triton, PyTorch on CUDA): test_cuda.py.


def test_mlp_torch():
    mlp = MLP(5, 3, MLPConfig(2, 16, "sigmoid", "torch"))
    y = mlp(torch.randn(10, 5))
    assert y.shape == (10, 3) and bool(((y > 0) & (y < 1)).all())


def test_scene_box_normalise_contract_and_dict():
    box = SceneBox((-1.0, -2.0, 0.0), (3.0, 2.0, 2.0))
    pts = torch.tensor(
        [[-1.0, -2.0, 0.0], [3.0, 2.0, 2.0], [1.0, 0.0, 1.0], [1e6, 0.0, 1.0], [7.0, 0.0, 1.0]]
    )
    n = box.normalize(pts)
    torch.testing.assert_close(n[0], torch.full((3,), 0.25))
    torch.testing.assert_close(n[1], torch.full((3,), 0.75))
    torch.testing.assert_close(n[2], torch.full((3,), 0.5))
    assert n[3, 0].item() == pytest.approx(1.0, abs=1e-5)
    # x = 7 is 3 half-extents out: contracted 2 - 1/3, mapped (v + 2) / 4.
    assert n[4, 0].item() == pytest.approx((2 - 1 / 3 + 2) / 4)
    assert bool(((n >= 0) & (n <= 1)).all())
    assert SceneBox.from_dict(box.to_dict()) == box
    cams = np.array([[0.0, 0.0, 1.0], [2.0, 1.0, 1.5]])
    b2 = SceneBox.from_camera_positions(cams, 0.5)
    assert b2.min_xyz == (-0.5, -0.5, 0.5) and b2.max_xyz == (2.5, 1.5, 2.0)
    t_in, t_out = box.ray_intersect(torch.tensor([[-3.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert (t_in.item(), t_out.item()) == pytest.approx((2.0, 6.0))
    with pytest.raises(ValueError, match="max must exceed"):
        SceneBox((0, 0, 0), (1, 0, 1))


def test_trunc_exp_value_capped_gradient_not():
    x = torch.tensor([0.0, 10.0, 100.0, 1e4], requires_grad=True)
    y = trunc_exp(x)
    assert torch.isfinite(y).all()  # exp(100) overflows float32: the value is capped at exp(80)
    torch.testing.assert_close(y[:2], torch.exp(x[:2].detach()))
    assert y[2].item() == y[3].item() == pytest.approx(math.exp(80.0), rel=1e-5)
    y.sum().backward()
    # gradient exp(min(x, 15)) everywhere, so an overgrown density is still pulled back down
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([0.0, 10.0, 15.0, 15.0])))


def test_sh_encoding_values():
    d = torch.tensor([[0.0, 0.0, 1.0]])
    sh = sh_encoding(d, 3)
    assert sh.shape == (1, 9)
    assert sh[0, 0].item() == pytest.approx(0.5 / math.sqrt(math.pi))
    assert sh[0, 2].item() == pytest.approx(0.5 * math.sqrt(3 / math.pi))
    assert sh[0, 6].item() == pytest.approx(0.25 * math.sqrt(5 / math.pi) * 2)


def test_radiance_and_language_fields():
    box = SceneBox((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    g = HashEncodingConfig(4, 2, 12, 8, 64, "torch")
    rf = RadianceField(RadianceFieldConfig(g, 7, MLPConfig(1, 16, "none", "torch"),
                                           MLPConfig(1, 16, "sigmoid", "torch"), 2), box)
    pts = torch.randn(32, 3)
    dirs = torch.nn.functional.normalize(torch.randn(32, 3), dim=-1)
    sigma, rgb = rf(pts, dirs)
    assert sigma.shape == (32,) and bool((sigma >= 0).all())
    assert rgb.shape == (32, 3) and bool(((rgb >= 0) & (rgb <= 1)).all())
    head = MLPConfig(1, 16, "none", "torch")
    lcfg = LanguageFieldConfig((g, HashEncodingConfig(2, 2, 12, 32, 64, "torch")), head, head)
    lf = LanguageField(lcfg, box, clip_dim=12, dino_dim=5)
    feats = lf.features(pts)
    assert feats.shape == (32, 4 * 2 + 2 * 2)
    c1 = lf.clip(feats, torch.full((32,), 0.2))
    c2 = lf.clip(feats, torch.full((32,), 1.5))
    torch.testing.assert_close(c1.norm(dim=-1), torch.ones(32))
    assert (c1 - c2).abs().max() > 1e-4  # the scale is an input
    assert lf.dino(feats).shape == (32, 5)
