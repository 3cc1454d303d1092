"""The status -> /diagnostics mapping (ROS-free, statuses built by hand), and the trainer + query nodes'
arrays seen over DDS by another process's subscriber."""

import itertools
import pathlib
import statistics
import sys

import pytest

from lerf_ros.core.engine import EngineStatus
from lerf_ros.core.training.convergence import ConvergenceSignals
from lerf_ros.ros import diagnostics
from lerf_ros.ros.diagnostics import ERROR, OK, WARN, IngestRate, IngestWindow

sys.path.insert(0, str(pathlib.Path(__file__).parent))


def engine_status(**overrides) -> EngineStatus:
    values = dict(step=120, keyframes=6, keyframes_pending=1, losses={"total": 0.5}, rays_per_s=2048.0,
                  gpu_mem_allocated_mb=0.0, gpu_mem_peak_mb=0.0, last_error=None, ready=True,
                  clip_encoder="openclip:ViT-B-16", dino_encoder="dino:vits16", demo_encoders=False,
                  nonfinite_steps=2, journal_bytes=4096, device="cpu",
                  convergence=ConvergenceSignals(step=100, usable=False, progress=0.4, note="converging"))
    values.update(overrides)
    return EngineStatus(**values)


def window(rate=4.0, received=20, dropped=0, since=0.2, any_image=True) -> IngestWindow:
    return IngestWindow(image_rate_hz=rate, window_s=5.0, received=received, dropped=dropped,
                        since_image_s=since, any_image=any_image)


# ---------------------------------------------------------------------- IngestRate
def test_ingest_rate_over_the_window_and_since_the_last_image():
    rate = IngestRate(start_s=100.0, window_s=5.0)
    first = rate.sample(100.0, 0, 0)
    assert first.image_rate_hz == 0.0 and not first.any_image and first.since_image_s == 0.0
    for i in range(1, 11):  # 4 frames per second for 10 s, one drop per second
        w = rate.sample(100.0 + i, 4 * i, i)
    assert w.image_rate_hz == pytest.approx(4.0) and w.window_s == pytest.approx(5.0)
    assert (w.received, w.dropped) == (20, 5) and w.any_image and w.since_image_s == 0.0
    # The camera goes silent: the rate falls to 0 over the window, the silence grows.
    for i in range(11, 17):
        w = rate.sample(100.0 + i, 40, 10)
    assert w.image_rate_hz == 0.0 and w.since_image_s == pytest.approx(6.0)


def test_ingest_rate_restarts_after_a_reset_of_the_counters():
    rate = IngestRate(start_s=0.0, window_s=5.0)
    for i in range(1, 6):
        rate.sample(float(i), 10 * i, 0)
    w = rate.sample(6.0, 0, 0)  # the reset service cleared the counters
    assert (w.image_rate_hz, w.received, w.any_image) == (0.0, 0, False)
    w = rate.sample(8.0, 6, 0)
    assert w.image_rate_hz == pytest.approx(3.0) and w.any_image


def test_ingest_rate_rejects_a_bad_window():
    with pytest.raises(ValueError, match="window_s"):
        IngestRate(0.0, window_s=0.0)


# ---------------------------------------------------------------------- camera input
def test_input_ok_lists_rate_tf_failures_and_drops_apart_from_frames_not_kept():
    drops = {"tf_missing": 2, "tf_extrapolation": 1, "queue_full": 4}
    d = diagnostics.input_diagnostic("training", window(rate=3.5, received=18, dropped=1), 50, drops,
                                     {"redundant": 9, "blurred": 2}, frames_without_depth=3,
                                     hardware_id="/camera/color/image_raw")
    assert (d.task, d.level, d.message) == ("camera input", OK, "images at 3.5 Hz")
    assert d.hardware_id == "/camera/color/image_raw"
    assert d.value("image rate (Hz)") == "3.50"
    assert d.value("TF failures") == "3"
    assert d.value("frames dropped") == "7"  # redundant / blurred frames are not drops
    assert d.value("dropped: queue_full") == "4" and d.value("dropped: tf_missing") == "2"
    assert d.value("frames not kept as keyframes") == "11"
    assert d.value("not a keyframe: redundant") == "9" and d.value("not a keyframe: blurred") == "2"
    assert d.value("frames received") == "50" and d.value("frames without depth") == "3"
    with pytest.raises(KeyError):
        d.value("dropped: redundant")


@pytest.mark.parametrize(("state", "level"), [("waiting", WARN), ("training", WARN), ("paused", OK),
                                              ("ready", OK), ("error", OK)])
def test_a_silent_camera_warns_only_while_collecting(state, level):
    d = diagnostics.input_diagnostic(state, window(rate=0.0, received=0, since=7.5), 10, {}, {})
    assert d.level == level
    if level == WARN:
        assert d.message == "no image for 7.5 s"
    d = diagnostics.input_diagnostic(state, window(rate=0.0, received=0, since=4.0), 10, {}, {})
    assert d.level == OK  # within IMAGE_STALE_S
    never = diagnostics.input_diagnostic(state, window(rate=0.0, received=0, since=9.0, any_image=False),
                                         0, {}, {})
    assert never.level == level and never.value("seconds since last image") == "n/a (none yet)"
    if level == WARN:
        assert never.message == "no image in the 9.0 s since the start or the last reset"


def test_high_drops_warn_and_frames_not_kept_never_do():
    high = diagnostics.input_diagnostic("training", window(received=10, dropped=6), 10, {"tf_missing": 6}, {})
    assert high.level == WARN and high.message.startswith("high drops: 6 of 10 frames")
    half = diagnostics.input_diagnostic("training", window(received=10, dropped=5), 10, {"tf_missing": 5}, {})
    assert half.level == OK
    few = diagnostics.input_diagnostic("training", window(received=3, dropped=3), 3, {"bad_image": 3}, {})
    assert few.level == OK  # below HIGH_DROP_MIN_FRAMES
    redundant = diagnostics.input_diagnostic("training", window(received=10, dropped=0), 10, {},
                                             {"redundant": 10})
    assert redundant.level == OK and redundant.value("frames dropped") == "0"


def test_silence_and_high_drops_are_both_reported():
    d = diagnostics.input_diagnostic("training", window(rate=0.1, received=8, dropped=8, since=6.0), 8,
                                     {"tf_missing": 8}, {})
    assert d.level == WARN and d.message == "no image for 6.0 s; high drops: 8 of 8 frames in the last 5.0 s"


# ---------------------------------------------------------------------- training
def test_training_ok_values():
    d = diagnostics.training_diagnostic(engine_status(), "training")
    assert (d.task, d.level) == ("training", OK)
    assert d.message == "training, step 120, 6 keyframes, progress 0.40"
    assert d.hardware_id == "cpu"
    expected = {"state": "training", "step": "120", "keyframes": "6", "keyframes pending": "1",
                "usable": "False", "progress": "0.400", "non-finite steps": "2", "journal bytes": "4096",
                "CLIP encoder": "openclip:ViT-B-16", "DINO encoder": "dino:vits16", "demo encoder": "False",
                "GPU memory allocated (MiB)": "n/a (no CUDA)", "GPU memory reserved (MiB)": "n/a (no CUDA)",
                "last error": ""}
    assert {k: d.value(k) for k in expected} == expected


def test_training_on_cuda_reports_gpu_memory():
    d = diagnostics.training_diagnostic(
        engine_status(device="cuda:0", gpu_mem_allocated_mb=812.25, gpu_mem_reserved_mb=1024.0,
                      gpu_mem_peak_mb=900.0), "training")
    assert d.hardware_id == "cuda:0"
    assert float(d.value("GPU memory allocated (MiB)")) == pytest.approx(812.25, abs=0.06)
    assert d.value("GPU memory reserved (MiB)") == "1024.0" and d.value("GPU memory peak (MiB)") == "900.0"


def test_training_error_state_is_an_error_with_the_reason():
    d = diagnostics.training_diagnostic(engine_status(last_error="RuntimeError: training diverged",
                                                      demo_encoders=True), "error")
    assert d.level == ERROR  # the error wins over the demo-encoder warning
    assert d.message == "training stopped: RuntimeError: training diverged"
    assert d.value("last error") == "RuntimeError: training diverged"
    node_error = diagnostics.training_diagnostic(engine_status(), "error", last_error="bad_frame: x")
    assert node_error.level == ERROR and node_error.message == "training stopped: bad_frame: x"


def test_a_demo_encoder_warns_and_is_named():
    d = diagnostics.training_diagnostic(
        engine_status(clip_encoder="demo-colour", dino_encoder="demo-dense", demo_encoders=True,
                      convergence=ConvergenceSignals(usable=True, progress=1.0)), "ready")
    assert d.level == WARN and "demo encoder in use" in d.message and "'demo-colour'" in d.message
    assert d.value("demo encoder") == "True" and d.value("CLIP encoder") == "demo-colour"
    assert d.value("usable") == "True"


# ---------------------------------------------------------------------- query node model
def test_model_without_a_map_is_an_error():
    d = diagnostics.model_diagnostic(None, "/maps/kitchen", "map_path '/maps/kitchen' could not be loaded: x")
    assert (d.task, d.level, d.hardware_id) == ("model", ERROR, "none")
    assert d.message == "no model: map_path '/maps/kitchen' could not be loaded: x"
    assert d.value("model") == "/maps/kitchen"


def test_model_ok_and_demo_warning():
    ok = diagnostics.model_diagnostic(engine_status(), "/maps/kitchen")
    assert ok.level == OK and ok.message == "answering from step 120, 6 keyframes, still converging"
    assert ok.value("ready") == "True" and ok.value("CLIP encoder") == "openclip:ViT-B-16"
    demo = diagnostics.model_diagnostic(engine_status(demo_encoders=True), "live")
    assert demo.level == WARN and demo.value("demo encoder") == "True"


# ---------------------------------------------------------------------- over DDS
def _by_name(array) -> dict:
    return {s.name: s for s in array.status}


def test_the_nodes_publish_diagnostics_over_dds(tmp_path):
    """lerf_node (tiny preset: demo encoders) with the room publisher's camera: another process's node sees
    the trainer's "camera input" and "training" and the query node's "model" on /diagnostics at 1 Hz."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from ros_harness import ROOM_PUBLISHER, Child, Client, launcher

    rclpy.init()
    publisher = Child([str(ROOM_PUBLISHER), "--image-hz", "4", "--tf-hz", "15"], tmp_path / "publisher.log")
    node = launcher(tmp_path / "lerf_node.log", "min_keyframes:=2", "tf_timeout_s:=0.5")
    client = Client("diagnostics_client")
    arrays: list = []
    client.node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 50)
    try:
        def trainer_seeing_images():
            for array in reversed(arrays):
                status = _by_name(array).get("lerf_trainer: camera input")
                if status is not None and status.message != "Node starting up":
                    values = {kv.key: kv.value for kv in status.values}
                    if int(values["frames received"]) > 0 and float(values["image rate (Hz)"]) > 0:
                        return array
            return None

        array = client.wait_for(trainer_seeing_images, 120.0, "the trainer's camera input on /diagnostics",
                                node)
        statuses = _by_name(array)
        assert set(statuses) == {"lerf_trainer: camera input", "lerf_trainer: training"}
        camera, training = statuses["lerf_trainer: camera input"], statuses["lerf_trainer: training"]
        assert camera.hardware_id == "/camera/color/image_raw"
        values = {kv.key: kv.value for kv in training.values}
        assert training.level == DiagnosticStatus.WARN and "demo encoder in use" in training.message
        assert values["demo encoder"] == "True" and values["CLIP encoder"] and values["DINO encoder"]
        assert values["state"] in ("waiting", "training")
        if values["device"].startswith("cuda"):
            assert float(values["GPU memory reserved (MiB)"]) >= float(values["GPU memory allocated (MiB)"])
        else:
            assert values["GPU memory allocated (MiB)"] == "n/a (no CUDA)"
        model = client.wait_for(
            lambda: next((_by_name(a)["lerf_query: model"] for a in reversed(arrays)
                          if "lerf_query: model" in _by_name(a)
                          and _by_name(a)["lerf_query: model"].message != "Node starting up"), None),
            10.0, "the query node's model on /diagnostics", node)
        assert model.level == DiagnosticStatus.WARN  # the live engine's demo encoders
        assert {kv.key: kv.value for kv in model.values}["model"] == "live (the trainer in this process)"
        # 1 Hz: the trainer's periodic arrays are about a second apart (median; the executor may be late).
        client.wait_for(lambda: sum("lerf_trainer: training" in _by_name(a) for a in arrays) >= 6, 15.0,
                        "six trainer arrays", node)
        stamps = [a.header.stamp.sec + a.header.stamp.nanosec * 1e-9 for a in arrays
                  if "lerf_trainer: training" in _by_name(a)
                  and _by_name(a)["lerf_trainer: training"].message != "Node starting up"]
        assert 0.7 <= statistics.median(b - a for a, b in itertools.pairwise(stamps)) <= 1.5
    finally:
        client.close()
        node.stop()
        publisher.stop()
        rclpy.try_shutdown()
