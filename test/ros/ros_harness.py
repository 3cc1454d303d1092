"""Test helpers for the process-level ROS tests: start / stop child processes, and a client node.

Every child inherits the loopback-only DDS settings and the random ROS_DOMAIN_ID that test/conftest.py
puts in os.environ. Waiting is always polling with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "lerf.yaml"
ROOM_PUBLISHER = pathlib.Path(__file__).with_name("room_publisher.py")


class Child:
    """A child process whose output goes to a log file (shown when a test fails)."""

    def __init__(self, args: list[str], log_path: pathlib.Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_bytes()[-tail:].decode(errors="replace")

    def rss_mb(self) -> float:
        """Resident memory of the child, MiB (Linux /proc)."""
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("VmRSS not found")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT (clean rclpy shutdown), then SIGKILL after ``timeout``; returns the exit status."""
        if self.alive:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


#: What every launcher-based test sets first: the tiny preset (demo colour encoders, CPU-sized fields).
#: config/lerf.yaml ships the robot's `default` preset, which needs OpenCLIP and DINO weights; a test's own
#: "preset:=..." comes later and wins. It also ships the robot's journal (~/.ros/lerf_journal): off here, or
#: every test's node would resume the previous test's recording; a test that wants one sets journal_dir.
TEST_SETS = ("preset:=tiny", "journal_dir:=")


def launcher(log_path, *sets: str, mode: str = "both", namespace: str = "", arguments=()) -> Child:
    """The nodes' process via the launcher; ``arguments``: launch arguments (``"use_sim_time:=true"``)."""
    args = ["-m", "lerf_ros.compat.launcher", *arguments, "--params", str(CONFIG), "--mode", mode]
    if namespace:
        args += ["--namespace", namespace]
    for item in (*TEST_SETS, *sets):
        args += ["--set", item]
    return Child(args, log_path)


class Client:
    """An rclpy node in the test process: status subscriber, service calls with timeouts."""

    def __init__(self, name: str, namespace: str = ""):
        from lerf_ros.msg import TrainingStatus

        self.node = Node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.prefix = f"/{namespace.strip('/')}" if namespace else ""
        self.statuses: list = []
        self.node.create_subscription(TrainingStatus, f"{self.prefix}/lerf/status", self.statuses.append, 10)
        self._clients: dict = {}

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.1, max(end - time.monotonic(), 0.0)))

    def wait_for(self, predicate, timeout: float, what: str, child: Child | None = None):
        """Spin until ``predicate()`` returns a truthy value; fail with ``what`` (and the child's log)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            if child is not None and not child.alive:
                raise AssertionError(f"{what}: child exited with {child.proc.returncode}\n{child.log()}")
            self.executor.spin_once(timeout_sec=0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                             + (f"\n{child.log()}" if child is not None else ""))

    def status(self, timeout: float = 30.0, child: Child | None = None):
        """The next status message to arrive."""
        count = len(self.statuses)
        return self.wait_for(lambda: self.statuses[-1] if len(self.statuses) > count else None,
                             timeout, "a TrainingStatus message", child)

    def wait_status(self, predicate, timeout: float, what: str, child: Child | None = None):
        return self.wait_for(lambda: self.statuses and predicate(self.statuses[-1]) and self.statuses[-1],
                             timeout, what, child)

    def call(self, srv_type, name: str, request, timeout: float = 60.0, child: Child | None = None):
        key = (srv_type, name)
        if key not in self._clients:
            self._clients[key] = self.node.create_client(srv_type, self.prefix + name)
        client = self._clients[key]
        self.wait_for(lambda: client.service_is_ready(), 30.0, f"service {self.prefix + name}", child)
        future = client.call_async(request)
        return self.wait_for(lambda: future.result() if future.done() else None, timeout,
                             f"reply from {self.prefix + name}", child)

    def query(self, text: str, threshold: float = 0.0, with_cloud: bool = True, negatives=(),
              max_results: int = 1, timeout: float = 180.0, child: Child | None = None):
        from lerf_ros.srv import Query

        request = Query.Request(text=text, threshold=float(threshold), with_cloud=with_cloud,
                                negatives=list(negatives), max_results=int(max_results))
        return self.call(Query, "/lerf/query", request, timeout, child)

    def after_call_status(self, call, within: float = 3.0, child: Child | None = None):
        """``call()``'s result and the TrainingStatus the node published while answering it.

        The node publishes a status before it sends a service reply, so its stamp lies between the call's
        start and the reply; a periodic status lands in that window only by chance (the shorter the call,
        the rarer). Waits up to ``within`` s after the reply for the message to arrive.
        """
        count = len(self.statuses)
        start_ns = time.time_ns()
        result = call()
        end_ns = time.time_ns()

        def published_during_call():
            for status in self.statuses[count:]:
                stamp_ns = status.header.stamp.sec * 1_000_000_000 + status.header.stamp.nanosec
                if start_ns <= stamp_ns <= end_ns:
                    return status
            return None

        status = self.wait_for(published_during_call, within, "a TrainingStatus published during the call",
                               child)
        return result, status

    def close(self) -> None:
        self.executor.remove_node(self.node)
        self.node.destroy_node()


def drops(status) -> dict[str, int]:
    return dict(zip(status.drop_reasons, status.drop_counts, strict=True))


def build_views_map(room, path: pathlib.Path, keyframes: int) -> int:
    """``keyframes`` orbit keyframes of ``room`` (with depth) and their features, no training step, saved as
    a map at ``path`` (queries answer from the keyframe views). Returns the keyframes stored."""
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset
    from lerf_ros.sim.scene import default_intrinsics, make_frames, orbit_trajectory

    engine = LERFEngine(make_preset("tiny"), "cpu")
    for frame in make_frames(room, orbit_trajectory(room, keyframes), default_intrinsics()):
        assert engine.add_frame(frame).keyframe
    while engine.status().keyframes_pending:
        engine.step(0)  # features only
    engine.save(path)
    return engine.status().keyframes

