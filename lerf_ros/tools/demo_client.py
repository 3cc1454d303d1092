"""The demo's ROS side: play the bag, watch ``lerf/status``, ask ``lerf/query`` like a task planner.

One rclpy node (``lerf_demo_planner``) spun by a background executor; the demo thread blocks on
futures and polls state with timeouts (never fixed sleeps for discovery).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from .bag_io import BagFrameReader, BagTopics
from .bag_player import BagPlayer, PlayConfig
from .demo_bag import DEMO_TOPICS

DEPTH_TOPIC = DEMO_TOPICS["depth"]

STATUS_TOPIC = "/lerf/status"
QUERY_SERVICE = "/lerf/query"
SAVE_SERVICE = "/lerf/save_map"
#: Targets asked for per query (Query.srv max_results): the table scores the best one, results.json lists all.
MAX_RESULTS = 3


def map_keyframes(map_dir: Path) -> list:
    """The keyframes of a saved map as picture views ([] when the map cannot be read)."""
    from ..core import checkpoint
    from ..core.frames.camera import CameraIntrinsics
    from .pictures import KeyframeView

    try:
        kf = checkpoint.load_map(map_dir).keyframes
    except (ValueError, OSError):
        return []
    views = []
    for i in range(len(kf["ids"])):
        w, h, fx, fy, cx, cy = (float(v) for v in kf["intrinsics"][i])
        depth = kf["depth_m"][i] if bool(kf["has_depth"][i]) else None
        views.append(KeyframeView(kf["images"][i], CameraIntrinsics(int(w), int(h), fx, fy, cx, cy),
                                  kf["T_world_cam"][i], depth))
    return views


class PlannerClient:
    """Context manager: rclpy init, node, executor thread; everything shut down on exit."""

    def __enter__(self) -> PlannerClient:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        from ..msg import TrainingStatus
        from ..srv import MapPath, Query

        rclpy.init()
        self.node = rclpy.create_node("lerf_demo_planner")
        self._status = None
        self._status_lock = threading.Lock()
        self.node.create_subscription(TrainingStatus, STATUS_TOPIC, self._on_status, 10)
        self.query_client = self.node.create_client(Query, QUERY_SERVICE)
        self.save_client = self.node.create_client(MapPath, SAVE_SERVICE)
        self._Query, self._MapPath = Query, MapPath
        self.executor = MultiThreadedExecutor(num_threads=2)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, name="demo-spin", daemon=True)
        self._spinner.start()
        return self

    def __exit__(self, *exc) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        rclpy.try_shutdown()
        self._spinner.join(timeout=5.0)

    def _on_status(self, msg) -> None:
        with self._status_lock:
            self._status = {
                "state": msg.state_name, "step": int(msg.step), "keyframes": int(msg.keyframes),
                "pending": int(msg.keyframes_pending), "frames_received": int(msg.frames_received),
                "drops": dict(zip(msg.drop_reasons, (int(c) for c in msg.drop_counts), strict=True)),
                "last_error": msg.last_error,
            }

    def status(self) -> dict | None:
        with self._status_lock:
            return None if self._status is None else dict(self._status)

    def _call(self, client, request, timeout_s: float):
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout_s):
            client.remove_pending_request(future)
            raise TimeoutError(f"no answer from {client.srv_name} within {timeout_s:.0f} s")
        return future.result()

    def feed_and_train(self, bag_path: Path, opts, nodes, t0: float) -> dict:
        """Play the bag into the trainer, then wait for 'ready' with all features computed."""
        deadline = t0 + opts.timeout_s

        def check_nodes():
            if not nodes.alive():
                raise RuntimeError(f"the nodes exited (status {nodes.proc.returncode}); log tail:\n"
                                   f"{nodes.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo timed out after {opts.timeout_s:.0f} s; last status "
                                   f"{self.status()}; node log tail:\n{nodes.log_tail()}")

        # The trainer subscribes to the camera once its parameters are validated and the engine is up.
        player = BagPlayer(self.node, bag_path, PlayConfig(rate=opts.rate, wait_for=(DEMO_TOPICS["image"],),
                                                           wait_timeout_s=1.0))
        while not player.wait_for_subscribers():
            check_nodes()
        print("[demo] trainer subscribed; playing the bag", flush=True)
        counts = player.play()
        print("[demo] played " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())), flush=True)
        last_print = 0.0
        while True:
            check_nodes()
            st = self.status()
            if st is not None and st["last_error"] and st["state"] == "error":
                raise RuntimeError(f"training failed: {st['last_error']}")
            if st is not None and st["state"] == "ready" and st["pending"] == 0:
                # The player's publishers stay until the node goes (`__exit__`, after the executor stops):
                # destroying them while the spin thread waits on them killed that thread (rclpy
                # InvalidHandle in add_to_wait_set), and every later service call timed out (CI).
                return st
            if st is not None and time.monotonic() - last_print > 10.0:
                last_print = time.monotonic()
                print(f"[demo] {st['state']}: step {st['step']}/{opts.steps}, keyframes {st['keyframes']} "
                      f"({st['pending']} pending)", flush=True)
            time.sleep(0.2)  # status arrives at 2 Hz; this only bounds the polling

    def query(self, text: str, negatives=(), max_results: int = MAX_RESULTS, timeout_s: float = 120.0):
        if not self.query_client.wait_for_service(timeout_sec=30.0):
            raise TimeoutError(f"service {QUERY_SERVICE} not available")
        req = self._Query.Request()
        req.text = text
        req.negatives = list(negatives)
        req.threshold = 0.0  # the query node's threshold parameter
        req.with_cloud = True
        req.max_results = max_results
        return self._call(self.query_client, req, timeout_s)

    def save_map(self, path: Path) -> str:
        if not self.save_client.wait_for_service(timeout_sec=10.0):
            return f"not saved: {SAVE_SERVICE} not available"
        req = self._MapPath.Request()
        req.path = str(path.resolve())
        res = self._call(self.save_client, req, 120.0)
        return res.message if res.success else f"not saved: {res.message}"

    def ask_all(self, bag, out: Path, map_dir: Path) -> list[dict]:
        """Query every object and the absent ones; write PLY + PNG per query; rows for the table."""
        from ..ros.messages import RESULTS, msg_to_cloud
        from .demo_report import ground_truth_rows, score
        from .pictures import KeyframeView, query_picture, save_png
        from .ply import write_ply

        views = map_keyframes(map_dir)
        if not views:  # no saved map: every third frame of the bag instead
            with BagFrameReader(bag.path, BagTopics(depth=DEPTH_TOPIC)) as reader:
                views = [KeyframeView(f.image, f.intrinsics, f.T_world_cam, f.depth_m)
                         for i, f in enumerate(reader) if i % 3 == 0]
        boxes = [(o.name, o.box_min, o.box_max) for o in bag.room.objects]
        result_names = {code: name for name, code in RESULTS.items()}
        rows = []
        for text, obj in ground_truth_rows(bag.room):
            res = self.query(text)
            result = result_names.get(res.result, f"unknown {res.result}")
            if result == "invalid_request":  # the demo's own request is wrong: a bug, not an answer
                raise RuntimeError(f"query {text!r} refused: {res.message}")
            xyz, rel, rgb = msg_to_cloud(res.cloud)
            p = res.location.point
            # Query.srv: location (= targets[0].location) is valid only when found; NaN otherwise.
            location = np.array([p.x, p.y, p.z]) if res.found else None
            slug = text.replace(" ", "_")
            frame_id = res.location.header.frame_id or "map"
            write_ply(out / f"{slug}.ply", xyz, rel, rgb, frame_id)
            title = f"{text!r}: " + ("found" if res.found else "not found") + f", rel {res.relevancy:.2f}"
            save_png(query_picture(views, xyz, rel, rgb, location if res.found else None, title, boxes),
                     out / f"{slug}.png")
            row = {"query": text, "result": result, "found": bool(res.found), "message": res.message,
                   "location": None if location is None else {"x": float(p.x), "y": float(p.y),
                                                               "z": float(p.z), "frame_id": frame_id},
                   "targets": [_target_row(t) for t in res.targets],
                   "relevancy": float(res.relevancy), "scale": float(res.scale),
                   "model_step": int(res.model_step), "cloud_points": len(xyz)}
            row.update(score(obj, bool(res.found), location))
            rows.append(row)
            print(f"[demo] query {text!r}: {result}, {len(res.targets)} target(s), relevancy "
                  f"{row['relevancy']:.3f}, correct={row['correct']}", flush=True)
        return rows


def _target_row(target) -> dict:
    """lerf_ros/msg/Target -> a JSON row (metres, the reply's frame)."""
    def xyz(v):
        return [round(float(v.x), 4), round(float(v.y), 4), round(float(v.z), 4)]

    return {"location": xyz(target.location), "box_center": xyz(target.box_center),
            "extent": xyz(target.extent), "relevancy": round(float(target.relevancy), 4),
            "confidence": round(float(target.confidence), 4), "point_count": int(target.point_count)}
