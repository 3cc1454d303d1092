"""Bag playback into DDS: messages arrive as rclpy types, timeline honoured, /tf_static latched."""

import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from lerf_ros.tools.bag_player import BagPlayer, PlayConfig  # noqa: E402
from lerf_ros.tools.demo_bag import DEMO_TOPICS, DemoBagConfig, write_demo_bag  # noqa: E402


def test_play_demo_bag_to_subscribers(tmp_path):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from tf2_msgs.msg import TFMessage

    bag = write_demo_bag(tmp_path / "bag", config=DemoBagConfig(frames=6, with_depth=False))
    rclpy.init()
    try:
        node = rclpy.create_node("test_bag_player_sub")
        images, tf = [], []
        node.create_subscription(Image, DEMO_TOPICS["image"], lambda m: images.append((time.monotonic(), m)),
                                 qos_profile_sensor_data)
        node.create_subscription(TFMessage, DEMO_TOPICS["tf"], tf.append, QoSProfile(depth=100))
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        player_node = rclpy.create_node("test_bag_player_pub")
        player = BagPlayer(player_node, bag.path, PlayConfig(rate=2.0, wait_for=(DEMO_TOPICS["image"],)))
        t0 = time.monotonic()
        counts = player.play()
        wall = time.monotonic() - t0
        assert counts[DEMO_TOPICS["image"]] == 6 and counts[DEMO_TOPICS["tf_static"]] == 1
        # 6 images at 5 Hz span ~1.0 s of bag time (plus TF margins): ~0.7 s at rate 2.
        assert 0.4 < wall < 3.0
        deadline = time.monotonic() + 5.0
        while (len(images) < 6 or len(tf) < counts[DEMO_TOPICS["tf"]]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(images) == 6
        first = images[0][1]
        rgb, _ = bag.room.render(bag.T_world_cam[0], bag.intrinsics)
        got = np.frombuffer(bytes(first.data), np.uint8).reshape(first.height, first.width, 3)
        np.testing.assert_array_equal(got, rgb)
        assert first.header.stamp.sec * 10**9 + first.header.stamp.nanosec == int(bag.stamps_ns[0])
        # Images arrive paced, not in a burst: ~0.1 s apart at rate 2.
        gaps = np.diff([t for t, _ in images])
        assert np.median(gaps) > 0.05

        # A subscriber that joins after playback still gets the static tree (transient local).
        late = []
        node.create_subscription(TFMessage, DEMO_TOPICS["tf_static"], late.append,
                                 QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                            reliability=ReliabilityPolicy.RELIABLE))
        deadline = time.monotonic() + 5.0
        while not late and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [t.child_frame_id for t in late[0].transforms] == ["camera_link", "camera_color_optical_frame"]
        executor.shutdown()
        player.destroy()
    finally:
        rclpy.try_shutdown()
