"""Query latency while the training worker trains, and with a map loaded and idle (issue: queries that do
not pay for geometry). RGB-only by default, so candidates come from rendered depth.

    .venv/bin/python bench/query_latency.py --seed 1 --train-s 90 --queries-every-s 1.0

A random room (``lerf_ros.sim``) is rendered along its drive and every frame is added to an engine; a
``TrainingWorker`` thread trains while the main thread asks for each object in turn (the worker keeps
the candidates current, a query must not re-render them); then the map is saved, loaded into a fresh
engine, its query caches built (`LERFEngine.warm_up_queries`, as the query node does after loading a map;
timed apart) and queried idle. Prints one table and writes JSON (bench/out/query_latency_<preset>.json).

    .venv/bin/python bench/query_latency.py --seed 44 --map W/map_room44_rgbd_cliplike

times a saved map of room 44 idle instead (a `bench/quality.py --workdir W` map, RGB-D or RGB-only).
torch gets the threads the nodes would give it (``--threads 0``): one less than the cores while a trainer
runs, all of them for ``--map`` (the query node alone on a map); ``--threads 1`` is lerf_node idle on a
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lerf_ros.core.engine import LERFEngine  # noqa: E402
from lerf_ros.core.frames.frame import Frame  # noqa: E402
from lerf_ros.core.language.candidates import render_calls  # noqa: E402
from lerf_ros.core.presets import make_preset  # noqa: E402
from lerf_ros.core.training.worker import TrainingWorker, set_torch_threads  # noqa: E402
from lerf_ros.sim.drive import drive_through  # noqa: E402
from lerf_ros.sim.rooms import random_room  # noqa: E402


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def idle_latency(loaded: LERFEngine, room) -> tuple[float, list[float], list[float]]:
    """What the query node does after loading a map (build the query caches, timed), then each present
    name and each absent name three times: (warm-up s, present latencies, absent latencies)."""
    warm_up_s = loaded.warm_up_queries()
    idle, idle_absent = [], []
    for name in list(room.names) * 3:
        t = time.perf_counter()
        loaded.query(name)
        idle.append(time.perf_counter() - t)
    for name in list(room.absent_names) * 3:  # the field shows nothing: the keyframe views are searched
        t = time.perf_counter()
        loaded.query(name)
        idle_absent.append(time.perf_counter() - t)
    return warm_up_s, idle, idle_absent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--map", type=Path, default=None,
                   help="time this saved map of room --seed idle (e.g. a bench/quality.py map; its encoders "
                        "must import: test/doubles is put on the path) instead of training one")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--depth", action="store_true", help="RGB-D instead of RGB-only")
    # 90 s: an RGB-only map's frustum box is tightened (the fields start over) ~35 s in on this CPU; a
    # shorter run would save and time a map of fresh fields.
    p.add_argument("--train-s", type=float, default=90.0, help="seconds of training with queries")
    p.add_argument("--queries-every-s", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = as the nodes choose (torch_threads 0): one less than the "
                        "cores while training, all of them for --map (the query node alone on a map)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    args.threads = set_torch_threads(args.threads, print, trains=args.map is None)
    room = random_room(args.seed)
    if args.map is not None:
        sys.path.insert(0, str(ROOT / "test" / "doubles"))
        warm_up_s, idle, idle_absent = idle_latency(LERFEngine.load(args.map, "cpu"), room)
        return _report(args, f"map {args.map} of room {args.seed}", 0, warm_up_s,
                       {"map loaded, idle (present objects)": idle,
                        "map loaded, idle (absent names)": idle_absent}, 0)
    drive = drive_through(room)
    cfg = make_preset(args.preset)
    engine = LERFEngine(cfg, "cpu")
    for T, stamp in zip(drive.T_world_cam, drive.recording.image_stamps_ns, strict=True):
        rgb, depth = room.render(T, drive.intrinsics)
        engine.add_frame(Frame(rgb, drive.intrinsics, T, int(stamp), depth if args.depth else None))
    worker = TrainingWorker(engine, steps_per_tick=10)
    worker.start()
    during, renders_in_queries, names = [], 0, list(room.names)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < args.train_s:
        time.sleep(args.queries_every_s)
        if not engine.ready():
            continue
        before = render_calls()
        t = time.perf_counter()
        engine.query(names[i % len(names)])
        during.append(time.perf_counter() - t)
        renders_in_queries += render_calls() - before  # the worker may render meanwhile: an upper bound
        i += 1
    worker.stop()
    steps = engine.train_step
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(tmp)
        warm_up_s, idle, idle_absent = idle_latency(LERFEngine.load(tmp, "cpu"), room)
    rows = {"during training": during, "map loaded, idle (present objects)": idle,
            "map loaded, idle (absent names)": idle_absent}
    kind = "RGB-D" if args.depth else "RGB-only"
    label = f"room {args.seed}, {kind}, preset {args.preset}, {steps} steps, {len(engine.store)} keyframes"
    return _report(args, label, steps, warm_up_s, rows, renders_in_queries)


def _report(args, label: str, steps: int, warm_up_s: float, rows: dict, renders_in_queries: int) -> int:
    print(f"{label}; after loading, the query caches took {warm_up_s:.2f} s to build "
          f"(LERFEngine.warm_up_queries, as the query node does at start)")
    print("| queries | n | p50 (s) | p95 (s) | max (s) |")
    print("|---|---|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {len(v)} | {statistics.median(v):.3f} | {_pct(v, 0.95):.3f} | {max(v):.3f} |")
    out = args.out or ROOT / "bench" / "out" / f"query_latency_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "steps": steps,
                               "renders_during_queries_upper_bound": renders_in_queries,
                               "warm_up_after_load_s": warm_up_s,
                               **{k: v for k, v in rows.items()}}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
