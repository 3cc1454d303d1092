"""bench/gpu.py's pieces on the CPU (its --quick mode, smaller): backends offered, the per-backend config,
one backend's training + query figures, the ViT-B/16 stand-in's shape, the table. The rooms rows are left
to the bench itself (rendering a drive costs more than this test may)."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import torch

from lerf_ros.core.fields.hash_encoding import HashEncodingConfig
from lerf_ros.core.fields.mlp import MLPConfig

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lerf_bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _leaves(cfg, kind):
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        items = v if isinstance(v, tuple) else (v,)
        for x in items:
            if isinstance(x, kind):
                out.append(x)
            elif dataclasses.is_dataclass(x):
                out.extend(_leaves(x, kind))
    return out


def test_gpu_bench_pieces_on_cpu():
    gpu = _bench()
    args = gpu.parse_args(["--device", "cpu", "--quick", "--steps", "3"])
    assert (args.preset, args.rays, args.steps) == ("tiny", 256, 3)
    assert gpu.parse_args([]).rays == 4096 and gpu.parse_args([]).preset == "default"
    assert gpu.backends_here(torch.device("cpu")) == {"torch": None, "tcnn": "no CUDA", "triton": "no CUDA"}

    cfg = gpu.engine_config(gpu.parse_args([]), "triton")
    grids, mlps = _leaves(cfg.model, HashEncodingConfig), _leaves(cfg.model, MLPConfig)
    assert len(grids) >= 4 and {g.implementation for g in grids} == {"triton"}  # proposal grids too
    assert {m.implementation for m in mlps} == {"torch"}
    assert {m.implementation for m in _leaves(gpu.engine_config(args, "tcnn").model, MLPConfig)} == {"tcnn"}

    args.warmup, args.queries, args.frames = 1, 1, 3
    room = gpu.SyntheticRoom(0)
    frames = gpu.make_frames(room, gpu.orbit_trajectory(room, 3), gpu.default_intrinsics(48, 36))
    row = gpu.train_and_query(args, torch.device("cpu"), "torch", frames)
    assert row["built"] == ["torch"] and row["steps"] == 3 and row["finite_losses"]
    assert row["steps_per_s"] > 0 and abs(row["rays_per_s"] - row["steps_per_s"] * 256) < 2  # 256 rays/step
    assert row["query_cloud_ms"] > 0 and row["query_scales"] == 12 and row["peak_gpu_mb"] is None

    vit = gpu.ViTB16StandIn(torch.device("cpu"))
    n = sum(p.numel() for p in vit.modules.parameters()) + vit.cls.numel() + vit.pos.numel()
    assert 85e6 < n < 88e6, n  # OpenCLIP ViT-B-16's image tower: 86.2 M
    emb = vit.encode_images(torch.rand(2, 3, 224, 224))
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-4)

    res = {"device": "cpu", "gpu": None, "torch": "x", "preset": "tiny", "rays_per_step": 256,
           "training": {"torch": row, "tcnn": {"skipped": "no CUDA"}, "triton": {"error": "RuntimeError: x"}},
           "pyramid_vitb16": {"encoder": "stand-in", "crops": 10, "image": "48x36", "s_per_keyframe": 1.5},
           "rooms": {"rgbd": [{"seed": 1, "located_s": 4.2, "steps": 80, "fraction": 1.0}],
                     "rgb": [{"seed": 1, "located_s": None, "fraction": 0.5, "cap_s": 20.0, "steps": 9}]},
           "peak_gpu_mb_run": None}
    text = gpu.table(res)
    assert f"| training rays/s | {row['rays_per_s']} | - (no CUDA) | error: RuntimeError: x |" in text
    assert "rgb: room 1: not within 20.0 s (best 50%)" in text and "rgbd: room 1: 4.2 s (80 steps)" in text
    assert not math.isnan(row["query_point_ms"])
