"""Quality benchmark on randomised rooms (``lerf_ros.sim.rooms``), not the demo room.

    .venv/bin/python bench/quality.py --rooms 2 --conditions rgbd-colour,rgb-colour

Per room (``random_room(seed)`` with a drive through it, ``lerf_ros.sim.drive``) the bench writes a
rosbag2 with and without depth, then per condition goes the CLI's way, in process: ``lerf-ros train``
(``cli.main``) -> ``cli.load_engine`` -> ``engine.query`` for every object in the room and for its
absent names. Conditions are ``<rgbd|rgb>-<colour|cliplike>``: RGB-D trains on the depth bag, RGB on
the bag without depth (``--depth-topic ''``); ``colour`` is the demo colour encoder, ``cliplike`` the
CLIP-like test encoder (``test/doubles/lerf_test_doubles/cliplike.py``), ``cliphard`` its harder variant
(target ~0.61, look-alikes ~0.57, three times the noise).

Scoring (ground truth from the generator):
  located      found, and the answer lies in the object's box grown by 5 cm (a colour concept with two
               instances: either instance's box)
  rejected     an absent name answered with found == False
  look-alike   a found answer inside the grown box of an object whose colour is a hue neighbour of the
               query's (``adjacent_colours``) and not inside a box of the query's own colour; counted
               over the queries (present and absent) that have such a neighbour in the room
  error        distance from a found answer to the nearest same-colour object's box centre (median)
  t90          streaming: the bag's frames enter an ``LERFEngine`` at their stamps (the clock is the
               engine's wall time: adding frames + training), every ``--query-every-s`` the objects are
               queried (query time not counted); the clock when >= 90 % are first located, or "-"
               (with the best fraction reached) within ``--stream-cap-s``; the "all" row adds the
               objects located at each room's last query round (its t90, or the cap), pooled over rooms
  mean         streaming: the fraction located averaged over the cap (`mean_located`), per room and
               over the rooms: steadier than t90 from run to run

Prints one table per condition (a row per room, then all rooms) and writes every query answer to
``bench/out/quality_<preset>_<device>.json`` (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOUBLES = ROOT / "test" / "doubles"
sys.path.insert(0, str(ROOT))

from lerf_ros.core.encoders import DEMO_CLIP  # noqa: E402
from lerf_ros.sim.rooms import adjacent_colours, colour_word, random_room  # noqa: E402

GROW_M = 0.05
LOCATED_FRACTION = 0.9
ENCODERS = {"colour": DEMO_CLIP, "cliplike": "lerf_test_doubles.cliplike:cliplike_encoder",
            "cliphard": "lerf_test_doubles.cliplike:cliplike_hard_encoder"}
DEPTH_TOPIC = "/camera/depth/image_rect_raw"
_HEAVY_FIELDS = {"cloud_xyz", "cloud_relevancy", "cloud_rgb"}


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    depth: bool
    encoder: str  # key of ENCODERS


def parse_conditions(text: str) -> list[Condition]:
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        sensor, _, encoder = name.partition("-")
        if sensor not in ("rgbd", "rgb") or encoder not in ENCODERS:
            raise SystemExit(f"quality.py: unknown condition {name!r}; use <rgbd|rgb>-<{'|'.join(ENCODERS)}>")
        out.append(Condition(name, sensor == "rgbd", encoder))
    if not out:
        raise SystemExit("quality.py: --conditions is empty")
    return out


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height); SystemExit with the reason otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size must be WIDTHxHEIGHT, got {text!r}") from None
    if w < 8 or h < 8:
        raise SystemExit(f"--image-size must be at least 8x8, got {text!r}")
    return w, h


def require_encoder(encoder: str) -> None:
    """Make the test doubles importable; fail clearly when the CLIP-like encoder is not there."""
    if encoder not in ("cliplike", "cliphard"):
        return
    if str(DOUBLES) not in sys.path:
        sys.path.insert(0, str(DOUBLES))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(DOUBLES), os.environ.get("PYTHONPATH")) if p)
    module = ENCODERS[encoder].split(":")[0]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise SystemExit(f"quality.py: the CLIP-like test encoder {ENCODERS[encoder]!r} is not available "
                         f"(expected {DOUBLES / 'lerf_test_doubles' / 'cliplike.py'}); run the colour "
                         f"conditions only: --conditions rgbd-colour,rgb-colour")


# ---------------------------------------------------------------------------------------------- scoring
def _inside(obj, p: np.ndarray) -> bool:
    return bool(np.all(p >= obj.box_min - GROW_M) and np.all(p <= obj.box_max + GROW_M))


def jsonable(value):
    """QueryResult fields (and what they hold: Target dataclasses, arrays, numpy scalars) -> JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in _HEAVY_FIELDS}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # torch tensors
        return value.tolist()
    return value


def score_answer(room, text: str, present: bool, result) -> dict:
    """One query's row: the answer (every QueryResult field but the clouds) and its scoring."""
    loc = getattr(result, "location_world", None)
    found = bool(result.found)
    row = {"query": text, "kind": "present" if present else "absent", "found": found,
           "location": None if loc is None else [float(v) for v in loc],
           "relevancy": float(result.relevancy), "message": result.message}
    if dataclasses.is_dataclass(result):
        for f in dataclasses.fields(result):
            if f.name not in _HEAVY_FIELDS | {"location_world", "found", "message", "relevancy"}:
                row[f.name] = jsonable(getattr(result, f.name))
    row["confidence"] = float(getattr(result, "confidence", float("nan")))
    colour = colour_word(text)
    same = [o for o in room.objects if o.colour_name == colour]
    neighbours = [o for o in room.objects if o.colour_name in adjacent_colours(colour)]
    hit = found and loc is not None
    p = np.asarray(loc, dtype=np.float64) if hit else None
    own = hit and any(_inside(o, p) for o in same)
    row["located"] = bool(present and own)
    row["has_lookalike"] = bool(neighbours)
    row["lookalike_hit"] = next((o.name for o in neighbours if hit and not own and _inside(o, p)), None)
    row["error_m"] = (float(min(np.linalg.norm(p - o.center) for o in same))
                      if present and hit and same else None)
    return row


def query_room(engine, room) -> list[dict]:
    rows = []
    for name in room.names:
        rows.append(score_answer(room, name, True, engine.query(name, with_cloud=False)))
    for name in room.absent_names:
        rows.append(score_answer(room, name, False, engine.query(name, with_cloud=False)))
    return rows


def located_fraction(engine, room) -> float:
    """Every object queried as a task planner would while the node trains: a query during training reads
    the candidates the training loop keeps (it renders no keyframe depth itself), so each one is marked as
    asked within `engine.TRAINING_ACTIVE_S` of a step (this loop trains between query rounds, not during
    them, and a round of ten queries outlasts that window)."""
    rows = []
    for name in room.names:
        engine._last_train_time = time.perf_counter()
        rows.append(score_answer(room, name, True, engine.query(name, with_cloud=False)))
    return sum(r["located"] for r in rows) / max(len(rows), 1)


def summarise(rows: list[dict]) -> dict:
    present = [r for r in rows if r["kind"] == "present"]
    absent = [r for r in rows if r["kind"] == "absent"]
    look = [r for r in rows if r["has_lookalike"]]
    errors = [r["error_m"] for r in present if r["error_m"] is not None]
    return {"objects": len(present), "located": sum(r["located"] for r in present),
            "absent": len(absent), "rejected": sum(not r["found"] for r in absent),
            "lookalike_queries": len(look), "lookalike_confusions": sum(r["lookalike_hit"] is not None
                                                                        for r in look),
            "median_error_m": statistics.median(errors) if errors else None}


# ---------------------------------------------------------------------------------------------- runs
def write_bags(seed: int, workdir: Path, depths=(True, False),
               image_size: tuple[int, int] = (160, 120)) -> tuple[object, dict[bool, Path], dict]:
    """random_room(seed), one drive through it (images of ``image_size`` (width, height)), written with
    (True) and / or without (False) depth."""
    from lerf_ros.sim.drive import DriveConfig, drive_through
    from lerf_ros.tools.demo_bag import write_recording_bag

    room = random_room(seed)
    drive = drive_through(room, config=DriveConfig(width=image_size[0], height=image_size[1]))
    size_tag = "" if tuple(image_size) == (160, 120) else f"_{image_size[0]}x{image_size[1]}"
    bags = {}
    for depth in depths:
        path = workdir / f"room{seed}{size_tag}_{'rgbd' if depth else 'rgb'}"
        if not path.exists():
            write_recording_bag(path, room, drive.recording, with_depth=depth)
        bags[depth] = path
    info = {"seed": seed, "size_m": (room.bounds[1] - room.bounds[0]).round(2).tolist(),
            "objects": [{"name": o.name, "shape": o.shape, "placement": o.placement, "instance": o.instance,
                         "hidden_behind": o.hidden_behind, "size_m": o.size.round(3).tolist(),
                         "center": o.center.round(3).tolist(), "views": drive.views[o.name]}
                        for o in room.objects],
            "absent": list(room.absent_names), "lookalike_pairs": [list(p) for p in room.lookalike_pairs],
            "images": len(drive.T_world_cam), "image_size": list(image_size),
            "image_rate_hz": drive.image_rate_hz,
            "duration_s": round(drive.duration_s, 1), "camera_height_m": round(drive.camera_height_m, 2),
            "tilt_down_deg": round(drive.tilt_down_deg, 1)}
    return room, bags, info


def train_and_query(room, bag: Path, cond: Condition, workdir: Path, args) -> dict:
    from lerf_ros.tools import cli

    map_dir = workdir / f"map_{bag.name}_{cond.encoder}"
    argv = ["train", str(bag), "--out", str(map_dir), "--preset", args.preset, "--device", args.device,
            "--clip-encoder", ENCODERS[cond.encoder], "--depth-topic", DEPTH_TOPIC if cond.depth else "",
            "--no-progress"]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    reuse = getattr(args, "reuse_maps", False) and (map_dir / cli.TRAINING_INFO).is_file()
    if reuse:  # a map trained by an earlier run with this workdir: only the queries run again
        print(f"reusing {map_dir}", file=sys.stderr, flush=True)
    else:
        _seed_torch(args)
        t0 = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):  # the tables alone go to stdout
            rc = cli.main(argv)
        if rc != 0:
            return {"error": f"lerf-ros train exited {rc}", "train_s": time.monotonic() - t0, "rows": []}
    engine = cli.load_engine(map_dir, args.device)
    info = json.loads((map_dir / cli.TRAINING_INFO).read_text())
    train_s = info.get("train_seconds", float("nan")) if reuse else time.monotonic() - t0
    t0 = time.monotonic()
    rows = query_room(engine, room)
    return {"train_s": round(train_s, 1), "steps": info.get("steps"), "keyframes": info.get("keyframes"),
            "query_s": round((time.monotonic() - t0) / max(len(rows), 1), 3), "rows": rows}


def _seed_torch(args) -> None:
    """The engine seeds its ray sampler but not the fields' initialisation (torch's global generator):
    seed it so that a map is a function of (bag, condition, steps), not of what ran before."""
    import torch

    if getattr(args, "torch_seed", 0) >= 0:
        torch.manual_seed(getattr(args, "torch_seed", 0))


def stream(room, bag: Path, cond: Condition, args) -> dict:
    """Frames enter the engine at their stamps on the engine's own clock; returns t90 and the curve."""
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.ros.params import resolve
    from lerf_ros.tools.bag_io import BagFrameReader, BagTopics

    params = resolve({"preset": args.preset, "device": args.device, "clip_encoder": ENCODERS[cond.encoder],
                      "depth_topic": DEPTH_TOPIC if cond.depth else ""})
    with BagFrameReader(bag, BagTopics(depth=DEPTH_TOPIC if cond.depth else "")) as reader:
        frames = list(reader)
    _seed_torch(args)
    engine = LERFEngine(params.engine, params.device)
    t_first = frames[0].stamp_ns
    clock, i, next_query, curve = 0.0, 0, args.query_every_s, []
    while clock < args.stream_cap_s:
        t0 = time.monotonic()
        while i < len(frames) and (frames[i].stamp_ns - t_first) / 1e9 <= clock:
            try:
                engine.add_frame(frames[i])
            except ValueError:
                pass  # counted by the engine's caller in the product; here the frame is simply lost
            i += 1
        stats = engine.step(10)
        clock += time.monotonic() - t0
        if not stats.work_done and i < len(frames):
            clock = max(clock, (frames[i].stamp_ns - t_first) / 1e9)  # idle until the next frame arrives
        if clock >= next_query:
            fraction = located_fraction(engine, room)
            curve.append({"t_s": round(clock, 2), "step": engine.status().step, "frames": i,
                          "located": round(fraction, 3)})
            if fraction >= LOCATED_FRACTION:
                return {"t90_s": round(clock, 1), "curve": curve, "cap_s": args.stream_cap_s}
            next_query += args.query_every_s
    return {"t90_s": None, "curve": curve, "cap_s": args.stream_cap_s}


def mean_located(curve: list[dict], cap_s: float) -> float:
    """The fraction of objects located, averaged over the first ``cap_s`` seconds of a stream: each query
    round's fraction holds until the next one (0 before the first; a run that reached t90 stopped there
    and its last round holds to the cap). Steadier than t90, a first-passage time that one object
    flickering in or out of the answers moves by tens of seconds."""
    area, t_prev, f_prev = 0.0, 0.0, 0.0
    for p in curve:
        t = min(float(p["t_s"]), cap_s)
        area += f_prev * (t - t_prev)
        t_prev, f_prev = t, float(p["located"])
    return (area + f_prev * max(cap_s - t_prev, 0.0)) / cap_s


# ---------------------------------------------------------------------------------------------- output
def _fmt(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.0f} %)" if d else "-"


def table(cond: Condition, results: list[dict]) -> str:
    head = ("| room | objects located | absent rejected | look-alike confusions | median error (m) "
            "| t90 (s) | steps | train (s) |")
    lines = [f"### {cond.name}", "", head, "|" + "---|" * 8]
    all_rows, t90s, pooled, means = [], [], [0, 0], []
    for r in results:
        s = summarise(r["rows"])
        all_rows += r["rows"]
        t90 = r.get("stream", {}).get("t90_s")
        t90s.append(t90)
        curve = r.get("stream", {}).get("curve", [])
        if curve:  # objects located at the stream's last round (its t90, or the cap)
            pooled[0] += round(curve[-1]["located"] * s["objects"])
            pooled[1] += s["objects"]
        extra = f" (max {100 * max(p['located'] for p in curve):.0f} %)" if curve and t90 is None else ""
        cap = r.get("stream", {}).get("cap_s")
        if curve and cap:
            means.append(mean_located(curve, float(cap)))
            extra += f"; mean {means[-1]:.2f}"
        err = "-" if s["median_error_m"] is None else f"{s['median_error_m']:.2f}"
        size = "x".join(f"{v:.1f}" for v in r["room"]["size_m"][:2])
        label = f"{r['room']['seed']} ({size} m)" + (f": {r['error']}" if "error" in r else "")
        lines.append(f"| {label} | {_fmt(s['located'], s['objects'])} | {_fmt(s['rejected'], s['absent'])} | "
                     f"{s['lookalike_confusions']}/{s['lookalike_queries']} | {err} | "
                     f"{'-' if t90 is None else t90}{extra} | {r.get('steps', '-')} | "
                     f"{r.get('train_s', '-')} |")
    s = summarise(all_rows)
    err = "-" if s["median_error_m"] is None else f"{s['median_error_m']:.2f}"
    done = [t for t in t90s if t is not None]
    t90 = f"{statistics.median(done):.1f} (median, {len(done)}/{len(t90s)} rooms)" if done else "-"
    if pooled[1]:
        t90 += f"; located within the cap, pooled: {_fmt(*pooled)}"
    if means:
        t90 += f"; mean located over the cap {statistics.mean(means):.2f} ({len(means)} rooms)"
    lines.append(f"| **all {len(results)}** | {_fmt(s['located'], s['objects'])} | "
                 f"{_fmt(s['rejected'], s['absent'])} | "
                 f"{s['lookalike_confusions']}/{s['lookalike_queries']} | {err} | {t90} | | |")
    return "\n".join(lines)


CONF_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)
REL_BINS = (0.0, 0.45, 0.5, 0.52, 0.55, 0.58, 0.6, 0.65, 0.7, 0.9, 1.0001)


def histograms(rows: list[dict]) -> dict:
    """Counts of confidence and relevancy per bin for three kinds of answer: right (a present object,
    located), wrong (a present object, not located: missed or elsewhere) and absent names. A user with real
    CLIP weights recalibrates the threshold from the same table on their own rooms (README)."""
    kinds = {"right": [r for r in rows if r["kind"] == "present" and r["located"]],
             "wrong": [r for r in rows if r["kind"] == "present" and not r["located"]],
             "absent": [r for r in rows if r["kind"] == "absent"]}
    out = {}
    for field, bins in (("confidence", CONF_BINS), ("relevancy", REL_BINS)):
        counts = {k: np.histogram([float(r.get(field) or 0.0) for r in v], bins=bins)[0].tolist()
                  for k, v in kinds.items()}
        out[field] = {"bins": list(bins), **counts}
    return out


def histogram_table(cond: Condition, hist: dict) -> str:
    lines = [f"#### {cond.name}: answers by confidence and relevancy", ""]
    for field in ("confidence", "relevancy"):
        b = hist[field]["bins"]
        labels = [f"{b[i]:.2f}-{min(b[i + 1], 1.0):.2f}" for i in range(len(b) - 1)]
        lines += [f"| {field} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for kind in ("right", "wrong", "absent"):
            lines.append(f"| {kind} | " + " | ".join(str(c) for c in hist[field][kind]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rooms", type=int, default=8, help="rooms (seeds 0..N-1 unless --seeds)")
    p.add_argument("--seeds", default="", help="comma-separated room seeds (overrides --rooms)")
    p.add_argument("--conditions", default="rgbd-colour,rgb-colour,rgbd-cliplike,rgb-cliplike")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: lerf-ros train's)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", default="160x120", help="camera images WIDTHxHEIGHT")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    p.add_argument("--torch-seed", type=int, default=0,
                   help="torch.manual_seed before each training (-1: leave torch's generator alone)")
    p.add_argument("--stream-cap-s", type=float, default=45.0,
                   help="streaming clock cap, s (drives last 20-40 s; 0 = no streaming run)")
    p.add_argument("--query-every-s", type=float, default=5.0, help="streaming query interval, s")
    p.add_argument("--stream-conditions", default="",
                   help="comma-separated conditions that also get the streaming run (default: all)")
    p.add_argument("--merge", default="",
                   help="comma-separated JSON files of earlier runs (e.g. two halves of the rooms run in "
                        "parallel): print and write their combined tables instead of running")
    p.add_argument("--workdir", type=Path, default=None, help="keep bags and maps here (default: a temp dir)")
    p.add_argument("--reuse-maps", action="store_true",
                   help="query the maps an earlier run left in --workdir instead of training them again "
                        "(for query-side changes; train (s) is then the earlier run's)")
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)
    if args.merge:
        return merge_runs([Path(f) for f in args.merge.split(",") if f.strip()], args.out)
    conditions = parse_conditions(args.conditions)
    streamed = ({c.strip() for c in args.stream_conditions.split(",")} if args.stream_conditions
                else {c.name for c in conditions})
    for cond in conditions:
        require_encoder(cond.encoder)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else list(range(args.rooms))
    image_size = parse_size(args.image_size)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "out" / f"quality_{args.preset}_{args.device}.json"
    with tempfile.TemporaryDirectory(prefix="lerf_quality_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results: dict[str, list[dict]] = {c.name: [] for c in conditions}
        t_start = time.monotonic()
        skipped, depths = [], sorted({c.depth for c in conditions})
        for seed in seeds:
            try:
                room, bags, info = write_bags(seed, workdir, depths, image_size)
            except RuntimeError as exc:  # the generator found no drive that shows every object: no room
                print(f"room {seed}: skipped, {exc}", file=sys.stderr, flush=True)
                skipped.append(seed)
                continue
            print(f"room {seed}: {info['size_m'][0]} x {info['size_m'][1]} m, {len(room.objects)} objects, "
                  f"{info['images']} images at {info['image_rate_hz']} Hz", file=sys.stderr, flush=True)
            for cond in conditions:
                r = {"room": info, **train_and_query(room, bags[cond.depth], cond, workdir, args)}
                if args.stream_cap_s > 0 and "error" not in r and cond.name in streamed:
                    r["stream"] = stream(room, bags[cond.depth], cond, args)
                s = summarise(r["rows"])
                print(f"  {cond.name}: located {s['located']}/{s['objects']}, rejected {s['rejected']}/"
                      f"{s['absent']}, t90 {r.get('stream', {}).get('t90_s')}", file=sys.stderr, flush=True)
                results[cond.name].append(r)
        wall = time.monotonic() - t_start
    report(conditions, results, {**{k: str(v) for k, v in vars(args).items()},
                                 "skipped_seeds": ",".join(map(str, skipped))}, wall, out)
    if skipped:
        print(f"\nseeds skipped (no drive through the room shows every object): {skipped}")
    return 0


def report(conditions, results: dict[str, list[dict]], args: dict, wall: float, out: Path) -> None:
    """Print the tables and histograms of every condition and write the JSON."""
    hists = {c: histograms([row for r in rs for row in r["rows"]]) for c, rs in results.items()}
    for cond in conditions:
        print(table(cond, results[cond.name]) + "\n")
        print(histogram_table(cond, hists[cond.name]) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {c: {"summary": summarise([row for r in rs for row in r["rows"]]), "histograms": hists[c],
                   "rooms": rs} for c, rs in results.items()}
    out.write_text(json.dumps({"args": args, "wall_s": round(wall, 1), "conditions": summary}, indent=1))
    print(f"wrote {out} ({wall:.0f} s)")


def merge_runs(files: list[Path], out: Path | None) -> int:
    """Combine the rooms of several runs' JSON (same conditions) into one report."""
    runs = [json.loads(f.read_text()) for f in files]
    names = list(runs[0]["conditions"])
    if any(list(r["conditions"]) != names for r in runs):
        raise SystemExit(f"the runs have different conditions: {[list(r['conditions']) for r in runs]}")
    results = {c: sorted((room for r in runs for room in r["conditions"][c]["rooms"]),
                         key=lambda room: room["room"]["seed"]) for c in names}
    out = out or ROOT / "bench" / "out" / "quality_merged.json"
    report(parse_conditions(",".join(names)), results, {"merged": [str(f) for f in files]},
           sum(r["wall_s"] for r in runs), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
