"""Reliability under load (issue 10): real ``lerf_node`` processes over loopback DDS, four scenarios.

    source scripts/ros_env.sh; .venv/bin/python bench/reliability.py [--flood-s 20] [--storm-s 20] [--kills 4]

- flood: a camera at 1280x720 @ 30 Hz, then 1920x1080 @ 60 Hz (bgr8, TF at the image rate), while one client
  asks a query every 0.5 s; then SIGINT. Images are a few pre-rendered views of the demo room, upscaled, so
  the publisher can keep the rate; the node has ``max_image_side:=160`` (the tiny preset keeps full-size
  keyframes otherwise; lite / default downsize to 480 / 640).
- storm: the demo rates (96x72 @ 5 Hz) while two clients ask queries back to back.
- bag loop: the demo bag (20 images) played twice with its original stamps; images accepted after the jump.
- kill loop: SIGINT at a random moment (a query in flight) while recording; seconds to exit, exit status.

Figures: query p50 / p95 (s), seconds from SIGINT to exit, images lost in DDS (publisher sequence gaps, as
the node reports them in /diagnostics), dropped by ingest (TrainingStatus), skipped before conversion, and
the longest engine-lock hold and wait (/diagnostics). Prints one table, writes bench/out/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test" / "ros"))

NS = 1_000_000_000
QUERY = "red box"


# ---------------------------------------------------------------------------------------------- publisher
def flood_publisher(width: int, height: int, hz: float, seconds: float) -> int:
    """(Child process) the room at ``width`` x ``height`` bgr8, ``hz``, TF with each image's stamp."""
    import numpy as np
    import rclpy
    from room_publisher import RoomPlayer, camera_info_msg, rig_publishers, stamp_msg, transform_msg
    from sensor_msgs.msg import Image
    from tf2_msgs.msg import TFMessage

    from lerf_ros.core.frames.camera import CameraIntrinsics

    scale, views = 8, 24
    player = RoomPlayer(views, 1.0, width // scale, height // scale)
    small = player.intr
    intr = CameraIntrinsics(width, height, small.fx * scale, small.fy * scale, (small.cx + 0.5) * scale - 0.5,
                            (small.cy + 0.5) * scale - 0.5)
    frames = []
    for k in range(views):  # view k at TF sample k: the camera pose of image k is exact
        rgb, _ = player.room.render(player.camera_pose(k * player.dt_ns), small)
        big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)[..., ::-1]  # bgr8
        frames.append(np.ascontiguousarray(big).tobytes())
    rclpy.init()
    node = rclpy.create_node("flood_publisher")
    rig = player.rig
    t0 = time.time_ns()
    tf_pub, image_pub, info_pub = rig_publishers(node, rig, t0)
    print("READY", flush=True)
    period_ns, sent, end = round(NS / hz), 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            stamp = time.time_ns()
            k = sent % views
            T_map_odom, T_odom_base = player.links_at(k)
            tf_pub.publish(TFMessage(transforms=[transform_msg(T_map_odom, "map", "odom", stamp),
                                                 transform_msg(T_odom_base, "odom", rig.base_frame, stamp)]))
            msg = Image(height=height, width=width, encoding="bgr8", is_bigendian=0, step=3 * width,
                        data=frames[k])
            msg.header.frame_id, msg.header.stamp = rig.optical_frame, stamp_msg(stamp)
            info_pub.publish(camera_info_msg(intr, rig.optical_frame, msg.header.stamp))
            image_pub.publish(msg)
            sent += 1
            time.sleep(max(0.0, (stamp + period_ns - time.time_ns()) / NS))
    except KeyboardInterrupt:
        pass
    print(f"PUBLISHED {sent} in {seconds:.1f} s", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


# ---------------------------------------------------------------------------------------------- helpers
def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


class Diagnostics:
    """The latest /diagnostics key/values per status name."""

    def __init__(self, node):
        from diagnostic_msgs.msg import DiagnosticArray

        self.latest: dict[str, dict[str, str]] = {}
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on, 10)

    def _on(self, msg):
        for status in msg.status:
            self.latest[status.name] = {kv.key: kv.value for kv in status.values}

    def value(self, suffix: str, key: str, default="n/a"):
        for name, values in self.latest.items():
            if name.endswith(suffix) and key in values:
                return values[key]
        return default


def _stop(child, timeout=30.0) -> tuple[float, int]:
    """SIGINT; (seconds until the process ended, exit status)."""
    start = time.monotonic()
    child.proc.send_signal(signal.SIGINT)
    try:
        child.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait(5)
    child._log.close()
    return time.monotonic() - start, child.proc.returncode


def _timed_query(client, child, latencies: list, failures: list) -> None:
    """One query: its latency, or its failure (first 200 characters)."""
    start = time.monotonic()
    try:
        client.query(QUERY, with_cloud=False, timeout=60.0, child=child)
        latencies.append(time.monotonic() - start)
    except AssertionError as exc:
        failures.append(str(exc)[:200])


def _query_loop(client, child, stop: threading.Event, latencies: list, failures: list, pause_s: float):
    while not stop.is_set():
        _timed_query(client, child, latencies, failures)
        stop.wait(pause_s)


def _ingest_figures(status, diag: Diagnostics) -> dict:
    drops = dict(zip(status.drop_reasons, status.drop_counts, strict=True))
    skipped = dict(zip(status.not_keyframe_reasons, status.not_keyframe_counts, strict=True))
    return {"received": int(status.frames_received), "dropped": int(status.frames_dropped), "drops": drops,
            "skipped_before_conversion": int(skipped.get("skipped_rate", 0)
                                             + skipped.get("skipped_static", 0)),
            "lost_in_dds": diag.value("camera input", "images lost in DDS (sequence gaps)"),
            "missing_by_stamps": diag.value("camera input", "images missing by header stamps"),
            "max_lock_hold_s": diag.value("training", "longest engine-lock hold, training (s)"),
            "max_lock_hold_urgent_s": diag.value("training",
                                                 "longest engine-lock hold, queries/frames/status (s)"),
            "max_lock_hold_at": diag.value("training", "longest engine-lock hold, training, taken in"),
            "max_lock_hold_urgent_at": diag.value(
                "training", "longest engine-lock hold, queries/frames/status, taken in"),
            "max_lock_wait_s": diag.value("training", "longest wait for the engine lock (s)"),
            "step": int(status.step), "keyframes": int(status.keyframes)}


def _start_node(logs: Path, name: str, *sets: str):
    from ros_harness import Client, launcher

    node = launcher(logs / f"{name}.log", "device:=cpu", "status_rate_hz:=2.0", *sets)
    client = Client(f"bench_{name}")
    diag = Diagnostics(client.node)
    client.wait_for(lambda: client.statuses, 60.0, "the node's first status", node)
    return node, client, diag


# ---------------------------------------------------------------------------------------------- scenarios
def flood(logs: Path, width: int, height: int, hz: float, seconds: float) -> dict:
    from ros_harness import Child

    node, client, diag = _start_node(logs, f"flood_{width}x{height}", "max_image_side:=160")
    pub = Child([str(Path(__file__).resolve()), "--flood-publisher", str(width), str(height), str(hz),
                 str(seconds)], logs / f"publisher_{width}x{height}.log")
    latencies, failures, stop = [], [], threading.Event()
    try:
        client.wait_for(lambda: "READY" in pub.log(), 120.0, "the publisher")
        end = time.monotonic() + seconds
        while time.monotonic() < end and pub.alive:
            _timed_query(client, node, latencies, failures)
            client.spin_for(0.5)
        pub.proc.wait(60)
        client.spin_for(2.5)  # the last status and /diagnostics
        status = client.status(child=node)
        figures = _ingest_figures(status, diag)
    finally:
        stop.set()
        client.close()
        stop_s, code = _stop(node)
        if pub.alive:
            pub.stop()
    published = next((int(w.split()[1]) for w in pub.log().splitlines() if w.startswith("PUBLISHED")), -1)
    return {"scenario": f"flood {width}x{height} @ {hz:g} Hz, {seconds:g} s", "published": published,
            "queries": len(latencies), "query_failures": len(failures), "query_p50_s": _pct(latencies, 0.5),
            "query_p95_s": _pct(latencies, 0.95), "sigint_stop_s": stop_s, "exit": code, **figures}


def storm(logs: Path, seconds: float) -> dict:
    from ros_harness import ROOM_PUBLISHER, Child, Client

    node, client, diag = _start_node(logs, "storm")
    pub = Child([str(ROOM_PUBLISHER), "--image-hz", "5"], logs / "storm_publisher.log")
    latencies, failures, stop = [], [], threading.Event()
    try:
        client.wait_status(lambda s: s.step > 0, 120.0, "training to start", node)
        before = client.status(child=node)
        other = Client("bench_storm_2")
        threads = [threading.Thread(target=_query_loop, args=(c, node, stop, latencies, failures, 0.0))
                   for c in (other,)]
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # this thread is the second client
            start = time.monotonic()
            try:
                client.query(QUERY, with_cloud=False, timeout=60.0, child=node)
                latencies.append(time.monotonic() - start)
            except AssertionError as exc:
                failures.append(str(exc)[:200])
        stop.set()
        for t in threads:
            t.join(70)
        other.close()
        client.spin_for(2.5)
        after = client.status(child=node)
        figures = _ingest_figures(after, diag)
        window = {"received_in_storm": after.frames_received - before.frames_received,
                  "dropped_in_storm": after.frames_dropped - before.frames_dropped,
                  "steps_in_storm": after.step - before.step}
    finally:
        stop.set()
        pub.stop()
        client.close()
        stop_s, code = _stop(node)
    return {"scenario": f"query storm, 2 clients, {seconds:g} s, camera 96x72 @ 5 Hz", "published": -1,
            "queries": len(latencies), "query_failures": len(failures), "query_p50_s": _pct(latencies, 0.5),
            "query_p95_s": _pct(latencies, 0.95), "sigint_stop_s": stop_s, "exit": code, **figures, **window}


def bag_loop(logs: Path, frames: int = 20) -> dict:
    from lerf_ros.tools.bag_player import BagPlayer, PlayConfig
    from lerf_ros.tools.demo_bag import DemoBagConfig, write_demo_bag

    bag = write_demo_bag(logs / "bag", config=DemoBagConfig(frames=frames, with_depth=False))
    node, client, diag = _start_node(logs, "bag_loop", "max_steps:=1")
    try:
        player = BagPlayer(client.node, bag.path, PlayConfig(wait_for=("/camera/color/image_raw",),
                                                               wait_timeout_s=60.0))
        player.play()
        client.spin_for(3.0)
        first = client.status(child=node)
        player.play()
        client.spin_for(3.0)
        second = client.status(child=node)
        figures = _ingest_figures(second, diag)
    finally:
        client.close()
        stop_s, code = _stop(node)
    received = second.frames_received - first.frames_received
    accepted = received - (second.frames_dropped - first.frames_dropped)
    return {"scenario": f"bag loop, {frames} images played twice", "published": 2 * frames, "queries": 0,
            "query_failures": 0, "query_p50_s": float("nan"), "query_p95_s": float("nan"),
            "sigint_stop_s": stop_s, "exit": code, **figures,
            "accepted_after_jump": accepted, "accepted_after_jump_pct": 100.0 * accepted / frames}


def kill_loop(logs: Path, kills: int, seed: int = 0) -> dict:
    from ros_harness import ROOM_PUBLISHER, Child

    rng = random.Random(seed)
    pub = Child([str(ROOM_PUBLISHER), "--image-hz", "5"], logs / "kill_publisher.log")
    stops, codes = [], []
    try:
        for k in range(kills):
            node, client, _ = _start_node(logs, f"kill_{k}")
            try:
                client.wait_status(lambda s: s.keyframes >= 3, 60.0, "keyframes", node)
                client.spin_for(rng.uniform(0.0, 4.0))
                from lerf_ros.srv import Query

                key = (Query, "/lerf/query")  # a query in flight when the signal comes
                cli = client._clients.get(key) or client.node.create_client(Query, "/lerf/query")
                client._clients[key] = cli
                cli.wait_for_service(10.0)
                cli.call_async(Query.Request(text=QUERY, max_results=1))
                client.spin_for(rng.uniform(0.0, 0.3))
            finally:
                client.close()
                stop_s, code = _stop(node)
            stops.append(stop_s)
            codes.append(code)
    finally:
        pub.stop()
    return {"scenario": f"kill loop: SIGINT x{kills}, query in flight", "published": -1, "queries": kills,
            "query_failures": 0, "query_p50_s": float("nan"), "query_p95_s": float("nan"),
            "sigint_stop_s": max(stops), "sigint_stop_all_s": stops, "exit": max(codes, key=abs),
            "exits": codes}


# ---------------------------------------------------------------------------------------------- main
def _fmt(v, spec=".2f"):
    if isinstance(v, float):
        return "n/a" if v != v else format(v, spec)
    return str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flood-s", type=float, default=20.0)
    p.add_argument("--logs", type=Path, default=None, help="keep the nodes' logs here (default: a temp dir)")
    p.add_argument("--storm-s", type=float, default=20.0)
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--only", nargs="*", default=["flood720", "flood1080", "storm", "bag", "kill"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reliability.json")
    p.add_argument("--flood-publisher", nargs=4, metavar=("W", "H", "HZ", "S"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flood_publisher:
        w, h, hz, s = args.flood_publisher
        return flood_publisher(int(w), int(h), float(hz), float(s))
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        print("source scripts/ros_env.sh first: DDS must stay on loopback", file=sys.stderr)
        return 2
    import tempfile

    import rclpy

    rclpy.init()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lerf_reliability_") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        runs = {"flood720": lambda: flood(logs, 1280, 720, 30.0, args.flood_s),
                "flood1080": lambda: flood(logs, 1920, 1080, 60.0, args.flood_s),
                "storm": lambda: storm(logs, args.storm_s), "bag": lambda: bag_loop(logs),
                "kill": lambda: kill_loop(logs, args.kills)}
        for name in args.only:
            start = time.monotonic()
            rows.append(runs[name]())
            rows[-1]["wall_s"] = time.monotonic() - start
            print(f"# {rows[-1]['scenario']}: done in {rows[-1]['wall_s']:.0f} s", flush=True)
    rclpy.try_shutdown()
    cols = [("scenario", "scenario"), ("published", "sent"), ("received", "recv"),
            ("lost_in_dds", "DDS lost"), ("dropped", "ingest drop"), ("skipped_before_conversion", "skipped"),
            ("queries", "queries"), ("query_p95_s", "q p95 s"), ("max_lock_hold_s", "lock hold s"),
            ("max_lock_wait_s", "lock wait s"), ("sigint_stop_s", "stop s"), ("exit", "exit")]
    print(" | ".join(h for _, h in cols))
    for row in rows:
        print(" | ".join(_fmt(row.get(k, "")) for k, _ in cols))
    for row in rows:
        if row.get("max_lock_hold_at"):
            print(f"{row['scenario']}: longest hold, training {_fmt(row.get('max_lock_hold_s', ''))} s in "
                  f"{row['max_lock_hold_at']}; urgent {_fmt(row.get('max_lock_hold_urgent_s', ''))} s in "
                  f"{row.get('max_lock_hold_urgent_at', '')}")
    for row in rows:
        if "accepted_after_jump_pct" in row:
            print(f"bag loop: {row['accepted_after_jump']} of 20 images accepted after the jump "
                  f"({row['accepted_after_jump_pct']:.0f} %)")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
