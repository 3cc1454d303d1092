"""Test utility (run as its own process): play the synthetic room as a robot's camera + TF.

    python test/ros/room_publisher.py [--image-hz 4] [--tf-hz 15] [--tf-samples 60] [--laps 0]

Publishes, with stamps from the wall clock:
- /tf_static (transient local): base_link -> camera_link -> camera_color_optical_frame (``camera_rig()``);
- /tf at ``--tf-hz``: map -> odom (localisation drift) and odom -> base_link, one sample per tick from
  ``robot_path(orbit_trajectory(room, tf_samples))``; a lap of the orbit takes tf_samples / tf_hz seconds;
- /camera/color/image_raw (rgb8) + /camera/color/camera_info at ``--image-hz`` with stamps NOT on TF
  samples (the rates differ and images start a third of a TF period late). Each image is rendered at the
  pose TF gives at its stamp when each link is interpolated (lerp + slerp) between its two bracketing
  samples, as tf2 does; so a node that interpolates correctly gets exactly the rendering pose.

TF samples are published when their stamp is reached, so an image usually arrives before the TF that
brackets it: the node has to wait for TF (``tf_timeout_s``), as on a robot. Prints "READY" once the
publishers exist. Runs until killed (``--laps 0``) or for the given number of laps.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from geometry_msgs.msg import TransformStamped
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from tf2_msgs.msg import TFMessage

from lerf_ros.core.frames.transforms import make_transform, matrix_to_quat, quat_to_matrix, slerp
from lerf_ros.sim.scene import SyntheticRoom, camera_rig, default_intrinsics, orbit_trajectory, robot_path

NS = 1_000_000_000


def stamp_msg(stamp_ns: int) -> Time:
    sec, nanosec = divmod(int(stamp_ns), NS)
    return Time(sec=sec, nanosec=nanosec)


def transform_msg(T: np.ndarray, parent: str, child: str, stamp_ns: int) -> TransformStamped:
    msg = TransformStamped()
    msg.header.frame_id, msg.child_frame_id = parent, child
    msg.header.stamp = stamp_msg(stamp_ns)
    t, q = T[:3, 3], matrix_to_quat(T[:3, :3])
    tr = msg.transform.translation
    tr.x, tr.y, tr.z = (float(v) for v in t)
    r = msg.transform.rotation
    r.x, r.y, r.z, r.w = (float(v) for v in q)
    return msg


def interpolate(T0: np.ndarray, T1: np.ndarray, ratio: float) -> np.ndarray:
    """tf2's per-link interpolation: lerp translation, slerp rotation."""
    q = slerp(matrix_to_quat(T0[:3, :3]), matrix_to_quat(T1[:3, :3]), ratio)
    return make_transform(quat_to_matrix(q), (1 - ratio) * T0[:3, 3] + ratio * T1[:3, 3])


def camera_info_msg(intr, frame_id: str, stamp) -> CameraInfo:
    msg = CameraInfo()
    msg.header.frame_id, msg.header.stamp = frame_id, stamp
    msg.width, msg.height = intr.width, intr.height
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = [intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [intr.fx, 0.0, intr.cx, 0.0, 0.0, intr.fy, intr.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


class RoomPlayer:
    """The timeline: TF samples at ``tf_hz``, images between them; everything a pure function of time."""

    def __init__(self, tf_samples: int, tf_hz: float, width: int, height: int, seed: int = 0):
        self.room = SyntheticRoom(seed)
        self.intr = default_intrinsics(width, height)
        self.rig = camera_rig()
        self.path = robot_path(orbit_trajectory(self.room, tf_samples, seed=seed), self.rig)
        self.n = tf_samples
        self.dt_ns = round(NS / tf_hz)

    def links_at(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(T_map_odom, T_odom_base) of TF sample j (the orbit repeats every n samples)."""
        return self.path.T_map_odom[j % self.n], self.path.T_odom_base[j % self.n]

    def camera_pose(self, t_rel_ns: int) -> np.ndarray:
        """T_map_optical at ``t_rel_ns`` after the first TF sample, as interpolated TF gives it."""
        j, rem = divmod(int(t_rel_ns), self.dt_ns)
        ratio = rem / self.dt_ns
        (mo0, ob0), (mo1, ob1) = self.links_at(j), self.links_at(j + 1)
        return interpolate(mo0, mo1, ratio) @ interpolate(ob0, ob1, ratio) @ self.rig.T_base_optical


def image_msg(array: np.ndarray, encoding: str, frame_id: str, stamp) -> Image:
    """sensor_msgs/Image of ``array`` (H, W[, C]) with that encoding, frame and stamp."""
    h, w = array.shape[:2]
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=array.strides[0],
                data=np.ascontiguousarray(array).tobytes())
    msg.header.frame_id, msg.header.stamp = frame_id, stamp
    return msg


def rig_publishers(node, rig, t0_ns: int):
    """/tf, camera image and CameraInfo publishers on ``node`` (reliable: they reach best-effort sensor-data
    subscribers too), after the rig's static transforms went out on a latched /tf_static."""
    latched = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                         reliability=ReliabilityPolicy.RELIABLE)
    tf_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    tf_pub = node.create_publisher(TFMessage, "/tf", tf_qos)
    static_pub = node.create_publisher(TFMessage, "/tf_static", latched)
    image_pub = node.create_publisher(Image, "/camera/color/image_raw", 10)
    info_pub = node.create_publisher(CameraInfo, "/camera/color/camera_info", 10)
    static_pub.publish(TFMessage(transforms=[
        transform_msg(rig.T_base_link, rig.base_frame, rig.link_frame, t0_ns),
        transform_msg(rig.T_link_optical, rig.link_frame, rig.optical_frame, t0_ns),
    ]))
    return tf_pub, image_pub, info_pub


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-hz", type=float, default=4.0)
    parser.add_argument("--tf-hz", type=float, default=15.0)
    parser.add_argument("--tf-samples", type=int, default=60, help="TF samples per lap of the orbit")
    parser.add_argument("--laps", type=float, default=0.0, help="0 = run until killed")
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--height", type=int, default=72)
    args = parser.parse_args(argv)

    player = RoomPlayer(args.tf_samples, args.tf_hz, args.width, args.height)
    rclpy.init()
    node = Node("room_publisher")
    rig = player.rig
    t0 = time.time_ns()
    tf_pub, image_pub, info_pub = rig_publishers(node, rig, t0)
    print("READY", flush=True)

    image_dt_ns = round(NS / args.image_hz)
    image_offset_ns = player.dt_ns // 3  # images never fall on a TF sample stamp at start
    end_ns = t0 + int(args.laps * player.n * player.dt_ns) if args.laps > 0 else None
    next_tf, next_image = 0, 0
    try:
        while rclpy.ok():
            now = time.time_ns()
            if end_ns is not None and now > end_ns:
                break
            while t0 + next_tf * player.dt_ns <= now:
                stamp = t0 + next_tf * player.dt_ns
                T_map_odom, T_odom_base = player.links_at(next_tf)
                tf_pub.publish(TFMessage(transforms=[
                    transform_msg(T_map_odom, "map", "odom", stamp),
                    transform_msg(T_odom_base, "odom", rig.base_frame, stamp),
                ]))
                next_tf += 1
            t_img = image_offset_ns + next_image * image_dt_ns
            if t0 + t_img <= now:
                rgb, _depth = player.room.render(player.camera_pose(t_img), player.intr)
                msg = image_msg(rgb, "rgb8", rig.optical_frame, stamp_msg(t0 + t_img))
                info_pub.publish(camera_info_msg(player.intr, rig.optical_frame, msg.header.stamp))
                image_pub.publish(msg)
                next_image += 1
            wake = min(t0 + next_tf * player.dt_ns, t0 + image_offset_ns + next_image * image_dt_ns)
            time.sleep(max(0.0, (wake - time.time_ns()) / NS))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
