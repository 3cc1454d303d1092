"""The main job, end to end on one machine: bag -> real nodes over DDS -> task-planner queries -> report.

    python -m lerf_ros.tools.demo [--out DIR] [--frames 60] [--steps 300] [--clip-checkpoint PATH]

1. writes the synthetic room as a rosbag2 (``demo_bag``), RGB-D + TF tree + CameraInfo;
2. starts the real nodes (``python -m lerf_ros.compat.launcher --params config/lerf.yaml --set ...``,
   tiny preset on the CPU) in a child process with loopback-only DDS and a random domain;
3. plays the bag into them (``bag_player``) and waits for ``lerf/status`` to say "ready" (the
   ``max_steps`` budget reached, every keyframe's features computed);
4. calls ``lerf/query`` as a task planner would, for every object in the room and for absent ones;
5. writes results.md / results.json (query, found, location, error against ground truth, relevancy),
   one PLY cloud and one PNG picture per query, the node log and the map into one folder.

The language encoder is the deterministic demo colour encoder unless ``--clip-checkpoint`` names a
local OpenCLIP weights file; the report says which.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .demo_report import markdown_table

DEPTH_TOPIC = "/camera/depth/image_rect_raw"


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    frames: int = 60
    steps: int = 300
    rate: float = 1.0
    seed: int = 0
    storage: str = "mcap"
    clip_checkpoint: str = ""
    timeout_s: float = 1200.0


def loopback_env(env: dict) -> dict:
    """DDS stays on this machine: localhost discovery and a random domain unless one is set."""
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_LOCALHOST_ONLY"] = "1"
    env.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 101)))
    return env


def params_file() -> Path:
    path = Path(__file__).resolve().parents[2] / "config" / "lerf.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"node parameters not found: {path} (run from a source checkout)")
    return path


def demo_overrides(opts: DemoOptions) -> dict:
    """The parameters the demo changes from config/lerf.yaml (tiny preset on the CPU, depth, budget; no
    journal: each demo run starts from an empty map instead of resuming the robot's recording)."""
    from ..core.encoders import DEFAULT_CLIP

    values = {"preset": "tiny", "device": "cpu", "world_frame": "map", "depth_topic": DEPTH_TOPIC,
              "max_steps": int(opts.steps), "journal_dir": ""}
    if opts.clip_checkpoint:
        values.update(clip_encoder=DEFAULT_CLIP, clip_checkpoint=opts.clip_checkpoint)
    return values


def write_params(opts: DemoOptions, path: Path) -> Path:
    """config/lerf.yaml with the demo's overrides written into it, as ``path``.

    The values go where the YAML already sets them (a node's own section wins over ``/**`` in rcl,
    so a ``-p`` override would lose to ``lerf_trainer: depth_topic: ""``), else into the section of
    the node(s) that declare them.
    """
    import yaml

    from ..ros.params import QUERY, QUERY_NODE_NAME, SPECS, TRAINER, TRAINER_NODE_NAME

    data = yaml.safe_load(params_file().read_text()) or {}
    sections = {key: body.setdefault("ros__parameters", {}) for key, body in data.items()}
    for name, value in demo_overrides(opts).items():
        holders = [params for params in sections.values() if name in params]
        if not holders:
            nodes = SPECS[name].nodes
            node = TRAINER_NODE_NAME if TRAINER in nodes else QUERY_NODE_NAME
            key = "/**" if nodes == {TRAINER, QUERY} else next(
                (k for k in sections if k.rstrip("/").endswith(node)), node)
            holders = [sections.setdefault(key, data.setdefault(key, {}).setdefault("ros__parameters", {}))]
        for params in holders:
            params[name] = value
    header = "# Written by lerf_ros.tools.demo: config/lerf.yaml with the demo's values\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def node_command(params_path: Path) -> list[str]:
    return [sys.executable, "-m", "lerf_ros.compat.launcher", "--params", str(params_path)]


class NodeProcess:
    """The nodes' process: output to a log file, stopped with SIGINT, then SIGTERM, then SIGKILL."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict):
        import subprocess

        self.log_path = log_path
        self._log = open(log_path, "wb")
        # Own session: a Ctrl-C in the terminal reaches only us, and we stop the child in order.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> int | None:
        import signal
        import subprocess

        for sig, wait_s in ((signal.SIGINT, 20.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        return self.proc.poll()


def run_demo(opts: DemoOptions) -> int:
    """Run the whole demo; returns the exit status (0 when every answer is correct)."""
    import json

    loopback_env(os.environ)  # before rclpy loads: this process talks DDS too
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=False)
    from .demo_bag import DemoBagConfig, write_demo_bag

    encoder_note = (f"OpenCLIP with local weights {opts.clip_checkpoint}" if opts.clip_checkpoint else
                    "deterministic demo colour encoder (lerf_ros.core.encoders.demo), no CLIP weights; "
                    "pass --clip-checkpoint PATH for real OpenCLIP")
    print(f"[demo] output folder {out}\n[demo] encoder: {encoder_note}", flush=True)
    t0 = time.monotonic()
    bag = write_demo_bag(out / "bag", config=DemoBagConfig(frames=opts.frames, storage=opts.storage,
                                                           seed=opts.seed))
    print(f"[demo] wrote {bag.path.name}: " + ", ".join(f"{t} {n}" for t, n in bag.counts.items()),
          flush=True)
    cmd = node_command(write_params(opts, out / "demo_params.yaml"))
    print(f"[demo] starting nodes (ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, localhost only): "
          + " ".join(cmd[1:]), flush=True)
    nodes = NodeProcess(cmd, out / "nodes.log", dict(os.environ))
    try:
        from .demo_client import PlannerClient

        with PlannerClient() as planner:
            status = planner.feed_and_train(bag.path, opts, nodes, t0)
            print(f"[demo] trained: step {status['step']}, {status['keyframes']} keyframes, "
                  f"{status['frames_received']} frames received, drops {status['drops'] or 'none'} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
            map_msg = planner.save_map(out / "map")  # first: its keyframes illustrate the answers
            rows = planner.ask_all(bag, out, out / "map")
    finally:
        rc = nodes.stop()
        print(f"[demo] nodes stopped (exit status {rc})", flush=True)
    table = markdown_table(rows, encoder_note)
    (out / "results.md").write_text(f"# lerf_ros demo results\n\n{table}\n")
    summary = {"encoder": encoder_note, "steps": status["step"], "keyframes": status["keyframes"],
               "seconds": round(time.monotonic() - t0, 1), "map": map_msg, "queries": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + table + "\n")
    print(f"[demo] files in {out}:")
    files = [p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "bag"]
    for path in sorted(files):
        print(f"  {path.relative_to(out)}  ({path.stat().st_size} bytes)")
    print(f"  bag/  (rosbag2 {opts.storage}, {sum(bag.counts.values())} messages)")
    print(f"[demo] done in {time.monotonic() - t0:.0f} s; query the saved map with: "
          f"lerf-ros query {out / 'map'} \"red box\"")
    return 0 if all(r["correct"] for r in rows) else 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lerf_ros.tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default out/demo-<time>)")
    parser.add_argument("--frames", type=int, default=60, help="images in the demo bag (5 Hz)")
    parser.add_argument("--steps", type=int, default=300, help="training step budget of the trainer node")
    parser.add_argument("--rate", type=float, default=1.0, help="bag playback speed factor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--clip-checkpoint", default="", help="local OpenCLIP weights file (real CLIP)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.clip_checkpoint and not Path(args.clip_checkpoint).is_file():
        print(f"demo: error: --clip-checkpoint {args.clip_checkpoint} is not a file", file=sys.stderr)
        return 1
    out = args.out or Path("out") / time.strftime("demo-%Y%m%d-%H%M%S")
    checkpoint = str(Path(args.clip_checkpoint).resolve()) if args.clip_checkpoint else ""
    opts = DemoOptions(out, args.frames, args.steps, args.rate, args.seed, args.format, checkpoint,
                       args.timeout)
    import signal

    def on_term(signum, _frame):  # `timeout`, `kill`: unwind like Ctrl-C so the nodes are stopped
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run_demo(opts)
    except (RuntimeError, ValueError, OSError, TimeoutError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
