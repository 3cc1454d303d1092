"""More than one camera over real DDS (loopback only): ``two_camera_publisher.py`` (its own process) plays a
head camera (96 x 72, 75 deg) and a wrist camera (80 x 45, 87 deg) with depth and TF; ``lerf_node`` started by
the launcher with ``cameras:=[head_camera, wrist_camera, ghost_camera]`` maps both into one map, and reports
the third namespace, where nobody publishes, in its status without stopping.

The wrist camera alone sees the yellow box and the head camera alone the green sphere
(``lerf_ros.sim.two_cameras``; checked in test/core/test_engine_cameras.py), so locating both proves that
keyframes of both cameras, each with its own size and intrinsics, are in the map. The cameras make one pass
each once the node is up (a fixed amount of data, whatever the load on the machine), and training is paused
before the queries so that the model they see stays fixed."""

import pathlib
import sys

import numpy as np
import pytest
from std_srvs.srv import SetBool

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ros_harness import Child, Client, launcher

from lerf_ros.compat.launcher import LaunchArgumentError, plan_launch
from lerf_ros.ros import cameras
from lerf_ros.ros.messages import RESULTS
from lerf_ros.ros.params import ParameterError
from lerf_ros.sim import two_cameras
from lerf_ros.sim.scene import SyntheticRoom

PUBLISHER = pathlib.Path(__file__).with_name("two_camera_publisher.py")
CAMERAS = ("head_camera", "wrist_camera", "ghost_camera")
MIN_KEYFRAMES = 3  # per publishing camera
GROW_M = 0.10


def _by_camera(status, field: str) -> dict:
    return dict(zip(status.camera_names, getattr(status, field), strict=True))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    import rclpy

    logs = tmp_path_factory.mktemp("cameras")
    rclpy.init()
    nodes = launcher(logs / "lerf_node.log", "device:=cpu", "status_rate_hz:=4.0", "tf_timeout_s:=0.5",
                     "candidate_voxel_m:=0.06", arguments=(f"cameras:=[{', '.join(CAMERAS)}]",))
    client = Client("cameras_client")
    publisher = None
    try:
        client.status(timeout=60.0, child=nodes)  # subscribed: the node is active
        publisher = Child([str(PUBLISHER), "--head-hz", "3", "--wrist-hz", "3", "--lap-s", "5",
                           "--laps", "1"], logs / "two_camera_publisher.log")
        yield {"client": client, "nodes": nodes, "publisher": publisher}
    finally:
        client.close()
        code = nodes.stop()
        if publisher is not None:
            publisher.stop()
        rclpy.try_shutdown()
        assert code == 0, nodes.log()


def test_both_cameras_feed_one_map_that_locates_what_each_saw(session):
    client, nodes = session["client"], session["nodes"]

    last, ok_while_publishing = [], []

    def collected(s):
        last[:] = [s]
        states, received = _by_camera(s, "camera_states"), _by_camera(s, "camera_frames_received")
        if (session["publisher"].alive and received.get("head_camera", 0) > 0
                and received.get("wrist_camera", 0) > 0
                and states.get("head_camera") == states.get("wrist_camera") == cameras.OK):
            ok_while_publishing.append(s.step)
        kf = _by_camera(s, "camera_keyframes")
        return (kf.get("head_camera", 0) >= MIN_KEYFRAMES and kf.get("wrist_camera", 0) >= MIN_KEYFRAMES
                and s.keyframes_pending == 0 and not session["publisher"].alive)

    try:
        status = client.wait_status(collected, 90.0, "the cameras' pass, its keyframes with features", nodes)
    except AssertionError as exc:
        s = last[0] if last else None
        seen = "none" if s is None else (_by_camera(s, "camera_keyframes"), s.keyframes_pending, s.step)
        raise AssertionError(f"{exc}\nlast status (keyframes by camera, pending, step): {seen}") from None
    assert list(status.camera_names) == list(CAMERAS)
    received = _by_camera(status, "camera_frames_received")
    assert received["head_camera"] >= MIN_KEYFRAMES and received["wrist_camera"] >= MIN_KEYFRAMES
    assert received["ghost_camera"] == 0
    assert sum(status.camera_keyframes) == status.keyframes  # every keyframe is one of the cameras'
    # Both cameras were "ok" while they published; once their pass has ended (the wait above outlasts it by
    # whatever the keyframe features take, more than SILENT_S on a slow machine) "no image for N s" is the
    # right report, and nothing else is.
    assert ok_while_publishing, "no status showed both cameras ok while they published"
    states = _by_camera(status, "camera_states")
    for name in ("head_camera", "wrist_camera"):
        assert states[name] == cameras.OK or states[name].startswith(
            f"no image on /{name}/{cameras.COLOR_IMAGE} for "), states
    # Each camera's CameraInfo, image size, depth and TF fit its images: no frame was dropped for them (an
    # image before its camera's first CameraInfo, or one pushed out of a full queue, may be at start-up).
    drops = dict(zip(status.drop_reasons, status.drop_counts, strict=True))
    assert set(drops) <= {"no_camera_info", "queue_full"}, (drops, nodes.log())
    assert sum(_by_camera(status, "camera_frames_dropped").values()) == status.frames_dropped
    paused = client.call(SetBool, "/lerf/pause", SetBool.Request(data=True), child=nodes)
    assert paused.success, paused.message

    room = SyntheticRoom(0)
    for name in (two_cameras.WRIST_ONLY, *two_cameras.HEAD_ONLY):
        reply = client.query(name, with_cloud=False, timeout=120.0, child=nodes)
        assert reply.result == RESULTS["found"], (name, reply.message)
        obj = room.object(name)
        loc = np.array([reply.location.point.x, reply.location.point.y, reply.location.point.z])
        assert np.all(loc >= obj.box_min - GROW_M) and np.all(loc <= obj.box_max + GROW_M), (
            name, loc.round(3).tolist(), obj.center.tolist(), reply.message)


def test_a_camera_namespace_nobody_publishes_is_reported_not_fatal(session):
    client, nodes = session["client"], session["nodes"]
    status = client.wait_status(lambda s: _by_camera(s, "camera_states").get("ghost_camera", "ok") != "ok",
                                3 * cameras.SILENT_S + 30.0, "the ghost camera reported", nodes)
    state = _by_camera(status, "camera_states")["ghost_camera"]
    assert state.startswith("no publisher on /ghost_camera/color/image_raw"), state
    assert "namespace" in state
    assert nodes.alive and status.state_name in ("training", "paused")


def test_camera_names_that_break_ros_rules_stop_start_up():
    for value, culprit in (("[head_camera, 2nd_camera]", "'2nd_camera' is not a ROS namespace"),
                           ("[head camera]", "'head camera' is not a ROS namespace"),
                           ("[wrist_camera, wrist_camera]", "listed twice"),
                           ("[a: b]", "expected a list of names")):
        with pytest.raises((ParameterError, LaunchArgumentError), match="cameras") as err:
            plan_launch({"cameras": value, "preset": "tiny"}, ("trainer",),
                        default_params=str(pathlib.Path(__file__).parents[2] / "config" / "lerf.yaml"))
        assert culprit in str(err.value)
