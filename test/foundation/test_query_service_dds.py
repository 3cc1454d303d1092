"""Two processes over DDS: a subprocess serves lerf_ros/srv/Query; this process calls it, decodes the cloud.

Exercises the generated interfaces end to end (typesupport, serialisation, discovery on loopback) and the
PointCloud2 layout the query node promises: fields x, y, z, relevancy, rgb (float32; rgb = 0x00RRGGBB bits).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from lerf_ros.srv import Query
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import PointField

SERVER = Path(__file__).with_name("query_service_server.py")
DISCOVERY_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 15.0

# Known answer: rows are x, y, z (metres), relevancy, r, g, b.
POINTS = [
    [1.25, -0.5, 0.75, 0.9, 255, 0, 0],
    [1.5, -0.25, 0.8, 0.7, 0, 128, 255],
    [-2.0, 3.0, 0.0, 0.55, 17, 34, 51],
]
ANSWER = {
    "points": POINTS,
    "location": [1.3, -0.4, 0.77],
    "relevancy": 0.875,
    "scale": 0.5,
    "model_step": 12345678901,  # above 2**32: checks the uint64 survives the wire
    "frame_id": "map",
}


def decode_cloud(cloud) -> dict[str, np.ndarray]:
    """PointCloud2 -> {field name: (N,) array}, reading offsets and datatypes from the message itself."""
    assert not cloud.is_bigendian
    assert cloud.height == 1
    assert cloud.row_step == cloud.point_step * cloud.width
    assert len(cloud.data) == cloud.row_step * cloud.height
    raw = np.frombuffer(bytes(cloud.data), dtype=np.uint8).reshape(cloud.width, cloud.point_step)
    out = {}
    for field in cloud.fields:
        assert field.datatype == PointField.FLOAT32 and field.count == 1, field
        out[field.name] = raw[:, field.offset:field.offset + 4].copy().view("<f4").reshape(-1)
    return out


@pytest.fixture
def query_server():
    """Start the server subprocess on a service name unique to this test; stop it afterwards."""
    service = f"/lerf_test_{os.getpid()}_{time.monotonic_ns()}/query"
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), service, json.dumps(ANSWER)],
        env=os.environ.copy(),  # ROS loopback env + domain from conftest
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield service, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def client_node():
    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("lerf_query_test_client", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def call(node, executor, client, request):
    """One request; sent again once when no reply came: a reply can be lost when the client calls right
    after discovering the service, before the server has matched the client's reply reader (a DDS
    discovery race; CI saw it once after a killed run). A server that never answers still fails."""
    for _ in range(2):
        future = client.call_async(request)
        executor.spin_until_future_complete(future, timeout_sec=CALL_TIMEOUT_S)
        if future.done():
            return future.result()
        client.remove_pending_request(future)
    pytest.fail(f"no reply within {CALL_TIMEOUT_S} s, twice")


def wait_for_service(client, proc):
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while not client.wait_for_service(timeout_sec=0.2):
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"service not discovered within {DISCOVERY_TIMEOUT_S} s")


def test_query_service_round_trip_over_dds(query_server, client_node):
    service, proc = query_server
    node, executor = client_node
    client = node.create_client(Query, service)
    wait_for_service(client, proc)

    request = Query.Request(text="red mug", negatives=["blue mug", "cup"], threshold=0.6, with_cloud=True)
    response = call(node, executor, client, request)

    echoed = json.loads(response.message)
    assert echoed["text"] == "red mug"
    assert echoed["negatives"] == ["blue mug", "cup"]
    assert echoed["threshold"] == pytest.approx(0.6, abs=1e-7)  # float32 on the wire
    assert echoed["with_cloud"] is True

    assert response.found is True
    assert response.location.header.frame_id == "map"
    assert response.location.header.stamp.sec > 0
    np.testing.assert_allclose(
        [response.location.point.x, response.location.point.y, response.location.point.z], ANSWER["location"]
    )
    assert response.relevancy == pytest.approx(0.875)
    assert response.scale == pytest.approx(0.5)
    assert response.model_step == 12345678901

    cloud = response.cloud
    assert cloud.header.frame_id == "map"
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "relevancy", "rgb"]
    assert [f.offset for f in cloud.fields] == [0, 4, 8, 12, 16]
    assert cloud.point_step == 20 and cloud.width == 3

    fields = decode_cloud(cloud)
    expected = np.asarray(POINTS, dtype=np.float64)
    np.testing.assert_array_equal(fields["x"], expected[:, 0].astype(np.float32))
    np.testing.assert_array_equal(fields["y"], expected[:, 1].astype(np.float32))
    np.testing.assert_array_equal(fields["z"], expected[:, 2].astype(np.float32))
    np.testing.assert_array_equal(fields["relevancy"], expected[:, 3].astype(np.float32))
    rgb_bits = fields["rgb"].view("<u4")
    assert np.all(rgb_bits >> 24 == 0)
    decoded_rgb = np.stack([(rgb_bits >> 16) & 0xFF, (rgb_bits >> 8) & 0xFF, rgb_bits & 0xFF], axis=1)
    np.testing.assert_array_equal(decoded_rgb, [[255, 0, 0], [0, 128, 255], [17, 34, 51]])
    # The packed value RViz reads for the second point: 0x0080FF.
    assert int(rgb_bits[1]) == 0x0080FF

    # without_cloud: same answer, empty cloud that still declares the fields.
    request = Query.Request(text="chair", negatives=[], threshold=0.0, with_cloud=False)
    response = call(node, executor, client, request)
    assert json.loads(response.message) == {
        "text": "chair", "negatives": [], "threshold": 0.0, "with_cloud": False,
    }
    assert response.cloud.width == 0 and len(response.cloud.data) == 0
    assert [f.name for f in response.cloud.fields] == ["x", "y", "z", "relevancy", "rgb"]
    assert response.model_step == 12345678901

    assert proc.poll() is None, "server died during the test"
