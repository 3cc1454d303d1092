"""The CUDA path: training on the GPU, maps between the GPU and the CPU, the backends against PyTorch.

Every test here is marked ``cuda`` and skipped (centrally, ``test/conftest.py``) only where CUDA is absent.
A backend that is an optional install (tinycudann) skips its own case alone, with the reason; the
PyTorch-on-CUDA cases run on every GPU.
"""

import dataclasses
import math

import pytest
import torch

from lerf_ros.core.encoders import DEMO_CLIP, DEMO_DENSE, EncoderSpec
from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.fields import MLP, HashEncoding, HashEncodingConfig, MLPConfig, hash_encoding, layouts
from lerf_ros.core.presets import make_preset
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

pytestmark = pytest.mark.cuda


def _config(preset: str):
    """The preset with the demo encoders (no CLIP / DINO weights on test machines), 2 keyframes to start."""
    cfg = make_preset(preset)
    return dataclasses.replace(cfg, clip_encoder=EncoderSpec(DEMO_CLIP), dino_encoder=EncoderSpec(DEMO_DENSE),
                               ingest=dataclasses.replace(cfg.ingest, min_keyframes=2))


def _trained(preset: str, steps: int, size=(96, 72), frames: int = 6) -> LERFEngine:
    room = SyntheticRoom(0)
    engine = LERFEngine(_config(preset), "cuda")
    for f in make_frames(room, orbit_trajectory(room, frames), default_intrinsics(*size)):
        engine.add_frame(f)
    while engine.train_step < steps:
        engine.step(steps - engine.train_step)
    return engine


@pytest.mark.parametrize("preset, size", [("tiny", (96, 72)), ("default", (320, 240))])
def test_training_smoke_on_cuda(preset, size):
    engine = _trained(preset, 30, size)
    status = engine.status()
    assert status.device.startswith("cuda") and status.step == 30
    assert status.losses and all(math.isfinite(v) for v in status.losses.values()), status.losses
    assert status.gpu_mem_allocated_mb > 0 and status.gpu_mem_peak_mb >= status.gpu_mem_allocated_mb
    assert status.nonfinite_steps == 0 and not status.last_error
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert all(p.is_cuda for p in engine.model.parameters())


def test_map_saved_on_cuda_loads_on_cpu_and_back(tmp_path):
    gpu = _trained("tiny", 40)
    gpu.save(tmp_path / "gpu")
    cpu = LERFEngine.load(tmp_path / "gpu", "cpu")
    assert set(layouts.module_backends(cpu.model).values()) == {"torch"}
    pts = torch.rand(512, 3) * 2.0 - 1.0
    pts[:, 2] = pts[:, 2].abs()
    # tinycudann's MLPs run in fp16: compare the log density loosely; PyTorch on both sides: tightly
    fp16 = "tcnn" in layouts.module_backends(gpu.model).values()
    tol = dict(rtol=5e-2, atol=5e-2) if fp16 else dict(rtol=1e-4, atol=1e-4)
    d_gpu = gpu.model.density_at_points(pts.cuda()).cpu()
    d_cpu = cpu.model.density_at_points(pts)
    torch.testing.assert_close(torch.log1p(d_cpu), torch.log1p(d_gpu), **tol)
    want, got = gpu.query("red box", with_cloud=False), cpu.query("red box", with_cloud=False)
    assert got.found == want.found and got.relevancy == pytest.approx(want.relevancy, abs=0.05)
    cpu.step(2)
    cpu.save(tmp_path / "cpu")
    back = LERFEngine.load(tmp_path / "cpu", "cuda")
    assert all(p.is_cuda for p in back.model.parameters()) and back.train_step == cpu.train_step
    torch.testing.assert_close(torch.log1p(back.model.density_at_points(pts.cuda()).cpu()),
                               torch.log1p(cpu.model.density_at_points(pts)), **tol)
    back.step(2)
    assert all(math.isfinite(v) for v in back.status().losses.values())


# ------------------------------------------------------------------ backends against PyTorch on CUDA

GRID = HashEncodingConfig(8, 2, 14, 16, 512, "torch")  # dense coarse levels, hashed fine ones


def _available(backend: str) -> str | None:
    """Why ``backend`` cannot be built on this machine, or None."""
    if backend == "tcnn":
        return None if hash_encoding.import_tcnn() is not None else "tinycudann is not installed here"
    return None


def _grid_pair(backend: str):
    """(the backend's grid on CUDA, the PyTorch grid with the same table) -- or the PyTorch grid on CUDA
    against the PyTorch grid on the CPU for backend "torch-cuda"."""
    ref = HashEncoding(GRID)
    if backend == "torch-cuda":
        other = HashEncoding(GRID).cuda()
        with torch.no_grad():
            other.params.copy_(ref.params)
        return other, ref
    other = HashEncoding(dataclasses.replace(GRID, implementation=backend)).cuda()
    assert other.implementation == backend
    ref = ref.cuda()
    with torch.no_grad():
        ref.params.copy_(other.params.float())
    return other, ref


# Triton vs PyTorch: the "triton" case builds `HashEncoding(implementation="triton")` (hash_triton.py);
# on a CUDA machine Triton ships with torch, so a Triton that cannot build fails here, it does not skip.
@pytest.mark.parametrize("backend", ["torch-cuda", "tcnn", "triton"])
def test_hash_grid_backend_matches_pytorch(backend):
    if (why := _available(backend)) is not None:
        pytest.skip(why)
    grid, ref = _grid_pair(backend)
    with torch.no_grad():
        grid.params.normal_()  # tables of a trained field, not the +-1e-4 initialisation
        ref.params.copy_(grid.params.to(ref.params))
    # Inside [0, 0.95]^3: away from the upper faces where tinycudann's dense levels wrap (hash_encoding).
    x = torch.rand(4096, 3) * 0.95
    out, want = grid(x.to(grid.params.device)), ref(x.to(ref.params.device))
    torch.testing.assert_close(out.float().cpu(), want.float().cpu(), atol=1e-4, rtol=1e-4)
    g = torch.randn_like(want)
    out.backward(g.to(out.device))
    want.backward(g)
    torch.testing.assert_close(grid.params.grad.float().cpu(), ref.params.grad.float().cpu(),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_dim, out_dim, width, hidden", [(32, 16, 64, 1), (24, 3, 64, 2), (3, 1, 16, 1)])
def test_tcnn_mlp_matches_pytorch_through_the_layout(in_dim, out_dim, width, hidden):
    if (why := _available("tcnn")) is not None:
        pytest.skip(why)
    tc = MLP(in_dim, out_dim, MLPConfig(hidden, width, "none", "tcnn"))
    assert tc.implementation == "tcnn"
    th = MLP(in_dim, out_dim, MLPConfig(hidden, width, "none", "torch")).cuda()
    th.load_state_dict(layouts.tcnn_mlp_to_torch(tc.net.params.detach(), in_dim, out_dim, width, hidden))
    x = torch.rand(4096, in_dim, device="cuda")
    torch.testing.assert_close(tc(x), th(x), rtol=2e-2, atol=2e-3)  # tinycudann runs in fp16
    # and back: the same network in tinycudann's layout (its padding rows and columns aside)
    back = layouts.torch_mlp_to_tcnn(th.state_dict(), in_dim, out_dim, width, hidden)
    again = layouts.tcnn_mlp_to_torch(back, in_dim, out_dim, width, hidden)
    for k, v in th.state_dict().items():
        assert torch.equal(again[k].cuda(), v), k
