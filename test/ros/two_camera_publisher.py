"""Test utility (run as its own process): a robot's head and wrist cameras in the synthetic room.

    python test/ros/two_camera_publisher.py [--head-hz 4] [--wrist-hz 3] [--lap-s 6] [--laps 0]

Two cameras of different image size, aspect and field of view (``lerf_ros.sim.two_cameras``: head 96 x 72
at 75 deg, wrist 80 x 45 at 87 deg), each under its own namespace as a RealSense driver names them:
``/head_camera/color/image_raw`` (rgb8), ``/head_camera/color/camera_info`` and
``/head_camera/aligned_depth_to_color/image_raw`` (32FC1 metres), the same under ``/wrist_camera``. Each
camera moves back and forth along its path (one way per ``--lap-s``); for every image, ``map ->
<name>_color_optical_frame`` is published on /tf at the image's stamp (wall clock) before the depth, the
CameraInfo and the image, so the node gets the exact rendering pose. Prints "READY" once the publishers
exist; runs until killed (``--laps 0``) or for the given number of one-way laps.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from tf2_msgs.msg import TFMessage

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from room_publisher import camera_info_msg, image_msg, stamp_msg, transform_msg

from lerf_ros.sim import two_cameras
from lerf_ros.sim.scene import SyntheticRoom

NS = 1_000_000_000


class Camera:
    """One camera's publishers and path; ``pose(t_s)`` ping-pongs along it once per ``lap_s``."""

    def __init__(self, node: Node, name: str, intr, pose_fn, hz: float, lap_s: float, offset_s: float):
        self.name, self.intr, self.pose_fn = name, intr, pose_fn
        self.frame_id = f"{name}_color_optical_frame"
        self.period_ns, self.lap_s = round(NS / hz), lap_s
        self.next_ns = round(offset_s * NS)
        self.image = node.create_publisher(Image, f"/{name}/color/image_raw", 10)
        self.info = node.create_publisher(CameraInfo, f"/{name}/color/camera_info", 10)
        self.depth = node.create_publisher(Image, f"/{name}/aligned_depth_to_color/image_raw", 10)

    def pose(self, t_s: float) -> np.ndarray:
        phase = (t_s / self.lap_s) % 2.0
        return self.pose_fn(phase if phase <= 1.0 else 2.0 - phase)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-hz", type=float, default=4.0)
    parser.add_argument("--wrist-hz", type=float, default=3.0)
    parser.add_argument("--lap-s", type=float, default=6.0, help="seconds for one way along each path")
    parser.add_argument("--laps", type=float, default=0.0, help="0 = run until killed")
    args = parser.parse_args(argv)

    room = SyntheticRoom(0)
    rclpy.init()
    node = Node("two_camera_publisher")
    tf_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    tf_pub = node.create_publisher(TFMessage, "/tf", tf_qos)
    cams = [Camera(node, "head_camera", two_cameras.HEAD_INTRINSICS, two_cameras.head_pose, args.head_hz,
                   args.lap_s, 0.05),
            Camera(node, "wrist_camera", two_cameras.WRIST_INTRINSICS,
                   lambda s: two_cameras.wrist_pose(room, s), args.wrist_hz, args.lap_s, 0.12)]
    # One pass only: start it once the trainer has matched every camera's topics (discovery takes a while
    # on a loaded machine, and images sent before that are lost to it).
    pubs = [tf_pub, *(p for c in cams for p in (c.image, c.info))]
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and any(p.get_subscription_count() == 0 for p in pubs):
        time.sleep(0.05)
    print("READY", flush=True)
    t0 = time.time_ns()
    end_ns = t0 + round(args.laps * args.lap_s * NS) if args.laps > 0 else None
    try:
        while rclpy.ok():
            now = time.time_ns()
            if end_ns is not None and now > end_ns:
                break
            for cam in cams:
                if t0 + cam.next_ns > now:
                    continue
                stamp_ns = t0 + cam.next_ns
                T = cam.pose(cam.next_ns / NS)
                rgb, depth = room.render(T, cam.intr)
                tf_pub.publish(TFMessage(transforms=[transform_msg(T, "map", cam.frame_id, stamp_ns)]))
                stamp = stamp_msg(stamp_ns)
                cam.depth.publish(image_msg(depth.astype("<f4"), "32FC1", cam.frame_id, stamp))
                cam.info.publish(camera_info_msg(cam.intr, cam.frame_id, stamp))
                cam.image.publish(image_msg(rgb, "rgb8", cam.frame_id, stamp))
                cam.next_ns += cam.period_ns
            wake = t0 + min(c.next_ns for c in cams)
            time.sleep(max(0.0, (wake - time.time_ns()) / NS))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
