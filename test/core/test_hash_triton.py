"""The fused Triton hash grid against the PyTorch backend, in Triton's CPU interpreter.

The kernel is decorated on first use with the interpreter setting then in force (hash_triton
docstring), so setting TRITON_INTERPRET per test with monkeypatch is enough, whatever imported triton
before. Tiny grids keep the interpreter fast; they still cover dense and hashed levels, every F, the
dense border clamp, points outside the cube and partial / exact / multiple point blocks.
"""

import logging

import pytest
import torch
import triton

from lerf_ros.core.fields import MLP, HashEncoding, HashEncodingConfig, MLPConfig
from lerf_ros.core.fields import hash_encoding as he
from lerf_ros.core.fields import hash_triton as ht

# 4 levels, resolutions 4 / 11 / 26 / 64, tables 64 / 1336 / 4096 / 4096: two dense, two hashed.
MIXED = HashEncodingConfig(4, 2, 12, 4, 64, "torch")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ht.interpreting()


def _torch_encoding(cfg: HashEncodingConfig, seed: int = 0) -> HashEncoding:
    enc = HashEncoding(cfg)
    with torch.no_grad():
        enc.params.copy_(torch.randn(enc.params.shape, generator=torch.Generator().manual_seed(seed)))
    return enc


def _points(n: int, seed: int = 1) -> torch.Tensor:
    """n points: the cube's corners, faces and the dense levels' clamped shell first, then random."""
    edge = torch.tensor([
        [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.999, 0.97, 1.0],
        [0.9, 0.95, 0.99], [5 / 6, 0.5, 1 - 1e-7], [-0.3, 1.4, 0.5], [0.5, 0.5, 0.5], [0.125, 0.25, 0.375],
    ])
    rand = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    rand[: min(n, len(edge))] = edge[: min(n, len(edge))]
    return rand


def _compare(enc: HashEncoding, x: torch.Tensor, table_dtype=torch.float32):
    """(triton out, torch out, triton table grad, torch table grad) for the loss sum(out * g)."""
    feat = enc.config.features_per_level
    table = enc.params.detach().view(enc.total_entries, feat).to(table_dtype).requires_grad_(True)
    out = ht.hash_grid(x, table, ht.grid_tensors(enc))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    enc.params.grad = None
    ref = enc(x)
    (ref * g).sum().backward()
    return out, ref, table.grad, enc.params.grad.view(enc.total_entries, feat)


def test_layout_covers_dense_and_hashed_levels():
    enc = HashEncoding(MIXED)
    assert enc._num_dense == 2 and enc.config.num_levels == 4
    assert enc._res.tolist() == [4, 11, 26, 64] and enc._sizes.tolist() == [64, 1336, 4096, 4096]


@pytest.mark.parametrize("n", [1, 127, 128, 300])
def test_outputs_and_gradients_match_torch(interpret, n):
    enc = _torch_encoding(MIXED)
    out, ref, grad, ref_grad = _compare(enc, _points(n))
    assert out.dtype == torch.float32 and out.shape == (n, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert int((grad != 0).any(dim=1).sum()) >= min(n, 8) * 4  # every point reaches every level


@pytest.mark.parametrize("cfg", [
    HashEncodingConfig(3, 1, 8, 3, 40, "torch"),   # F=1; one dense level, then 256-entry hashed ones
    HashEncodingConfig(2, 4, 10, 2, 5, "torch"),   # F=4, all dense (resolutions 2 and 5)
    HashEncodingConfig(3, 8, 6, 5, 30, "torch"),   # F=8, all hashed (64-entry tables, heavy collisions)
    HashEncodingConfig(1, 2, 12, 16, 16, "torch"),  # one level, dense 16^3 grid
])
def test_other_shapes_match_torch(interpret, cfg):
    enc = _torch_encoding(cfg, seed=3)
    out, ref, grad, ref_grad = _compare(enc, _points(150, seed=4))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_points_exactly_on_vertices_and_cell_faces(interpret):
    enc = _torch_encoding(MIXED, seed=5)
    # Level 0 has scale 3: x = (k - 0.5) / 3 puts a point exactly on a vertex layer (frac 0).
    ks = torch.tensor([0.5, 1.5, 2.5, 3.0]) / 3.0
    x = torch.cartesian_prod(ks, ks, ks)
    out, ref, grad, ref_grad = _compare(enc, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_half_tables(interpret, dtype, tol):
    enc = _torch_encoding(MIXED, seed=2)
    with torch.no_grad():  # the reference reads the same rounded values
        enc.params.copy_(enc.params.to(dtype).float())
    out, ref, grad, ref_grad = _compare(enc, _points(200), table_dtype=dtype)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # float32 maths on exact half values
    torch.testing.assert_close(grad.float(), ref_grad, atol=tol, rtol=tol)  # accumulated in fp32


def test_nan_rows_stay_nan_and_touch_nothing(interpret):
    enc = _torch_encoding(MIXED)
    x = _points(40)
    x[3, 1] = float("nan")
    table = enc.params.detach().view(enc.total_entries, 2).clone().requires_grad_(True)
    out = ht.hash_grid(x, table, ht.grid_tensors(enc))
    out.sum().backward()
    assert bool(out[3].isnan().all()) and bool(out[torch.arange(40) != 3].isfinite().all())
    keep = torch.arange(40) != 3
    ref = HashEncoding(MIXED)
    with torch.no_grad():
        ref.params.copy_(enc.params)
    ref(x[keep]).sum().backward()
    torch.testing.assert_close(table.grad.view(-1), ref.params.grad, atol=1e-5, rtol=1e-5)


def test_empty_batch(interpret):
    enc = _torch_encoding(MIXED)
    table = enc.params.detach().view(enc.total_entries, 2).clone().requires_grad_(True)
    out = ht.hash_grid(torch.zeros(0, 3), table, ht.grid_tensors(enc))
    out.sum().backward()
    assert out.shape == (0, 8) and float(table.grad.abs().sum()) == 0.0


def test_bad_inputs_raise_value_error(monkeypatch):
    enc = _torch_encoding(MIXED)
    grid = ht.grid_tensors(enc)
    table = enc.params.detach().view(enc.total_entries, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        ht.hash_grid(torch.rand(4, 3), table, grid)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        ht.hash_grid(torch.rand(4, 2), table, grid)
    with pytest.raises(ValueError, match="table must be"):
        ht.hash_grid(torch.rand(4, 3), table[:-1], grid)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ht.hash_grid(torch.rand(4, 3), table.double(), grid)
    with pytest.raises(ValueError, match="power-of-two"):
        ht.GridTensors.from_layout([3.0, 10.0], [4, 11], [64, 1000], [0, 64], he._PRIMES, num_dense=1)


def test_from_layout_matches_encoding_buffers(interpret):
    enc = _torch_encoding(MIXED)
    scales, res, sizes, offsets = he.level_layout(MIXED)
    grid = ht.GridTensors.from_layout(scales, res, sizes, offsets, he._PRIMES, enc._num_dense)
    assert grid.total_entries == enc.total_entries
    x = _points(50)
    table = enc.params.detach().view(enc.total_entries, 2)
    torch.testing.assert_close(ht.hash_grid(x, table, grid), enc(x), atol=1e-5, rtol=1e-5)


def _allow_triton(monkeypatch):
    """Pretend this machine passed the start-up probe (CUDA + compiled kernels)."""
    monkeypatch.setattr(he, "triton_problem", lambda features_per_level=2: None)


def test_encoding_module_runs_the_kernel(interpret, monkeypatch):
    _allow_triton(monkeypatch)
    enc = HashEncoding(HashEncodingConfig(4, 2, 12, 4, 64, "triton"))
    assert enc.implementation == "triton"
    ref = _torch_encoding(MIXED)
    with torch.no_grad():
        enc.params.copy_(ref.params)
    x = _points(130) * 1.2 - 0.1  # the module clamps to [0, 1] first
    out = enc(x)
    assert type(out.grad_fn).__name__.startswith("HashGridFunction")
    out.sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.params.grad, ref.params.grad, atol=1e-5, rtol=1e-5)


def test_encoding_module_on_cpu_without_interpreter_uses_torch_path(monkeypatch):
    _allow_triton(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    enc = HashEncoding(HashEncodingConfig(4, 2, 12, 4, 64, "triton"))
    out = enc(_points(20))
    assert type(out.grad_fn).__name__.startswith("_GridInterp")  # same numbers (layout shared)


def test_explicit_triton_without_cuda_fails_at_construction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'triton' requested but CUDA is not available"):
        HashEncoding(HashEncodingConfig(implementation="triton"))
    assert he.resolve_implementation("auto") == "torch"


def test_auto_order_tcnn_then_triton_then_torch(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(he, "_BACKEND_LOGGED", set())
    monkeypatch.setattr(he, "import_tcnn", lambda: object())
    monkeypatch.setattr(he, "triton_problem", lambda features_per_level=2: None)
    assert he.resolve_implementation("auto") == "tcnn"
    monkeypatch.setattr(he, "import_tcnn", lambda: None)
    with caplog.at_level(logging.INFO, logger=he.__name__):
        assert he.resolve_implementation("auto") == "triton"
    assert "hash-grid backend: triton" in caplog.text
    assert he.resolve_implementation("auto", encoding=False) == "torch"  # MLPs: Triton is the grid only
    assert he.resolve_implementation("triton", encoding=False) == "torch"
    caplog.clear()
    monkeypatch.setattr(he, "triton_problem", lambda features_per_level=2: "the kernels failed (no ptxas)")
    with caplog.at_level(logging.INFO, logger=he.__name__):
        assert he.resolve_implementation("auto") == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "no ptxas" in warnings[0].getMessage() and "PyTorch" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="'triton' requested but the kernels failed"):
        he.resolve_implementation("triton")


def test_probe_passes_in_the_interpreter_without_touching_the_rng(interpret):
    ht.probe.cache_clear()
    state = torch.random.get_rng_state()
    assert ht.probe(2, "cpu") is None
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded model init stays reproducible
    ht.probe.cache_clear()


def test_probe_reports_failures_instead_of_raising(interpret, monkeypatch):
    ht.probe.cache_clear()
    real = ht.hash_grid
    monkeypatch.setattr(ht, "hash_grid", lambda x, table, grid: real(x, table, grid) * 1.01)
    assert "disagree with PyTorch on cpu" in ht.probe(2, "cpu")
    monkeypatch.setattr(ht, "hash_grid", lambda x, table, grid: 1 / 0)
    assert "failed on cpu (ZeroDivisionError" in ht.probe(4, "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(ht, "hash_grid", real)
    assert "failed on cpu (ValueError: the Triton hash grid runs on CUDA" in ht.probe(1, "cpu")
    ht.probe.cache_clear()


def test_config_accepts_triton_and_mlp_builds_torch():
    HashEncodingConfig(implementation="triton").validate()
    mlp = MLP(5, 3, MLPConfig(1, 16, "none", "triton"))
    assert mlp.implementation == "torch" and isinstance(mlp.net, torch.nn.Sequential)
    with pytest.raises(ValueError, match="auto, torch, tcnn or triton"):
        HashEncodingConfig(implementation="cuda").validate()


def test_kernel_compiles_for_cuda(tmp_path, monkeypatch):
    """The interpreter runs the kernel as Python, so errors only the compiler sees (constexpr rules,
    types) would pass every test above; Triton's wheel bundles ptxas, so this builds cubins here.
    sm_90: H100 / H200; sm_87: Jetson Orin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a cold compile, and none in $HOME
    kernel = ht._kernel(False)
    assert type(kernel).__name__ == "JITFunction"
    cases = ((90, "fp32", 2, False), (90, "fp32", 2, True), (87, "fp16", 8, False))
    for arch, table, feat, backward in cases:
        types = ["*fp32", f"*{table}", "*fp32", "*fp32", "*fp32", "*i64", "*i64", "*i64", "*i64"]
        types += ["i32"] * 3 + ["constexpr"] * 3
        src = ASTSource(kernel, dict(zip(kernel.arg_names, types, strict=True)),
                        constexprs={"F": feat, "BLOCK": ht.BLOCK_POINTS, "BACKWARD": backward})
        options = {k: v for k, v in ht.LAUNCH_OPTIONS.items()}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        assert len(compiled.asm["cubin"]) > 0
        # Backward: one atomic per corner and feature; forward: none.
        assert (ptx.count("atom.global") + ptx.count("red.global") >= 8 * feat) == backward


def test_status_names_the_backends(monkeypatch):
    from lerf_ros.core.engine import describe_backends

    _allow_triton(monkeypatch)
    model = torch.nn.ModuleList([HashEncoding(MIXED), MLP(8, 3, MLPConfig(1, 16, "none", "torch"))])
    assert describe_backends(model) == "hash grid: torch, MLP: torch"
    model.append(HashEncoding(HashEncodingConfig(4, 2, 12, 4, 64, "triton")))
    assert describe_backends(model) == "hash grid: torch, MLP: torch"  # a Triton grid on the CPU runs torch
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert describe_backends(model) == "hash grid: torch/triton, MLP: torch"
