"""Play a rosbag2 into DDS with rclpy publishers, honouring its timestamps (``ros2 bag play`` stand-in).

    python -m lerf_ros.tools.bag_player BAG [--rate 1.0] [--topics /a /b] [--wait-for /camera/color/image_raw]

Messages are read with ``rosbags`` and converted to rclpy types by deserialising their CDR bytes into
the installed message classes (the bytes on the wire are the recorded ones). QoS per topic: sensor
data (best effort, depth 5) for images and CameraInfo, tf2's reliable depth-100 for /tf and
reliable transient-local for /tf_static, so late subscribers still get the static tree. The caller
owns rclpy initialisation and the node; ``main`` does both for command-line use.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .bag_io import BagError, open_reader


@dataclass(frozen=True)
class PlayConfig:
    """rate: playback speed factor (2 = twice as fast); topics: () = all; wait_for: topics that must have
    a subscriber before playback starts (polled up to wait_timeout_s seconds)."""

    rate: float = 1.0
    topics: tuple[str, ...] = ()
    wait_for: tuple[str, ...] = ()
    wait_timeout_s: float = 15.0

    def validate(self) -> PlayConfig:
        if not (self.rate > 0 and self.rate < float("inf")):
            raise ValueError(f"rate must be a positive factor, got {self.rate}")
        if not self.wait_timeout_s >= 0:
            raise ValueError(f"wait_timeout_s must be >= 0, got {self.wait_timeout_s}")
        return self


def message_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rclpy message class; BagError when the package is not installed."""
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise BagError(f"message type {msgtype} is not installed for rclpy ({exc})") from exc


def qos_for(topic: str, msgtype: str):
    from rclpy.qos import (
        DurabilityPolicy,
        HistoryPolicy,
        QoSProfile,
        ReliabilityPolicy,
        qos_profile_sensor_data,
    )

    if msgtype == "tf2_msgs/msg/TFMessage":
        return QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL if topic.endswith("tf_static")
                          else DurabilityPolicy.VOLATILE)
    if msgtype.startswith("sensor_msgs/msg/"):
        return qos_profile_sensor_data
    return QoSProfile(depth=10)


class BagPlayer:
    """Publishes one bag's messages on ``node`` in log-time order at ``rate`` times real time."""

    def __init__(self, node, bag_path, config: PlayConfig = PlayConfig()):
        self.node = node
        self.config = config.validate()
        self.path = Path(bag_path)
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        reader = open_reader(bag_path)
        try:
            present = {c.topic: c.msgtype for c in reader.connections}
        finally:
            reader.close()
        missing = [t for t in (*config.topics, *config.wait_for) if t not in present]
        if missing:
            raise BagError(f"topics {missing} not in {self.path}; present: {sorted(present)}")
        chosen = config.topics or tuple(sorted(present))
        self._classes = {t: message_class(present[t]) for t in chosen}
        self.publishers = {t: node.create_publisher(self._classes[t], t, qos_for(t, present[t]))
                           for t in chosen}

    def stop(self) -> None:
        """Ask a running ``play`` to return after the current message (any thread)."""
        self._stop.set()

    def wait_for_subscribers(self) -> bool:
        """Poll until every ``wait_for`` topic has a subscriber; False on timeout."""
        deadline = time.monotonic() + self.config.wait_timeout_s
        while True:
            if all(self.publishers[t].get_subscription_count() > 0 for t in self.config.wait_for):
                return True
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.05)

    def play(self) -> dict[str, int]:
        """Publish everything once; returns messages published per topic."""
        from rclpy.serialization import deserialize_message

        if self.config.wait_for and not self.wait_for_subscribers():
            raise BagError(f"no subscriber on {list(self.config.wait_for)} after "
                           f"{self.config.wait_timeout_s:.0f} s")
        reader = open_reader(self.path)
        try:
            conns = [c for c in reader.connections if c.topic in self.publishers]
            t_bag0 = None
            t_wall0 = time.monotonic()
            for conn, log_ns, raw in reader.messages(connections=conns):
                if self._stop.is_set():
                    break
                if t_bag0 is None:
                    t_bag0 = log_ns
                due = t_wall0 + (log_ns - t_bag0) / 1e9 / self.config.rate
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):  # pacing to the recorded timeline
                    break
                msg = deserialize_message(bytes(raw), self._classes[conn.topic])
                self.publishers[conn.topic].publish(msg)
                self.counts[conn.topic] = self.counts.get(conn.topic, 0) + 1
        finally:
            reader.close()
        return dict(self.counts)

    def destroy(self) -> None:
        for pub in self.publishers.values():
            self.node.destroy_publisher(pub)
        self.publishers.clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lerf_ros.tools.bag_player", description=__doc__.split("\n\n")[0])
    parser.add_argument("bag", type=Path)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--topics", nargs="*", default=[])
    parser.add_argument("--wait-for", nargs="*", default=[], help="topics that need a subscriber first")
    parser.add_argument("--wait-timeout", type=float, default=15.0)
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init()
    node = None
    try:
        node = rclpy.create_node("lerf_bag_player")
        player = BagPlayer(node, args.bag, PlayConfig(args.rate, tuple(args.topics), tuple(args.wait_for),
                                                      args.wait_timeout))
        counts = player.play()
        print("published " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
        return 0
    except (BagError, ValueError) as exc:
        print(f"bag_player: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        return 130
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
