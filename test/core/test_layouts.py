"""Backend parameter layouts (``fields/layouts.py``): tinycudann FullyFusedMLP <-> PyTorch MLP, hash grids.

The tinycudann side is checked against its documented order, written out by hand here: the weight
matrices one after the other, each row-major (output rows x input columns), the input padded with ones
to a multiple of 16 (so the first matrix's padding columns are a bias), the output rows padded to a
multiple of 16, no other biases.
"""

import dataclasses

import numpy as np
import pytest
import torch

from lerf_ros.core.fields import MLP, HashEncoding, HashEncodingConfig, MLPConfig
from lerf_ros.core.fields import layouts as lay
from lerf_ros.core.fields.hash_encoding import level_layout
from lerf_ros.core.model import LERFModel, tiny_config

IN, OUT, WIDTH, HIDDEN = 3, 2, 16, 2


def _hand_mlp() -> MLP:
    """3 -> 16 -> 16 -> 2 with entries that name their place: W_l[r, c] = l * 1000 + r * 20 + c."""
    mlp = MLP(IN, OUT, MLPConfig(HIDDEN, WIDTH, "none", "torch"))
    with torch.no_grad():
        for layer, idx in enumerate((0, 2, 4)):
            lin = mlp.net[idx]
            r, c = lin.weight.shape
            lin.weight.copy_(layer * 1000 + torch.arange(r)[:, None] * 20.0 + torch.arange(c)[None, :])
            lin.bias.zero_()
        mlp.net[0].bias.copy_(-torch.arange(WIDTH, dtype=torch.float32) - 0.5)
    return mlp


def _fused_reference(flat: torch.Tensor, x: torch.Tensor, in_dim, out_dim, width, hidden) -> torch.Tensor:
    """tinycudann's Network: Identity encoding (pads with ones) + FullyFusedMLP, from the documented order."""
    x = torch.cat([x, torch.ones(x.shape[0], lay.ceil16(in_dim) - in_dim)], dim=1)
    pos = 0
    shapes = [(width, lay.ceil16(in_dim))] + [(width, width)] * (hidden - 1) + [(lay.ceil16(out_dim), width)]
    for i, (r, c) in enumerate(shapes):
        w = flat[pos:pos + r * c].view(r, c)  # row-major
        pos += r * c
        x = x @ w.T
        if i < len(shapes) - 1:
            x = torch.relu(x)
    assert pos == flat.numel()
    return x[:, :out_dim]


def test_torch_to_tcnn_follows_documented_order():
    mlp = _hand_mlp()
    flat = lay.torch_mlp_to_tcnn(mlp.state_dict(), IN, OUT, WIDTH, HIDDEN)
    assert flat.shape == (16 * 16 + 16 * 16 + 16 * 16,)
    first, hidden, last = flat[:256].view(16, 16), flat[256:512].view(16, 16), flat[512:].view(16, 16)
    # first layer: columns 0..2 the weights, column 3 (the first padding input, value 1) the bias
    assert first[5, 2].item() == 5 * 20 + 2 and first[15, 0].item() == 300
    assert torch.equal(first[:, 3], -torch.arange(16.0) - 0.5)
    assert torch.count_nonzero(first[:, 4:]) == 0
    assert hidden[7, 11].item() == 1000 + 7 * 20 + 11  # row-major: flat[256 + 7 * 16 + 11]
    assert flat[256 + 7 * 16 + 11].item() == 1000 + 7 * 20 + 11
    assert last[1, 9].item() == 2000 + 20 + 9 and torch.count_nonzero(last[2:]) == 0  # padded rows
    x = torch.rand(9, IN)
    want = _fused_reference(flat, x, IN, OUT, WIDTH, HIDDEN)
    torch.testing.assert_close(want, mlp(x), rtol=1e-6, atol=1e-3)


def test_tcnn_to_torch_exact_and_round_trip():
    mlp = _hand_mlp()
    flat = lay.torch_mlp_to_tcnn(mlp.state_dict(), IN, OUT, WIDTH, HIDDEN)
    back = lay.tcnn_mlp_to_torch(flat, IN, OUT, WIDTH, HIDDEN)
    for k, v in mlp.state_dict().items():
        assert torch.equal(back[k], v), k
    # A tinycudann vector with weight on several padding columns: their sum is the bias.
    rng = torch.Generator().manual_seed(1)
    flat = torch.randn(flat.numel(), generator=rng)
    state = lay.tcnn_mlp_to_torch(flat, IN, OUT, WIDTH, HIDDEN)
    torch.testing.assert_close(state["net.0.bias"], flat[:256].view(16, 16)[:, 3:].sum(1))
    assert torch.count_nonzero(state["net.2.bias"]) == 0 and state["net.4.weight"].shape == (OUT, WIDTH)
    fresh = MLP(IN, OUT, MLPConfig(HIDDEN, WIDTH, "none", "torch"))
    fresh.load_state_dict(state)
    x = torch.rand(50, IN)
    want = _fused_reference(flat, x, IN, OUT, WIDTH, HIDDEN)
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)


def test_unconvertible_mlp_names_the_module():
    mlp = _hand_mlp()
    state = mlp.state_dict()
    state["net.2.bias"] = torch.full((WIDTH,), 0.1)
    with pytest.raises(lay.LayoutError, match=r"module 'radiance.color_mlp': layer 1 has a non-zero bias"):
        lay.torch_mlp_to_tcnn(state, IN, OUT, WIDTH, HIDDEN, module="radiance.color_mlp")
    wide = MLP(16, OUT, MLPConfig(1, WIDTH, "none", "torch"))  # 16 inputs: no padding column for a bias
    with pytest.raises(lay.LayoutError, match=r"layer 0 has a non-zero bias.*no padding column"):
        lay.torch_mlp_to_tcnn(wide.state_dict(), 16, OUT, WIDTH, 1, module="m")
    with torch.no_grad():
        wide.net[0].bias.zero_()
        wide.net[2].bias.zero_()
    assert lay.torch_mlp_to_tcnn(wide.state_dict(), 16, OUT, WIDTH, 1).numel() == 16 * 16 + 16 * 16
    with pytest.raises(lay.LayoutError, match=r"module 'lang.clip_head'.*has 768"):
        lay.tcnn_mlp_to_torch(torch.zeros(700), IN, OUT, WIDTH, HIDDEN, module="lang.clip_head")


def _tcnn_layout(model, state):
    """``state`` as a tinycudann build of ``model`` would save it, with the duplicate hash-grid key of
    maps written before it went; hidden and output biases must be zero."""
    out = dict(state)
    for path, mod in lay.backend_modules(model):
        if isinstance(mod, HashEncoding):
            out[f"{path}._tcnn.params"] = out[f"{path}.params"].clone()
        elif mod.config.hidden_dim in (16, 32, 64, 128) and mod.config.num_hidden_layers >= 1:
            own = {k[len(path) + 1:]: out.pop(k) for k in list(out) if k.startswith(path + ".")}
            out[f"{path}.net.params"] = lay.torch_mlp_to_tcnn(own, *lay._mlp_shape(mod), module=path)
    return out


def _zero_fusable_biases(model):
    """Hidden / output biases of every MLP tinycudann could hold set to zero (its function class)."""
    with torch.no_grad():
        for _, mod in lay.backend_modules(model):
            if isinstance(mod, MLP) and mod.config.hidden_dim in (16, 32, 64, 128):
                for i, layer in enumerate(m for m in mod.net if isinstance(m, torch.nn.Linear)):
                    if i > 0 or mod.in_dim % 16 == 0:
                        layer.bias.zero_()


def test_model_state_from_tcnn_layout_converts_exactly():
    from lerf_ros.core.fields.scene_box import SceneBox

    box = SceneBox((-1.0, -1.0, 0.0), (1.0, 1.0, 1.0))
    src = LERFModel(tiny_config("torch"), box, 8, 4)
    _zero_fusable_biases(src)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01 * (p != 0))  # trained-looking, still in tcnn's class
    saved = _tcnn_layout(src, src.state_dict())
    backends = {path: ("tcnn" if f"{path}.net.params" in saved or isinstance(m, HashEncoding) else "torch")
                for path, m in lay.backend_modules(src)}
    assert "radiance.density_mlp" in backends and backends["radiance.density_mlp"] == "tcnn"
    dst = LERFModel(tiny_config("torch"), box, 8, 4)
    conv = lay.convert_state(dst, saved, backends)
    assert set(conv.converted) == {p for p in backends if f"{p}.net.params" in saved}
    assert len(conv.converted) >= 4  # density, colour, proposal, language heads
    assert not any(k.endswith("_tcnn.params") for k in conv.state)
    dst.load_state_dict(conv.state)  # strict: every key and shape fits
    for k, v in src.state_dict().items():
        if k.endswith(".params"):  # hash tables: bit-exact
            assert torch.equal(conv.state[k], v), k
        else:
            torch.testing.assert_close(conv.state[k], v, rtol=0, atol=1e-6)
    pts = torch.rand(300, 3) * 1.8 - 0.9
    pts[:, 2] = pts[:, 2].abs()
    torch.testing.assert_close(dst.density_at_points(pts), src.density_at_points(pts), rtol=1e-5, atol=1e-5)
    # and back into the tinycudann layout, bit for bit
    again = _tcnn_layout(dst, conv.state)
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_hash_grid_layout_is_shared_and_checked_exactly():
    cfg = HashEncodingConfig(4, 2, 12, 8, 64, "torch")
    enc = HashEncoding(cfg)
    scales, res, sizes, offsets = level_layout(cfg)
    # tinycudann's table, built by hand: level-major blocks at the documented offsets, 2 features per row
    table = np.zeros((offsets[-1] + sizes[-1], 2), np.float32)
    for level in range(4):
        rows = np.arange(sizes[level])
        table[offsets[level] + rows] = np.stack([level * 10000 + rows, -rows], 1)
    flat = torch.from_numpy(table.reshape(-1))
    saved = {"g.params": flat.clone(), "g._tcnn.params": flat.clone()}
    holder = torch.nn.Module()
    holder.g = enc
    conv = lay.convert_state(holder, saved, {"g": "tcnn"})
    assert set(conv.state) == {"g.params"} and conv.converted == ()
    assert torch.equal(conv.state["g.params"], torch.from_numpy(table.reshape(-1)))
    holder.load_state_dict(conv.state)
    vertex = (2, 1, 3)  # level 0 is dense: row = x + y res + z res^2
    x = torch.tensor([[(i - 0.5) / scales[0] for i in vertex]])
    row = vertex[0] + vertex[1] * res[0] + vertex[2] * res[0] ** 2
    assert enc(x)[0, :2].tolist() == [float(row), -float(row)]
    # one table, one key, for every backend; a differing duplicate is a named error
    assert [k for k in enc.state_dict()] == ["params"]
    saved["g._tcnn.params"] = saved["g._tcnn.params"] + 1
    with pytest.raises(lay.LayoutError, match=r"module 'g': params and _tcnn\.params differ"):
        lay.convert_state(holder, saved, None)
    with pytest.raises(lay.LayoutError, match="module 'g': recorded backend 'cuda'"):
        lay.convert_state(holder, {"g.params": saved["g.params"]}, {"g": "cuda"})


def test_recorded_backend_must_match_the_keys_and_fallbacks():
    holder = torch.nn.Module()
    holder.m = MLP(IN, OUT, MLPConfig(HIDDEN, WIDTH, "none", "torch"))
    state = {f"m.{k}": v for k, v in holder.m.state_dict().items()}
    with pytest.raises(lay.LayoutError, match="module 'm': recorded as 'tcnn' but its parameters are in the "
                                              "'torch' layout"):
        lay.convert_state(holder, state, {"m": "tcnn"})
    assert lay.convert_state(holder, state, None).converted == ()
    assert lay.module_backends(holder) == {"m": "torch"}
    # No tinycudann module here, so nothing falls back; as_torch swaps an MLP in place.
    assert lay.torch_fallbacks(holder, state, None) == ()
    lay.as_torch(holder, "m")
    assert isinstance(holder.m, MLP) and holder.m.config == dataclasses.replace(holder.m.config,
                                                                                implementation="torch")


class _FakeTcnnEncoding(torch.nn.Module):
    """Stands in for ``tinycudann.Encoding`` (which needs CUDA): owns its ``params`` as tinycudann does."""

    def __init__(self, n_input_dims, encoding_config, dtype):
        super().__init__()
        n = encoding_config["n_levels"] * encoding_config["n_features_per_level"]
        self.n_out = n
        self.params = torch.nn.Parameter(torch.zeros(self.expected_size))

    def forward(self, x):
        return x.new_full((x.shape[0], self.n_out), float(self.params.detach().sum()))


def test_tcnn_hash_grid_saves_its_table_once(monkeypatch):
    from lerf_ros.core.fields import hash_encoding as he

    cfg = HashEncodingConfig(4, 2, 12, 8, 64, "tcnn")
    _, _, sizes, offsets = level_layout(cfg)
    _FakeTcnnEncoding.expected_size = (offsets[-1] + sizes[-1]) * 2
    monkeypatch.setattr(he, "resolve_implementation", lambda *a, **k: "tcnn")
    monkeypatch.setattr(he, "import_tcnn", lambda: type("tcnn", (), {"Encoding": _FakeTcnnEncoding}))
    enc = HashEncoding(cfg)
    assert enc.implementation == "tcnn" and list(enc.state_dict()) == ["params"]  # no "_tcnn.params"
    assert [n for n, _ in enc.named_parameters()] == ["params"]
    enc.load_state_dict({"params": torch.ones(_FakeTcnnEncoding.expected_size)})
    assert enc._tcnn.params is enc.params  # the tinycudann module computes with the loaded table
    assert enc(torch.rand(2, 3))[0, 0].item() == _FakeTcnnEncoding.expected_size
