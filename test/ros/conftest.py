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


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """The nodes set torch's intra-op threads for the whole process (`torch_threads`): each test gets back
    the count it started with, so a query node's 'all cores' does not carry into later tests."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
