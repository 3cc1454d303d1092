"""Fixtures shared by the node-level ROS tests."""

import pytest
import rclpy


@pytest.fixture
def ros():
    """rclpy initialised for one test; nodes appended to the yielded list are shut down (``shutdown()``
    where they have one) and destroyed afterwards, then rclpy is shut down."""
    rclpy.init()
    nodes = []
    try:
        yield nodes
    finally:
        for node in nodes:
            getattr(node, "shutdown", lambda: None)()
            node.destroy_node()
        rclpy.try_shutdown()
