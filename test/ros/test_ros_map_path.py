"""``lerf_node`` given a ``map_path`` that does not exist or does not load (issue 10, item 6): the trainer is
in state "error" with the reason, records and trains nothing (images dropped as "no_map"), queries answer
RESULT_ERROR with the reason, until ``lerf/reset`` starts a fresh map. Never a fresh map started quietly.
In-process (``main.build_nodes``), callbacks called directly: no DDS wait."""

import time

import numpy as np
import pytest
import rclpy
from sensor_msgs.msg import CameraInfo
from std_srvs.srv import SetBool, Trigger

from lerf_ros.compat.image import numpy_to_image
from lerf_ros.ros.messages import RESULTS, stamp_from_ns
from lerf_ros.ros.query_node import QueryArgs


def _answer(query):
    from lerf_ros.srv import Query

    return query._answer(QueryArgs("red box", (), None, False, 1), Query.Response())


@pytest.fixture(params=["missing", "corrupt"])
def nodes_with_bad_map(request, tmp_path):
    from lerf_ros.ros.main import build_nodes, destroy_nodes

    path = tmp_path / "map"
    if request.param == "corrupt":
        path.mkdir()
        (path / "manifest.json").write_text("{ not json")
    rclpy.init(args=["--ros-args", "-p", "preset:=tiny", "-p", "device:=cpu", "-p", f"map_path:={path}",
                     "-p", "max_frame_rate_hz:=0.0"])
    nodes = []
    try:
        nodes = build_nodes("both")
        yield nodes, str(path)
    finally:
        destroy_nodes(nodes)
        rclpy.try_shutdown()


def test_a_map_path_that_does_not_load_is_an_error_state_not_a_fresh_map(nodes_with_bad_map):
    (trainer, query), path = nodes_with_bad_map
    status = trainer.status_msg()
    assert status.state_name == "error" and path in status.last_error, status.last_error
    assert "lerf/reset" in status.last_error
    reply = _answer(query)
    assert reply.result == RESULTS["error"] and path in reply.message and not reply.found
    info = CameraInfo(width=16, height=12, distortion_model="plumb_bob", d=[0.0] * 5,
                      k=[10.0, 0.0, 7.5, 0.0, 10.0, 5.5, 0.0, 0.0, 1.0])
    trainer._on_camera_info(info)
    image = numpy_to_image(np.full((12, 16, 3), 90, np.uint8), "rgb8", ros=True)
    image.header.stamp, image.header.frame_id = stamp_from_ns(1_000_000_000), "cam"
    trainer._on_image(image)
    received, drops = trainer.counters.snapshot()
    assert (received, drops) == (1, {"no_map": 1}) and len(trainer.queue) == 0
    paused = trainer._on_pause(SetBool.Request(data=False), SetBool.Response())
    assert not paused.success and path in paused.message  # resuming would train an empty map
    time.sleep(0.3)
    assert trainer.engine.train_step == 0 and len(trainer.engine.store) == 0

    # The operator asks for a fresh map: recording and training start, queries are no longer refused.
    assert trainer._on_reset(Trigger.Request(), Trigger.Response()).success
    assert trainer.state_name() != "error" and trainer.status_msg().last_error == ""
    assert path not in _answer(query).message
