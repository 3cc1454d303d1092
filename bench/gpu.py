"""GPU benchmark: the issue-12 table in one command (``bench/gpu.sh`` on a CUDA machine).

    bench/gpu.sh                                          # one GPU, < 8 min: bench/out/gpu_cuda.json
    .venv/bin/python bench/gpu.py --device cpu --quick    # the same pieces, small, on a CPU (~1-2 min)

Rows (demo colour encoders for training: no CLIP / DINO weights can be fetched on a bench machine):
  training   steps/s and rays/s, default preset at 4096 rays per step on the synthetic room, one column
             per hash-grid backend available here, in the same run and on the same frames: torch; tcnn if
             tinycudann imports; triton if ``lerf_ros/core/fields/hash_triton.py`` exists and CUDA is
             present. The backends actually built are read back from the model and printed.
  query      latency of one query, point only and point + cloud (the default preset's 30 scales), on
             each backend's trained map, after a first query that builds the candidate points.
  memory     peak GPU memory per backend (training + queries) and over the whole run.
  pyramid    CLIP pyramid seconds per keyframe with a randomly initialised ViT-B/16 at the default
             preset's crop settings: OpenCLIP if it imports, else a ViT-B/16-shaped PyTorch stand-in
             (same widths, depth, heads and patch size, fp16 on CUDA as the OpenCLIP encoder).
  rooms      seconds from the first frame until >= 90 % of a random room's objects are located
             (``lerf_ros.sim`` rooms and drives, scored as ``bench/quality.py``), RGB-D and RGB-only: the
             frames enter the engine at their stamps on the engine's own clock; query time not counted.
Imports nothing from ``lerf_ros.ros`` (the GPU machine has no rclpy), and open_clip only if present.
``--quick`` (for the CPU): tiny preset, few frames and steps, one-batch extrapolated pyramid, 20 s rooms.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (scoring of room answers, shared with the quality bench)

from lerf_ros.core.encoders import DEFAULT_CLIP, DEMO_CLIP, DEMO_DENSE, EncoderSpec, load_encoder  # noqa: E402
from lerf_ros.core.engine import LERFEngine, resolve_device  # noqa: E402
from lerf_ros.core.fields import hash_encoding, layouts  # noqa: E402
from lerf_ros.core.fields.hash_encoding import HashEncodingConfig  # noqa: E402
from lerf_ros.core.fields.mlp import MLPConfig  # noqa: E402
from lerf_ros.core.frames.frame import Frame  # noqa: E402
from lerf_ros.core.language.pyramid import ClipPyramid  # noqa: E402
from lerf_ros.core.presets import make_preset  # noqa: E402
from lerf_ros.sim.drive import drive_through  # noqa: E402
from lerf_ros.sim.rooms import random_room  # noqa: E402
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory  # noqa: E402

RAYS_PER_STEP = 4096


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def backends_here(device: torch.device) -> dict[str, str | None]:
    """backend -> None (benchmarked) or why it is not."""
    out: dict[str, str | None] = {"torch": None}
    if device.type != "cuda":
        return {**out, "tcnn": "no CUDA", "triton": "no CUDA"}
    out["tcnn"] = None if hash_encoding.import_tcnn() is not None else "tinycudann does not import"
    if importlib.util.find_spec("lerf_ros.core.fields.hash_triton") is None:
        out["triton"] = "lerf_ros/core/fields/hash_triton.py absent"
    elif "triton" not in getattr(hash_encoding, "IMPLEMENTATIONS", ()):
        out["triton"] = "hash_encoding has no 'triton' implementation"
    else:
        out["triton"] = None
    return out


def with_backend(cfg, backend: str):
    """``cfg`` with every hash grid built by ``backend`` and every MLP by tinycudann (backend "tcnn") or
    PyTorch (the Triton backend is the hash grid only)."""
    def walk(c):
        changes = {}
        for f in dataclasses.fields(c):
            v = getattr(c, f.name)
            if isinstance(v, HashEncodingConfig):
                changes[f.name] = dataclasses.replace(v, implementation=backend)
            elif isinstance(v, MLPConfig):
                mlp = "tcnn" if backend == "tcnn" else "torch"
                changes[f.name] = dataclasses.replace(v, implementation=mlp)
            elif dataclasses.is_dataclass(v):
                changes[f.name] = walk(v)
            elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
                changes[f.name] = tuple(walk(x) if not isinstance(x, HashEncodingConfig)
                                        else dataclasses.replace(x, implementation=backend) for x in v)
        return dataclasses.replace(c, **changes)

    return dataclasses.replace(cfg, model=walk(cfg.model))


def engine_config(args, backend: str = "auto"):
    cfg = make_preset(args.preset)
    cfg = dataclasses.replace(
        cfg, clip_encoder=EncoderSpec(DEMO_CLIP), dino_encoder=EncoderSpec(DEMO_DENSE),
        trainer=dataclasses.replace(cfg.trainer, rays_per_step=args.rays),
        ingest=dataclasses.replace(cfg.ingest, min_keyframes=2))
    return cfg if backend == "auto" else with_backend(cfg, backend)


# ---------------------------------------------------------------------------------------- training + query
def train_and_query(args, device, backend: str, frames: list[Frame]) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine = LERFEngine(engine_config(args, backend), str(device))
    for f in frames:
        engine.add_frame(f)
    t = time.perf_counter()
    while engine.status().keyframes_pending:
        engine.step(0)
    out = {"features_s": round(time.perf_counter() - t, 3)}
    engine.step(args.warmup)
    built = sorted(set(layouts.module_backends(engine.model).values()))
    sync(device)
    before, t = engine.train_step, time.perf_counter()
    engine.step(args.steps)
    sync(device)
    dt, steps = time.perf_counter() - t, engine.train_step - before
    losses = engine.status().losses
    out.update(built=built, steps=steps, steps_per_s=round(steps / dt, 2),
               rays_per_s=round(steps * engine.config.trainer.rays_per_step / dt),
               finite_losses=bool(losses) and all(math.isfinite(v) for v in losses.values()))
    names = [o.name for o in SyntheticRoom(0).objects]
    t = time.perf_counter()
    engine.query(names[0], with_cloud=True)  # builds and caches the candidate points
    out["query_first_s"] = round(time.perf_counter() - t, 3)
    out["query_scales"] = len(engine.config.query.scales_m)
    for key, cloud in (("query_point_ms", False), ("query_cloud_ms", True)):
        times = []
        for i in range(args.queries):
            sync(device)
            t = time.perf_counter()
            engine.query(names[i % len(names)], with_cloud=cloud)
            sync(device)
            times.append(time.perf_counter() - t)
        out[key] = round(1000 * statistics.median(times), 2)
    out["peak_gpu_mb"] = peak_gpu_mb(device)
    return out


# --------------------------------------------------------------------------------------------- pyramid
class ViTB16StandIn:
    """A randomly initialised ViT-B/16 image tower with CLIP's shapes (patch 16, width 768, 12 layers,
    12 heads, MLP 3072, 224 px input, 512-d projection): the cost of OpenCLIP's ViT-B-16 per crop, for
    a machine without open_clip. Implements the `VisionLanguageEncoder` image half."""

    name, dim, input_size = "vit-b-16-standin-random", 512, 224

    def __init__(self, device: torch.device):
        torch.manual_seed(0)
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        width = 768
        self.patch = nn.Conv2d(3, width, 16, 16, bias=False)
        self.cls = (torch.randn(width) * 0.02).to(device, self.dtype)
        self.pos = (torch.randn((224 // 16) ** 2 + 1, width) * 0.01).to(device, self.dtype)
        layer = nn.TransformerEncoderLayer(width, 12, 4 * width, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.proj = nn.Linear(width, self.dim, bias=False)
        self.modules = nn.ModuleList([self.patch, self.blocks, self.ln_pre, self.ln_post, self.proj])
        self.modules.to(device, self.dtype).eval()
        self.mean = torch.tensor([0.4815, 0.4578, 0.4082], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.2686, 0.2613, 0.2758], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.to(self.device) - self.mean) / self.std).to(self.dtype)
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 196, 768)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
        x = self.ln_post(self.blocks(self.ln_pre(x))[:, 0])
        return nn.functional.normalize(self.proj(x).float(), dim=-1)

    def encode_texts(self, texts):
        raise NotImplementedError("the stand-in times images only")


def vit_b16(device: torch.device, standin: bool = False):
    """(encoder, what it is): OpenCLIP ViT-B-16, random weights, if open_clip imports; else the stand-in."""
    if importlib.util.find_spec("open_clip") is not None and not standin:
        try:
            enc = load_encoder(EncoderSpec(DEFAULT_CLIP, (("pretrained", None),)), device)
            return enc, "OpenCLIP ViT-B-16"
        except ImportError as exc:  # present but broken (a torchvision mismatch): said, then the stand-in
            print(f"open_clip does not load ({exc}); timing the ViT-B/16 stand-in")
    why = "asked for" if standin else "open_clip not installed"
    return ViTB16StandIn(device), f"ViT-B/16-shaped PyTorch stand-in ({why})"


def pyramid_seconds(args, device, image: np.ndarray) -> dict:
    enc, what = vit_b16(device, args.standin)
    pyr = ClipPyramid(enc, make_preset(args.preset).pyramid, device)
    crops = sum(lv.nx * lv.ny for lv in pyr.levels(*image.shape[:2]))
    out = {"encoder": what, "crops": crops, "image": f"{image.shape[1]}x{image.shape[0]}"}
    if args.quick:  # a CPU: one small batch, extrapolated (a full ViT-B/16 pyramid takes minutes there)
        batch = torch.rand(2, 3, enc.input_size, enc.input_size, device=device)
        enc.encode_images(batch[:1])
        t = time.perf_counter()
        enc.encode_images(batch)
        out["s_per_keyframe"] = round((time.perf_counter() - t) / 2 * crops, 3)
        out["extrapolated_from_crops"] = 2
        return out
    pyr.compute(image)  # warm-up: kernels, allocator
    times = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        pyr.compute(image)
        sync(device)
        times.append(time.perf_counter() - t)
    out["s_per_keyframe"] = round(statistics.median(times), 4)
    return out


# ----------------------------------------------------------------------------------------------- rooms
def drive_frames(seed: int):
    """(room, its drive's RGB-D frames) of random room ``seed``."""
    room = random_room(seed)
    drive = drive_through(room)
    frames = []
    for T, stamp in zip(drive.T_world_cam, drive.recording.image_stamps_ns, strict=True):
        rgb, depth_m = room.render(T, drive.intrinsics)
        frames.append(Frame(rgb, drive.intrinsics, T, int(stamp), depth_m))
    return room, frames


def time_to_locate(args, device, seed: int, room, frames: list[Frame]) -> dict:
    """Frames enter at their stamps on the engine's clock (adding + training); every ``query_every_s``
    the room's objects are queried (not counted); the clock when >= 90 % are located."""
    torch.manual_seed(0)
    engine = LERFEngine(engine_config(args), str(device))
    t_first = frames[0].stamp_ns
    clock, i, next_query, best, queries = 0.0, 0, args.query_every_s, 0.0, 0
    while clock < args.room_cap_s:
        t0 = time.perf_counter()
        while i < len(frames) and (frames[i].stamp_ns - t_first) / 1e9 <= clock:
            try:
                engine.add_frame(frames[i])
            except ValueError:
                pass  # a frame the engine refuses is lost, as on a robot
            i += 1
        stats = engine.step(10)
        sync(device)
        clock += time.perf_counter() - t0
        if not stats.work_done and i < len(frames):
            clock = max(clock, (frames[i].stamp_ns - t_first) / 1e9)  # idle until the next frame
        if clock >= next_query:
            fraction = quality.located_fraction(engine, room)
            best, queries = max(best, fraction), queries + 1
            if fraction >= quality.LOCATED_FRACTION:
                return {"seed": seed, "located_s": round(clock, 1), "fraction": round(fraction, 3),
                        "steps": engine.train_step, "frames": i, "objects": len(room.names)}
            next_query += args.query_every_s
    return {"seed": seed, "located_s": None, "fraction": round(best, 3), "steps": engine.train_step,
            "frames": i, "objects": len(room.names), "cap_s": args.room_cap_s}


# ------------------------------------------------------------------------------------------------ main
def run(args) -> dict:
    device = resolve_device(args.device)
    res: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else None, "torch": torch.__version__, "preset": args.preset, "rays_per_step": args.rays,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick}
    room = SyntheticRoom(0)
    cfg = engine_config(args)
    w, h = (96, 72) if args.preset == "tiny" else (640, 480)
    intr = default_intrinsics(w, h)
    frames = make_frames(room, orbit_trajectory(room, args.frames), intr)
    res["training"] = {}
    for backend, why in backends_here(device).items():
        if why is not None:
            res["training"][backend] = {"skipped": why}
            continue
        try:
            res["training"][backend] = train_and_query(args, device, backend, frames)
        except Exception as exc:  # one backend failing must not hide the others' figures
            traceback.print_exc()
            res["training"][backend] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"training {backend}: {res['training'][backend]}", flush=True)
    side = cfg.ingest.max_image_side
    kf_intr = intr.scaled(side / max(w, h)) if side and max(w, h) > side else intr
    kf_image, _ = room.render(frames[0].T_world_cam, kf_intr)
    try:
        res["pyramid_vitb16"] = pyramid_seconds(args, device, kf_image)
    except Exception as exc:  # as above
        traceback.print_exc()
        res["pyramid_vitb16"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"pyramid: {res['pyramid_vitb16']}", flush=True)
    res["rooms"] = {"rgbd": [], "rgb": []} if not args.skip_rooms else {}
    for seed in [] if args.skip_rooms else args.seeds:
        room, frames = drive_frames(seed)
        for label in ("rgbd", "rgb"):
            used = frames if label == "rgbd" else [dataclasses.replace(f, depth_m=None) for f in frames]
            res["rooms"][label].append(time_to_locate(args, device, seed, room, used))
            print(f"room {seed} {label}: {res['rooms'][label][-1]}", flush=True)
    res["peak_gpu_mb_run"] = peak_gpu_mb(device)
    return res


def table(res: dict) -> str:
    train = res["training"]
    cols = list(train)
    rows = [("backend built", lambda r: ",".join(r["built"]))]
    rows += [(f"training steps/s ({res['rays_per_step']} rays)", lambda r: r["steps_per_s"]),
             ("training rays/s", lambda r: r["rays_per_s"]), ("losses finite", lambda r: r["finite_losses"]),
             ("query point ms (median)", lambda r: r["query_point_ms"]),
             ("query point + cloud ms (median)", lambda r: r["query_cloud_ms"]),
             ("query scales", lambda r: r["query_scales"]), ("peak GPU MB", lambda r: r["peak_gpu_mb"])]

    def cell(r, get):
        if "skipped" in r:
            return f"- ({r['skipped']})"
        if "error" in r:
            return f"error: {r['error'][:40]}"
        value = get(r)
        return "-" if value is None else str(value)

    lines = [f"{res['device']} {res['gpu'] or ''} torch {res['torch']}, preset {res['preset']}",
             "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(cell(train[c], get) for c in cols) + " |" for name, get in rows]
    pyr = res["pyramid_vitb16"]
    lines.append("")
    if "error" in pyr:
        lines.append(f"CLIP pyramid: error {pyr['error']}")
    else:
        how = ", extrapolated from 2 crops)" if "extrapolated_from_crops" in pyr else ")"
        lines.append(f"CLIP pyramid s/keyframe: {pyr['s_per_keyframe']} ({pyr['encoder']}, "
                     f"{pyr['crops']} crops at {pyr['image']}{how}")
    for label, runs in res["rooms"].items():
        text = ", ".join(f"room {r['seed']}: " + (f"{r['located_s']} s ({r['steps']} steps)" if r["located_s"]
                                                   is not None else f"not within {r['cap_s']} s "
                                                   f"(best {r['fraction']:.0%})") for r in runs)
        lines.append(f"rooms located (>= 90 %), {label}: {text}")
    peak = res["peak_gpu_mb_run"]
    lines.append(f"peak GPU MB over the run: {'-' if peak is None else peak}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU check (tiny preset)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per backend")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="random rooms to locate")
    p.add_argument("--standin", action="store_true", help="time the ViT-B/16 stand-in even with open_clip")
    p.add_argument("--skip-rooms", action="store_true", help="leave out the time-to-locate rows")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    quick = args.quick
    args.preset = "tiny" if quick else "default"
    args.rays = 256 if quick else RAYS_PER_STEP
    args.steps = args.steps or (10 if quick else 200)
    args.warmup = 3 if quick else 20
    args.frames = 4 if quick else 8
    args.queries = 3 if quick else 10
    args.query_every_s = 2.0
    args.room_cap_s = 20.0 if quick else 90.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    res = run(args)
    name = f"gpu_{res['device'].split(':')[0]}{'_quick' if args.quick else ''}.json"
    out = args.out or ROOT / "bench" / "out" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
