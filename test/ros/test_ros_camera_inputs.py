"""The trainer's cameras without a running ROS (``ros/cameras.py``): topics per namespace, the ``cameras``
parameter's rules, each camera's state for the status and ``/diagnostics``, and their mapping into
TrainingStatus and the "camera input" diagnostic."""

import numpy as np
import pytest
from std_msgs.msg import Header

from lerf_ros.core.engine import EngineStatus
from lerf_ros.ros import cameras, diagnostics, ingest
from lerf_ros.ros.messages import training_status_msg
from lerf_ros.ros.params import ParameterError, resolve
from lerf_ros.sim.scene import default_intrinsics


def test_topics_per_namespace_or_the_one_camera_of_the_topic_parameters():
    one = cameras.camera_topics(None, "camera/color/image_raw", "camera/color/camera_info", "")
    assert one == [cameras.CameraTopics("camera", "camera/color/image_raw", "camera/color/camera_info", "",
                                        False)]
    other = cameras.camera_topics((), "/front/rgb", "/front/info", "/front/depth")
    assert (other[0].name, other[0].depth, other[0].depth_optional) == ("/front/rgb", "/front/depth", False)
    two = cameras.camera_topics(("head_camera", "/arm/wrist"), "ignored", "ignored", "ignored")
    assert [(t.name, t.image, t.camera_info, t.depth, t.depth_optional) for t in two] == [
        ("head_camera", "head_camera/color/image_raw", "head_camera/color/camera_info",
         "head_camera/aligned_depth_to_color/image_raw", True),
        ("/arm/wrist", "/arm/wrist/color/image_raw", "/arm/wrist/color/camera_info",
         "/arm/wrist/aligned_depth_to_color/image_raw", True)]


def test_cameras_parameter_takes_ros_names_and_refuses_the_rest_naming_them():
    assert resolve({}).trainer.cameras is None
    assert resolve({"cameras": []}).trainer.cameras is None
    assert resolve({"cameras": ["head_camera", "/arm/wrist_2"]}).trainer.cameras == ("head_camera",
                                                                                      "/arm/wrist_2")
    for value, needle in ((["2nd_camera"], "'2nd_camera' is not a ROS namespace"),
                          (["head camera"], "'head camera' is not a ROS namespace"),
                          (["a//b"], "'a//b'"), (["a/"], "'a/'"), (["~/cam"], "'~/cam'"),
                          (["cam", "cam"], "'cam' is listed twice"), ("cam", "expected a list of strings"),
                          ([f"c{i}" for i in range(17)], "more than 16 cameras")):
        with pytest.raises(ParameterError, match="parameter 'cameras'") as err:
            resolve({"cameras": value})
        assert needle in str(err.value)


def _camera(optional=True):
    topics = cameras.camera_topics(("wrist",), "", "", "")[0] if optional else \
        cameras.camera_topics(None, "cam/color/image_raw", "cam/color/camera_info", "cam/depth")[0]
    return cameras.CameraInput(topics, ingest.DepthBuffer(4), 100.0, ingest.Decimator(0, 0, 0, 0),
                               ingest.DeliveryGaps())


def test_a_camera_nobody_publishes_is_reported_after_the_silence_window_only():
    cam = _camera()
    assert cam.state(100.0 + cameras.SILENT_S - 0.1, 0, 0) == cameras.OK  # drivers may start late
    t = 100.0 + cameras.SILENT_S + 2.0
    assert cam.state(t, 0, 0) == ("no publisher on wrist/color/image_raw for 7 s: is the camera namespace "
                                  "right?")
    assert cam.state(t, 1, 0).startswith("no publisher on wrist/color/camera_info for 7 s")
    assert cam.state(t, 1, 1) == "no image received on wrist/color/image_raw for 7 s"
    assert cam.state(t, 0, 0, image_name="/ns/wrist/color/image_raw").startswith(
        "no publisher on /ns/wrist/color/image_raw")


def test_images_without_camera_info_then_a_silent_camera_then_back():
    cam = _camera()
    for i in range(3):
        cam.image_received(101.0 + i)
    assert cam.state(103.5) == cameras.OK
    assert cam.state(106.0) == "3 images but no CameraInfo on wrist/color/camera_info: frames dropped"
    cam.set_info((None, "fx must be > 0"))
    assert cam.state(106.0) == "bad CameraInfo on wrist/color/camera_info: fx must be > 0"
    cam.set_info((default_intrinsics(), ""))
    assert cam.state(106.0) == cameras.OK
    assert cam.state(110.0) == "no image on wrist/color/image_raw for 7 s"
    cam.image_received(110.0)
    assert cam.state(110.5) == cameras.OK
    assert cameras.state_kind("no image on w2 for 17 s") == cameras.state_kind("no image on w2 for 9 s")


def test_depth_of_a_listed_camera_is_waited_for_only_once_it_came():
    optional, required = _camera(True), _camera(False)
    assert not optional.wants_depth and required.wants_depth
    optional.depth_received()
    assert optional.wants_depth


def test_report_counts_and_reset():
    cam = _camera()
    cam.image_received(101.0)
    cam.image_received(101.5)
    cam.dropped()
    cam.set_info((default_intrinsics(), ""))
    assert cam.report(102.0, 4) == cameras.CameraReport("wrist", 2, 1, 4, cameras.OK)
    cam.depths.put(1, np.ones((72, 96), np.float32))
    cam.reset(200.0)
    assert cam.report(201.0, 0) == cameras.CameraReport("wrist", 0, 0, 0, cameras.OK)
    assert len(cam.depths) == 0 and cam.info is not None  # CameraInfo kept: latched drivers send it once


def test_status_and_diagnostic_carry_each_camera():
    reports = [cameras.CameraReport("head_camera", 40, 2, 9, cameras.OK),
               cameras.CameraReport("ghost_camera", 0, 0, 0, "no publisher on /ghost_camera/color/image_raw")]
    status = EngineStatus(step=5, keyframes=9, keyframes_pending=0, losses={}, rays_per_s=0.0,
                          gpu_mem_allocated_mb=0.0, gpu_mem_peak_mb=0.0, last_error=None, ready=True)
    msg = training_status_msg(status, "training", Header(), 40, {"queue_full": 2}, cameras=reports)
    assert list(msg.camera_names) == ["head_camera", "ghost_camera"]
    assert (list(msg.camera_frames_received), list(msg.camera_frames_dropped), list(msg.camera_keyframes)) \
        == ([40, 0], [2, 0], [9, 0])
    assert list(msg.camera_states) == ["ok", "no publisher on /ghost_camera/color/image_raw"]
    window = diagnostics.IngestWindow(2.0, 5.0, 10, 0, 0.2, True)
    d = diagnostics.input_diagnostic("training", window, 40, {"queue_full": 2}, {}, cameras=reports)
    values = dict(d.values)
    assert d.level == diagnostics.WARN
    assert d.message == "camera 'ghost_camera': no publisher on /ghost_camera/color/image_raw"
    assert values["camera 'head_camera': keyframes"] == "9" and values["camera 'ghost_camera': state"] != "ok"
    assert diagnostics.input_diagnostic("training", window, 40, {}, {}, cameras=reports[:1]).level == \
        diagnostics.OK
