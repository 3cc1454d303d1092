"""``lerf-ros``: train a LERF map from a rosbag2, query it, inspect it, write the demo bag.

  lerf-ros train BAG --out MAP [--image-topic ...] [--steps N] [--seconds S]
  lerf-ros query MAP "red box" [--negatives ...] [--threshold T] [--max-results K] [--json] [--ply F]
                 [--png F]
  lerf-ros info MAP
  lerf-ros demo-bag OUT [--room demo|random] [--format mcap|sqlite3] [--frames N] [--seed S]

Defaults come from the nodes' parameter table (``lerf_ros.ros.params``, ROS-free), and options are
validated by the same ``resolve`` the nodes use, so a bag trained here matches a live run.
User errors print one line on stderr and exit 1 (2 for bad usage); bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.frames import scene_region
from ..ros.map_io import MAP_INFO, load_map_or_journal, read_world_frame
from ..ros.params import SPECS, ParameterError, read_vocabulary, resolve
from .bag_io import BagError

#: Sidecar the CLI writes next to a map: the world frame and where the map came from (the nodes read the
#: world frame from it and write it on save_map: ``lerf_ros/ros/map_io.py``).
TRAINING_INFO = MAP_INFO
#: Without --steps, training stops when the map is usable (`core/training/convergence.py`) or, at the
#: latest, after this many steps per preset (the demo room is usable after ~1000-1500 tiny steps on a CPU).
STEP_CAP = {"tiny": 3000, "lite": 15000, "default": 30000}
#: Why training stopped (``stop_reason`` in training_info.json).
STOP_REASONS = ("usable", "steps", "cap", "no convergence signal", "seconds")


class UserError(Exception):
    """An error the user can fix: printed without a traceback."""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a map from a rosbag2 (mcap or sqlite3)")
    p.add_argument("bag", type=Path, help="rosbag2 directory")
    p.add_argument("--out", type=Path, required=True, help="map directory to write")
    for name in ("image_topic", "camera_info_topic", "depth_topic", "world_frame", "clip_encoder",
                 "dino_encoder", "clip_checkpoint", "dino_checkpoint"):
        spec = SPECS[name]
        p.add_argument("--" + name.replace("_", "-"), default=spec.default,
                       help=f"{spec.description} (default {spec.default!r})")
    for name in ("preset", "device", "image_transport"):
        spec = SPECS[name]
        p.add_argument("--" + name.replace("_", "-"), default=spec.default, choices=spec.choices,
                       help=f"{spec.description} (default {spec.default!r})")
    for name in ("scene_box_min", "scene_box_max"):
        p.add_argument("--" + name.replace("_", "-"), type=float, nargs=3, metavar=("X", "Y", "Z"),
                       default=None, help=SPECS[name].description)
    p.add_argument("--scene-max-range-m", type=float, default=None,
                   help=SPECS["scene_max_range_m"].description)
    p.add_argument("--camera-frame", default="", help="override the images' header.frame_id")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps (default: node max_steps if > 0, else until the map "
                        f"is usable, at most per preset {STEP_CAP} steps)")
    p.add_argument("--seconds", type=float, default=None, help="stop training after this wall time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lerf-ros", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    q = sub.add_parser("query", help="ask a map where something is")
    q.add_argument("map", type=Path)
    q.add_argument("text")
    q.add_argument("--negatives", nargs="*", default=[], help="extra negative phrases")
    q.add_argument("--threshold", type=float, default=None,
                   help="confidence (0..1) a target needs to count as found (default: the map's)")
    q.add_argument("--max-results", type=int, default=1, help="at most this many targets, best first (1-100)")
    q.add_argument("--vocabulary-file", type=Path, default=None, help=SPECS["vocabulary_file"].description)
    q.add_argument("--device", default="auto", choices=SPECS["device"].choices)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--ply", type=Path, help="write the relevancy cloud as binary PLY")
    q.add_argument("--png", type=Path, help="write a picture (keyframe overlay + top-down view)")
    i = sub.add_parser("info", help="describe a map directory")
    i.add_argument("map", type=Path)
    i.add_argument("--json", action="store_true")
    d = sub.add_parser("demo-bag", help="write the synthetic room (or a random room) as a rosbag2")
    d.add_argument("out", type=Path)
    d.add_argument("--room", choices=("demo", "random"), default="demo",
                   help="demo: the demo room on its loop; random: random_room(seed) with a drive through it")
    d.add_argument("--format", choices=("mcap", "sqlite3"), default="mcap")
    d.add_argument("--frames", type=int, default=None, help="images (demo room only; default 60)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-depth", action="store_true", help="leave out the depth topic")
    d.add_argument("--compressed", choices=("jpeg", "png"), default=None,
                   help="CompressedImage on <image topic>/compressed instead of raw rgb8")
    return parser


# ---------------------------------------------------------------------------------------------- train
def _train_params(args) -> dict:
    values = {name: getattr(args, name) for name in (
        "image_topic", "camera_info_topic", "depth_topic", "world_frame", "preset", "device",
        "clip_encoder", "dino_encoder", "image_transport")}
    for name in ("clip_checkpoint", "dino_checkpoint"):  # the node wants absolute paths
        if getattr(args, name):
            values[name] = str(Path(getattr(args, name)).expanduser().resolve())
    for name in ("scene_box_min", "scene_box_max", "scene_max_range_m"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return values


def bag_topic(name: str) -> str:
    """A node topic name as a bag records it: a relative name (the nodes' defaults, so that a namespace
    moves them) resolves in the root namespace, as for a node with none; '' stays '' (no topic)."""
    return name if not name or name.startswith("/") else "/" + name


def cmd_train(args) -> int:
    from tqdm import tqdm

    from ..core.engine import LERFEngine
    from .bag_io import BagFrameReader, BagTopics

    try:
        params = resolve(_train_params(args))
    except ParameterError as exc:
        raise UserError(str(exc)) from exc
    s = params.trainer
    max_steps = params.values.get("max_steps", 0)
    fixed = args.steps if args.steps is not None else (max_steps or None)
    steps = fixed if fixed is not None else STEP_CAP[params.values["preset"]]
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if args.seconds is not None and not args.seconds > 0:
        raise UserError(f"--seconds must be > 0, got {args.seconds}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(f"output map directory {args.out} exists and is not an empty directory")
    image_topic = s.image_topic + ("/compressed" if s.image_transport == "compressed" else "")
    topics = BagTopics(image=bag_topic(image_topic), camera_info=bag_topic(s.camera_info_topic),
                       depth=bag_topic(s.depth_topic))
    quiet = args.no_progress
    engine = LERFEngine(params.engine, params.device)
    added = keyframes = rejected = 0
    with BagFrameReader(args.bag, topics, s.world_frame, args.camera_frame) as reader:
        bar = tqdm(total=reader.image_count, desc="frames", unit="img", disable=quiet, file=sys.stderr)
        for frame in reader:
            added += 1
            try:
                result = engine.add_frame(frame)
            except ValueError:
                reader.stats.dropped["invalid_frame"] += 1
                continue
            finally:
                bar.update(1)
            keyframes += result.keyframe
            rejected += not result.keyframe
            bar.set_postfix(keyframes=keyframes)
        bar.close()
        stats = reader.stats
    if keyframes < params.engine.ingest.min_keyframes:
        raise UserError(
            f"only {keyframes} keyframes from {stats.images} images (need "
            f"{params.engine.ingest.min_keyframes}); dropped: {dict(stats.dropped) or 'none'}"
        )
    t0 = time.monotonic()
    bar = tqdm(total=steps, desc="training", unit="step", disable=quiet, file=sys.stderr)
    reason = _train(engine, steps, fixed is not None, args.seconds, bar)
    bar.close()
    if fixed is not None or reason == "seconds":
        engine.evaluate_convergence()  # judged at the last step, not up to eval_every steps before it
    args.out.mkdir(parents=True, exist_ok=True)
    engine.save(args.out)
    st = engine.status()
    conv = st.convergence
    info = {"world_frame": s.world_frame, "bag": str(Path(args.bag).resolve()), "images": stats.images,
            "frames": stats.frames, "keyframes": keyframes, "dropped": dict(stats.dropped),
            "steps": st.step, "preset": params.values["preset"],
            "train_seconds": round(time.monotonic() - t0, 2), "stop_reason": reason,
            "convergence": {k: _json_number(v) for k, v in dataclasses.asdict(conv).items()},
            "nonfinite_steps": st.nonfinite_steps, "restores": st.restores,
            "oom_events": st.oom_events, "rays_per_step": st.rays_per_step}
    (args.out / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
    box, source = engine.status().scene_box, engine.status().scene_box_source
    if box is not None:
        print(f"scene box ({scene_region.describe_source(source)}): min "
              f"{tuple(round(v, 2) for v in box[0])} max {tuple(round(v, 2) for v in box[1])} m in "
              f"'{s.world_frame}'")
    held = engine.status().keyframes
    evicted = f", {keyframes - held} evicted as redundant" if keyframes > held else ""
    print(f"trained {info['steps']} steps on {held} keyframes ({keyframes} accepted{evicted}; {stats.frames} "
          f"frames of {stats.images} images, dropped {dict(stats.dropped) or 'none'}) in "
          f"{info['train_seconds']:.1f} s -> {args.out}")
    usable = "usable" if conv.usable else "NOT usable"
    print(f"stopped: {_stop_text(reason, steps, args.seconds)}; map {usable} (progress {conv.progress:.2f}): "
          f"{conv.note}"
          + (f"; {st.nonfinite_steps} non-finite steps skipped, {st.restores} roll-backs"
             if st.nonfinite_steps else "")
          + (f"; out of GPU memory {st.oom_events} times: {st.rays_per_step} rays per step"
             if st.oom_events else ""))
    return 0


def _train(engine, steps: int, fixed: bool, seconds: float | None, bar) -> str:
    """Train until exactly ``steps`` steps (``fixed``), else until the map is usable or ``steps`` (the cap);
    ``seconds`` of wall time end it sooner. Keyframe features still pending are computed first either way.
    Returns the stop reason (one of ``STOP_REASONS``)."""
    t0 = time.monotonic()
    while True:
        st = engine.status()
        reason = None
        if not fixed and st.convergence.usable:
            reason = "usable"
        elif st.step >= steps:
            reason = "steps" if fixed else ("no convergence signal" if st.convergence.no_signal else "cap")
        elif seconds is not None and time.monotonic() - t0 > seconds:
            reason = "seconds"
        if reason is not None and st.keyframes_pending == 0 and st.step > 0:
            return reason
        stats = engine.step(0 if reason is not None else min(10, steps - st.step))
        st = engine.status()
        skipped = st.nonfinite_steps or st.oom_events  # steps tried and not applied: training did start
        if not stats.work_done and st.step == 0 and st.keyframes_pending == 0 and not skipped:
            raise UserError(f"nothing to train on: too few of the {st.keyframes} keyframes have language "
                            f"features (last error: {st.last_error or 'none'})")
        bar.n = min(st.step, steps)
        bar.set_postfix(pyramid=f"{st.keyframes - st.keyframes_pending}/{st.keyframes}",
                        loss=f"{st.losses.get('total', float('nan')):.3f}", progress=f"{st.progress:.2f}")
        bar.refresh()


def _stop_text(reason: str, steps: int, seconds: float | None) -> str:
    if reason == "seconds":
        return f"--seconds {seconds:g} elapsed"
    return {"usable": "the map is usable",
            "steps": f"{steps} steps done (--steps)",
            "cap": f"step cap {steps} reached before the map was usable",
            "no convergence signal": f"step cap {steps} reached with no convergence signal"}[reason]


def _json_number(value):
    """NaN / inf (not valid JSON) -> None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------------------------------------- query
def map_world_frame(map_dir: Path) -> str:
    """The world frame a map was trained in (sidecar of `lerf-ros train` or a node's save_map), else the
    node default."""
    return read_world_frame(map_dir) or SPECS["world_frame"].default


def load_engine(map_dir: Path, device: str = "auto"):
    """The engine of a map directory or of a node's journal (`core/journal.py`: its valid entries; the
    damaged ones are named on stderr)."""
    from ..core.engine import LERFEngine

    if not map_dir.is_dir():
        raise UserError(f"map directory not found: {map_dir}")
    try:
        engine, skipped = load_map_or_journal(LERFEngine, map_dir, device)
    except ValueError as exc:
        raise UserError(f"cannot load map {map_dir}: {exc}") from exc
    if skipped:
        print(f"warning: {map_dir}: {skipped}", file=sys.stderr)
    return engine


def _xyz(v, frame_id: str | None = None) -> dict:
    out = {"x": float(v[0]), "y": float(v[1]), "z": float(v[2])}
    return out if frame_id is None else {**out, "frame_id": frame_id}


def answer_dict(result, frame_id: str) -> dict:
    """A QueryResult as the JSON object ``query --json`` prints (and the demo's table uses); ``targets``
    lists every target found, best first (location, extent in metres, relevancy, confidence, points)."""
    loc = result.location_world
    targets = [{"location": _xyz(t.location_world, frame_id), "extent": _xyz(t.extent_m),
                "relevancy": float(t.relevancy), "confidence": float(t.confidence),
                "point_count": int(t.point_count), "view_support": None if np.isnan(t.view_support)
                else float(t.view_support), "competitor": t.competitor} for t in result.targets]
    return {
        "found": bool(result.found),
        "message": result.message,
        "location": None if loc is None else _xyz(loc, frame_id),
        "relevancy": float(result.relevancy),
        "confidence": float(result.confidence),
        "competitor": result.competitor,
        "scale": float(result.scale_m),
        "model_step": int(result.model_step),
        "source": result.source,
        "cloud_points": len(result.cloud_xyz),
        "targets": targets,
    }


def format_answer(text: str, ans: dict) -> str:
    loc = ans["location"]
    where = "none" if loc is None else \
        f"x={loc['x']:.3f} y={loc['y']:.3f} z={loc['z']:.3f} m in frame '{loc['frame_id']}'"
    return "\n".join([
        f"query:      {text}",
        f"found:      {'yes' if ans['found'] else 'no'}  ({ans['message']})",
        f"location:   {where}",
        f"relevancy:  {ans['relevancy']:.3f}",
        f"confidence: {ans['confidence']:.2f}" + (f"  (best competing phrase: '{ans['competitor']}')"
                                                  if ans["competitor"] else ""),
        f"scale:      {ans['scale']:.3f} m",
        f"model step: {ans['model_step']}",
        f"cloud:      {ans['cloud_points']} points",
        *(f"target {i + 1}:   x={t['location']['x']:.3f} y={t['location']['y']:.3f} "
          f"z={t['location']['z']:.3f} extent {t['extent']['x']:.2f} x {t['extent']['y']:.2f} x "
          f"{t['extent']['z']:.2f} m, confidence {t['confidence']:.2f}, {t['point_count']} points"
          for i, t in enumerate(ans["targets"])
          if len(ans["targets"]) > 1),
    ])


def write_outputs(engine, result, text: str, frame_id: str, ply: Path | None, png: Path | None,
                  boxes=()) -> list[Path]:
    """Write the PLY cloud and/or the PNG picture of one answer; returns the paths written."""
    from .pictures import KeyframeView, query_picture, save_png
    from .ply import write_ply

    out = []
    if ply is not None:
        out.append(write_ply(ply, result.cloud_xyz, result.cloud_relevancy, result.cloud_rgb, frame_id))
    if png is not None:
        with engine.lock:
            views = [KeyframeView(f.image, f.intrinsics, f.T_world_cam, f.depth_m)
                     for f in engine.store.frames()]
        title = f"{text!r}: " + ("found" if result.found else "not found") + f", rel {result.relevancy:.2f}"
        target = result.location_world if result.found else None
        out.append(save_png(query_picture(views, result.cloud_xyz, result.cloud_relevancy, result.cloud_rgb,
                                          target, title, boxes), png))
    return out


def cmd_query(args) -> int:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    engine = load_engine(args.map, args.device)
    if args.vocabulary_file is not None:
        vocab = read_vocabulary(str(args.vocabulary_file.expanduser().resolve()))
        engine.config = dataclasses.replace(engine.config, query=dataclasses.replace(engine.config.query,
                                                                                     vocabulary=vocab))
    frame_id = map_world_frame(args.map)
    try:
        result = engine.query(args.text, args.negatives, args.threshold, with_cloud=True,
                              max_results=args.max_results)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    ans = answer_dict(result, frame_id)
    written = write_outputs(engine, result, args.text, frame_id, args.ply, args.png)
    if args.json:
        print(json.dumps(ans))
    else:
        print(format_answer(args.text, ans))
        for path in written:
            print(f"wrote       {path}")
    return 0


# ---------------------------------------------------------------------------------------------- info
def map_info(map_dir: Path) -> dict:
    from ..core import checkpoint

    if not map_dir.is_dir():
        raise UserError(f"map directory not found: {map_dir}")
    try:
        data = checkpoint.load_map(map_dir)
    except ValueError as exc:
        raise UserError(f"invalid map {map_dir}: {exc}") from exc
    size = sum(p.stat().st_size for p in map_dir.rglob("*") if p.is_file())
    box = None if data.scene_box is None else [[float(v) for v in row] for row in data.scene_box]
    images = data.keyframes["images"]
    return {
        "path": str(map_dir.resolve()),
        "keyframes": len(data.keyframes["ids"]),
        "image_size": [int(images.shape[2]), int(images.shape[1])] if images.ndim == 4 else None,
        "bounds": box,
        "encoders": dict(data.encoders),
        "steps": int(data.step),
        "preset": data.config.get("name"),
        "world_frame": map_world_frame(map_dir),
        "size_bytes": int(size),
    }


def cmd_info(args) -> int:
    info = map_info(args.map)
    if args.json:
        print(json.dumps(info))
        return 0
    box = info["bounds"]
    print(f"map:        {info['path']}")
    print(f"keyframes:  {info['keyframes']}  ({info['image_size'][0]}x{info['image_size'][1]} px)"
          if info["image_size"] else f"keyframes:  {info['keyframes']}")
    if box is None:
        print("bounds:     none (no model)")
    else:
        lo, hi = (tuple(round(v, 2) for v in corner) for corner in box)
        print(f"bounds:     min {lo} max {hi} m in '{info['world_frame']}'")
    print("encoders:   " + ", ".join(f"{k}={v}" for k, v in info["encoders"].items()))
    print(f"steps:      {info['steps']}  (preset {info['preset']})")
    print(f"size:       {info['size_bytes'] / 2**20:.2f} MiB on disk")
    return 0


# ---------------------------------------------------------------------------------------------- demo-bag
def cmd_demo_bag(args) -> int:
    from .demo_bag import DemoBagConfig, write_demo_bag, write_random_room_bag

    if args.room == "random":
        if args.frames is not None:
            raise UserError("--frames applies to the demo room; a random room's drive comes from its --seed")
        bag = write_random_room_bag(args.out, args.seed, with_depth=not args.no_depth, storage=args.format,
                                    compressed=args.compressed or "")
    else:
        config = DemoBagConfig(frames=60 if args.frames is None else args.frames, storage=args.format,
                               seed=args.seed, with_depth=not args.no_depth, compressed=args.compressed or "")
        bag = write_demo_bag(args.out, config=config)
    print(f"wrote {bag.path} ({args.format}): " + ", ".join(f"{t} {n}" for t, n in bag.counts.items()))
    print("objects: " + ", ".join(bag.room.names))
    print("absent:  " + ", ".join(bag.room.absent_names))
    return 0


COMMANDS = {"train": cmd_train, "query": cmd_query, "info": cmd_info, "demo-bag": cmd_demo_bag}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, BagError, ParameterError) as exc:
        print(f"lerf-ros {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # bad values named by the core; unreadable / unwritable paths
        print(f"lerf-ros {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lerf-ros {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
