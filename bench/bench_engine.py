"""Engine benchmark: training speed, pyramid cost, query latency, peak memory, time to localise the room.

    .venv/bin/python bench/bench_engine.py --preset tiny --device cpu --steps 300

Prints a table and writes bench/out/engine_<preset>_<device>.json. Encoders: the preset's, except that
OpenCLIP / DINO run randomly initialised (``--encoders random``, the default for lite/default: no
weights can be downloaded here; the cost per crop is the same). Pyramid seconds per keyframe are
measured for the DEMO colour encoder and for a randomly initialised ViT-B/16 OpenCLIP, at the preset's
crop settings and keyframe size. "Time to localise" (>= 5 of 6 objects inside their box + 5 cm) needs
an encoder that knows colour names, so it is measured only with the demo encoders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lerf_ros.core.encoders import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    DEMO_CLIP,
    DEMO_DENSE,
    EncoderSpec,
    load_encoder,
)
from lerf_ros.core.engine import LERFEngine, resolve_device
from lerf_ros.core.language.pyramid import ClipPyramid
from lerf_ros.core.presets import make_preset
from lerf_ros.core.training.worker import set_torch_threads
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

GROW_M = 0.05


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
        model = names[0] if names else "?"
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    text = f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def peak_memory_mb(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    out = {"peak_rss_mb": round(rss, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_config(preset: str, encoders: str):
    cfg = make_preset(preset)
    if encoders == "demo":
        return dataclasses.replace(cfg, clip_encoder=EncoderSpec(DEMO_CLIP),
                                   dino_encoder=EncoderSpec(DEMO_DENSE))
    if encoders == "random":
        return dataclasses.replace(
            cfg,
            clip_encoder=EncoderSpec(DEFAULT_CLIP, (("pretrained", None),)),
            dino_encoder=EncoderSpec(DEFAULT_DINO, (("random_init", True),)),
        )
    return cfg


def frame_size(cfg) -> tuple[int, int]:
    """Synthetic camera size: 96 x 72 for tiny, else 640 x 480 downsized by the preset's max side."""
    return (96, 72) if cfg.name == "tiny" else (640, 480)


def pyramid_seconds(spec: EncoderSpec, cfg, image: np.ndarray, device, repeats: int,
                    max_crops: int) -> dict:
    """Median seconds to build one keyframe's pyramid. With more than ``max_crops`` crops (ViT-B/16 on a
    CPU at 640 x 480: minutes per keyframe) one encoder batch is timed and the total extrapolated."""
    enc = load_encoder(spec, device)
    pyr = ClipPyramid(enc, cfg.pyramid, device)
    crops = sum(lv.nx * lv.ny for lv in pyr.levels(*image.shape[:2]))
    if crops > max_crops:
        s = enc.input_size
        batch = torch.rand(min(cfg.pyramid.batch_size, 32, crops), 3, s, s, device=device)
        with torch.no_grad():
            enc.encode_images(batch[:2])
            sync(device)
            t = time.perf_counter()
            enc.encode_images(batch)
            sync(device)
        per_crop = (time.perf_counter() - t) / batch.shape[0]
        return {"encoder": enc.name, "crops": crops, "s_per_keyframe": round(per_crop * crops, 3),
                "extrapolated_from_batch": int(batch.shape[0])}
    pyr.compute(image)  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        pyr.compute(image)
        sync(device)
        times.append(time.perf_counter() - t)
    return {"encoder": enc.name, "crops": crops, "s_per_keyframe": round(statistics.median(times), 4)}


def localised(engine: LERFEngine, room: SyntheticRoom) -> int:
    n = 0
    for obj in room.objects:
        r = engine.query(obj.name, with_cloud=False)
        if r.found and np.all(r.location_world >= obj.box_min - GROW_M) and \
                np.all(r.location_world <= obj.box_max + GROW_M):
            n += 1
    return n


def run(args) -> dict:
    device = resolve_device(args.device)
    # As the trainer node chooses (0: one core less than the machine; --threads 1 on a loaded 2-core machine,
    # where 2 OpenMP threads spun against each other and 1 thread was ~10x faster).
    set_torch_threads(args.threads, print)
    torch.manual_seed(0)
    encoders = args.encoders or ("demo" if args.preset == "tiny" else "random")
    cfg = engine_config(args.preset, encoders)
    room = SyntheticRoom(0)
    w, h = frame_size(cfg)
    intr = default_intrinsics(w, h)
    frames = make_frames(room, orbit_trajectory(room, args.frames), intr)
    res: dict = {"preset": args.preset, "device": str(device), "encoders": encoders, "machine": machine(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "image": f"{w}x{h}",
                 "rays_per_step": cfg.trainer.rays_per_step}

    # Pyramid cost per keyframe at the preset's keyframe size and crop settings.
    side = cfg.ingest.max_image_side
    kf_intr = intr.scaled(side / max(w, h)) if side and max(w, h) > side else intr
    kf_image, _ = room.render(frames[0].T_world_cam, kf_intr)
    res["pyramid_demo"] = pyramid_seconds(EncoderSpec(DEMO_CLIP), cfg, kf_image, device, args.repeats, 10**9)
    vit = EncoderSpec(DEFAULT_CLIP, (("pretrained", None),))
    cpu = device.type == "cpu"
    res["pyramid_vitb16"] = pyramid_seconds(vit, cfg, kf_image, device, 1 if cpu else 5,
                                            64 if cpu else 10**9)

    # Training while frames arrive; time to localise (demo encoders only).
    engine = LERFEngine(cfg, str(device))
    t0 = time.perf_counter()
    for f in frames:
        engine.add_frame(f)
    while engine.status().keyframes_pending:
        engine.step(0)
    res["features_s_total"] = round(time.perf_counter() - t0, 3)
    engine.step(args.warmup)
    sync(device)
    t = time.perf_counter()
    engine.step(args.steps)
    sync(device)
    dt = time.perf_counter() - t
    res["steps_per_s"] = round(args.steps / dt, 2)
    res["rays_per_s"] = round(args.steps * cfg.trainer.rays_per_step / dt, 1)
    if encoders == "demo":
        found = localised(engine, room)
        while found < 5 and engine.train_step < args.max_localise_steps:
            engine.step(args.localise_every)
            found = localised(engine, room)
        res["localised_objects"] = found
        res["localised_after_steps"] = engine.train_step if found >= 5 else None
        res["time_to_localise_s"] = round(time.perf_counter() - t0, 2) if found >= 5 else None

    # Query latency: the first query builds (and caches) candidate points; then point vs point + cloud.
    t = time.perf_counter()
    engine.query("red box", with_cloud=True)
    res["query_first_s"] = round(time.perf_counter() - t, 4)
    for key, cloud in (("query_point_ms", False), ("query_cloud_ms", True)):
        times = []
        for i in range(args.repeats * 3):
            sync(device)
            t = time.perf_counter()
            engine.query(room.objects[i % 6].name, with_cloud=cloud)
            sync(device)
            times.append(time.perf_counter() - t)
        res[key] = round(1000 * statistics.median(times), 2)
    res.update(peak_memory_mb(device))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "lite", "default"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=200, help="timed training steps")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--encoders", choices=("demo", "random", "preset"), default=None,
                   help="demo colour encoders, randomly initialised OpenCLIP/DINO, or the preset's own")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = as the trainer node chooses: torch_threads 0)")
    p.add_argument("--localise-every", type=int, default=50)
    p.add_argument("--max-localise-steps", type=int, default=2000)
    p.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = p.parse_args()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_{args.preset}_{res['device'].split(':')[0]}.json"
    path.write_text(json.dumps(res, indent=2))
    rows = [
        ("machine", res["machine"]),
        ("preset / encoders / image", f"{res['preset']} / {res['encoders']} / {res['image']}"),
        ("training steps/s", res["steps_per_s"]),
        ("training rays/s", res["rays_per_s"]),
        *[(f"pyramid s/keyframe, {label}", f"{res[k]['s_per_keyframe']} ({res[k]['crops']} crops"
           + (", extrapolated" if "extrapolated_from_batch" in res[k] else "") + ")")
          for label, k in (("demo", "pyramid_demo"), ("ViT-B/16", "pyramid_vitb16"))],
        ("first query (candidates) s", res["query_first_s"]),
        ("query point ms", res["query_point_ms"]),
        ("query point + cloud ms", res["query_cloud_ms"]),
        ("peak RSS MB", res["peak_rss_mb"]),
        ("peak GPU MB", res.get("peak_gpu_mb", "-")),
        ("time to localise >= 5/6 s", res.get("time_to_localise_s", "-")),
        ("  after steps", res.get("localised_after_steps", "-")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
