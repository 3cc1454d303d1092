"""The nav2-style launch arguments over real DDS (loopback only): ``lerf_node`` started by the launcher
with ``namespace:=simtime use_sim_time:=true``, no camera; this process publishes ``/clock`` from 1000 s.

Status and answer stamps must follow ``/clock`` (not wall time), the camera topics must sit inside the
namespace (relative names), and TF must stay on the absolute /tf and /tf_static."""

import pathlib
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from lerf_ros.srv import Query
from ros_harness import Client, launcher

NAMESPACE = "simtime"
SIM_START_S = 1000.0
#: Sim time runs at wall rate from SIM_START_S; every stamp the test sees is within this of it.
WINDOW_S = 600.0


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    import rclpy
    from rosgraph_msgs.msg import Clock

    from lerf_ros.ros.messages import stamp_from_ns

    rclpy.init()
    node = launcher(tmp_path_factory.mktemp("sim_time") / "lerf_node.log", "device:=cpu",
                    "status_rate_hz:=5.0", arguments=(f"namespace:={NAMESPACE}", "use_sim_time:=true"))
    client = Client("sim_time_client", namespace=NAMESPACE)
    clock_pub = client.node.create_publisher(Clock, "/clock", 10)
    start = time.monotonic()

    def tick():  # a bag played with --clock: sim time advancing from SIM_START_S
        sim_ns = int((SIM_START_S + time.monotonic() - start) * 1e9)
        clock_pub.publish(Clock(clock=stamp_from_ns(sim_ns)))

    client.node.create_timer(0.05, tick)  # the client's own clock is wall time
    try:
        yield {"client": client, "node": node}
    finally:
        client.close()
        code = node.stop()
        rclpy.try_shutdown()
        assert code == 0, node.log()


def test_status_stamps_follow_the_clock_topic(session):
    client, node = session["client"], session["node"]
    status = client.wait_status(lambda s: _seconds(s.header.stamp) >= SIM_START_S, 120.0,
                                "a TrainingStatus stamped in sim time", node)
    assert SIM_START_S <= _seconds(status.header.stamp) < SIM_START_S + WINDOW_S
    assert status.header.frame_id == "map"
    later = client.wait_status(lambda s: _seconds(s.header.stamp) > _seconds(status.header.stamp), 30.0,
                               "a later status", node)
    assert _seconds(later.header.stamp) < SIM_START_S + WINDOW_S  # still sim time, not wall time


def test_query_reply_stamps_follow_the_clock_topic(session):
    client, node = session["client"], session["node"]
    client.wait_status(lambda s: _seconds(s.header.stamp) >= SIM_START_S, 120.0, "sim time", node)
    reply = client.query("red box", child=node)
    assert reply.result == Query.Response.RESULT_NOT_READY, reply.message  # no camera: no model
    for header in (reply.location.header, reply.cloud.header):
        assert SIM_START_S <= _seconds(header.stamp) < SIM_START_S + WINDOW_S
        assert header.frame_id == "map"


def test_camera_topics_are_in_the_namespace_and_tf_is_absolute(session):
    client, node = session["client"], session["node"]
    graph = client.node
    inside = [f"/{NAMESPACE}/camera/color/image_raw", f"/{NAMESPACE}/camera/color/camera_info"]
    client.wait_for(lambda: all(graph.count_subscribers(t) >= 1 for t in [*inside, "/tf", "/tf_static"]),
                    30.0, "the node's camera and TF subscriptions", node)
    assert graph.count_subscribers("/camera/color/image_raw") == 0
    assert graph.count_subscribers(f"/{NAMESPACE}/tf") == 0
