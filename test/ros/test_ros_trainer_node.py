"""The trainer node in-process, with a recording fake engine: callbacks are called directly and the TF
buffer is filled directly, so the ingest path (conversion, pose at the image stamp, depth pairing by
stamp, drop reasons, compressed transport, services) is checked deterministically without waiting on DDS.
The last tests start ``lerf_node`` as a process and stop it with a signal."""

import pathlib
import signal
import sys
import threading
import time

import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo
from std_srvs.srv import SetBool, Trigger

from lerf_ros.compat.image import numpy_to_image, rgb_to_compressed
from lerf_ros.compat.tf import matrix_to_transform_msg
from lerf_ros.core.engine import AddResult, EngineStatus, StepStats
from lerf_ros.core.frames.transforms import make_transform
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.messages import stamp_from_ns
from lerf_ros.ros.trainer_node import TrainerNode

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ros_harness import ROOM_PUBLISHER, Child, Client, launcher

NS = 1_000_000_000
W, H = 16, 12


class FakeEngine:
    """Records frames; every second frame is "redundant"; training does nothing."""

    def __init__(self):
        self.frames = []
        self.resets = 0
        self.lock = threading.RLock()
        self.data_version = 0
        self.train_step = 0

    def add_frame(self, frame):
        frame.validate()
        self.frames.append(frame)
        keyframe = len(self.frames) % 2 == 1
        kf_id = len(self.frames) if keyframe else None
        return AddResult(keyframe, "first" if keyframe else "redundant", kf_id)

    def step(self, max_steps=1):
        return StepStats()

    def wait_for_data(self, version, timeout):
        time.sleep(min(timeout or 0.01, 0.01))
        return self.data_version

    def wake(self):
        pass

    def reset(self):
        self.resets += 1
        self.frames.clear()

    def status(self):
        # The real status type: fields added later (with defaults) need no change here.
        return EngineStatus(step=0, keyframes=len(self.frames), keyframes_pending=0, losses={},
                            rays_per_s=0.0, gpu_mem_allocated_mb=0.0, gpu_mem_peak_mb=0.0, last_error=None,
                            ready=False)


@pytest.fixture
def trainer():
    rclpy.init()
    engine = FakeEngine()
    node = None
    try:
        node = TrainerNode(EngineSlot(engine), node_name="trainer_under_test", parameter_overrides=[
            Parameter("tf_timeout_s", value=0.05), Parameter("queue_size", value=3),
            Parameter("depth_topic", value="/camera/depth"), Parameter("status_rate_hz", value=0.5),
            # These tests follow every image through ingest: none is skipped before conversion here
            # (test_ros_decimation.py tests the skipping).
            Parameter("max_frame_rate_hz", value=0.0), Parameter("skip_static_frames", value=False)])
        yield node, engine
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()


def info_msg(fx=10.0):
    msg = CameraInfo(width=W, height=H, distortion_model="plumb_bob")
    msg.k = [fx, 0.0, 7.5, 0.0, fx, 5.5, 0.0, 0.0, 1.0]
    msg.d = [0.0] * 5
    return msg


def rgb_image(stamp_ns, frame_id="cam", value=0):
    rgb = np.full((H, W, 3), value, np.uint8)
    rgb[..., 0] = np.arange(W, dtype=np.uint8)[None, :] * 10
    msg = numpy_to_image(rgb, "rgb8", ros=True)
    msg.header.stamp, msg.header.frame_id = stamp_from_ns(stamp_ns), frame_id
    return msg, rgb


def put_tf(node, stamp_ns, x, child="cam", static=False):
    T = make_transform(np.eye(3), [x, 0.0, 0.0])
    msg = matrix_to_transform_msg(T, "map", child, stamp_ns)
    (node.tf_buffer.set_transform_static if static else node.tf_buffer.set_transform)(msg, "test")


def drain(node, engine, n, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and (len(node.queue) or sum(node.counters.snapshot()[1].values())
                                      + len(engine.frames) < n):
        time.sleep(0.01)


def test_pose_is_interpolated_at_the_image_stamp_and_depth_is_joined(trainer):
    node, engine = trainer
    put_tf(node, 10 * NS, 0.0)
    put_tf(node, 11 * NS, 1.0)
    node._on_camera_info(info_msg())
    depth = numpy_to_image(np.full((H, W), 2.5, np.float32), "32FC1", ros=True)
    depth.header.stamp = stamp_from_ns(10 * NS + NS // 4)
    node._on_depth(depth)
    msg, rgb = rgb_image(10 * NS + NS // 4)
    node._on_image(msg)
    drain(node, engine, 1)
    assert len(engine.frames) == 1
    frame = engine.frames[0]
    assert frame.T_world_cam[0, 3] == pytest.approx(0.25)
    assert frame.stamp_ns == 10 * NS + NS // 4
    np.testing.assert_array_equal(frame.image, rgb)
    assert (frame.intrinsics.fx, frame.intrinsics.width) == (10.0, W)
    assert frame.depth_m is not None and float(frame.depth_m[0, 0]) == 2.5
    # A second image without a depth of its stamp gets none; it is "redundant" to the fake engine.
    msg, _ = rgb_image(10 * NS + NS // 2)
    node._on_image(msg)
    drain(node, engine, 2)
    wait_until(lambda: node.counters.not_keyframes() != {})  # counted just after add_frame returns
    assert engine.frames[1].depth_m is None and engine.frames[1].T_world_cam[0, 3] == pytest.approx(0.5)
    received, drops = node.counters.snapshot()
    assert received == 2 and drops == {}  # a redundant frame is not a drop ...
    assert node.counters.not_keyframes() == {"redundant": 1}  # ... it is counted apart


def depth_image(stamp_ns, value):
    msg = numpy_to_image(np.full((H, W), value, np.float32), "32FC1", ros=True)
    msg.header.stamp = stamp_from_ns(stamp_ns)
    return msg


def wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.002)
    assert predicate()


def test_depth_pairs_by_stamp_in_either_arrival_order(trainer):
    node, engine = trainer
    assert (node.settings.depth_wait_s, node.settings.depth_stamp_tolerance_s) == (0.1, 0.02)
    put_tf(node, 0, 0.0, static=True)
    node._on_camera_info(info_msg())
    depth_values = {}
    for i in range(6):
        stamp = 20 * NS + i * NS // 30
        depth_values[stamp] = 1.0 + i
        if i % 2 == 0:  # depth first
            node._on_depth(depth_image(stamp, 1.0 + i))
            node._on_image(rgb_image(stamp)[0])
        else:  # colour first: depth is sent only once the ingest thread is waiting for it
            node._on_image(rgb_image(stamp)[0])
            wait_until(lambda: node.depths.waiting == 1)
            node._on_depth(depth_image(stamp, 1.0 + i))
        wait_until(lambda n=i + 1: len(engine.frames) == n)
    assert [f.stamp_ns for f in engine.frames] == sorted(depth_values)
    assert [float(f.depth_m[0, 0]) for f in engine.frames] == [depth_values[s] for s in sorted(depth_values)]
    assert node.counters.notes() == {} and len(node.depths) == 0  # each depth was consumed by its frame


def test_depth_within_tolerance_pairs_and_a_missing_one_is_counted_not_dropped(trainer):
    node, engine = trainer
    put_tf(node, 0, 0.0, static=True)
    node._on_camera_info(info_msg())
    node._on_depth(depth_image(30 * NS + 15_000_000, 4.0))  # 15 ms late: within the 20 ms tolerance
    node._on_image(rgb_image(30 * NS)[0])
    wait_until(lambda: len(engine.frames) == 1)
    assert float(engine.frames[0].depth_m[0, 0]) == 4.0
    node._on_depth(depth_image(31 * NS + 25_000_000, 5.0))  # 25 ms: outside the tolerance
    node._on_image(rgb_image(31 * NS)[0])
    wait_until(lambda: len(engine.frames) == 2)
    node._on_image(rgb_image(40 * NS)[0])  # no depth at all: waits depth_wait_s, then goes on without
    wait_until(lambda: len(engine.frames) == 3)
    assert engine.frames[1].depth_m is None and engine.frames[2].depth_m is None
    received, drops = node.counters.snapshot()
    assert received == 3 and node.counters.notes() == {"no_depth_match": 2}
    assert drops == {}  # neither the missing depth nor the fake engine's "redundant" on frame 2 is a drop
    msg = node.status_msg()  # both are listed in the status, apart from the dropped frames
    assert dict(zip(msg.drop_reasons, msg.drop_counts, strict=True)) == {}
    assert msg.frames_dropped == 0 and msg.frames_received == 3 and msg.frames_without_depth == 2
    assert msg.frames_not_keyframe == 1 and list(msg.not_keyframe_reasons) == ["redundant"]


def test_depth_buffer_stays_bounded_under_a_flood(trainer):
    node, engine = trainer
    put_tf(node, 0, 0.0, static=True)
    node._on_camera_info(info_msg())
    bound = node.depths.maxlen
    assert bound == node.settings.queue_size + 8
    for i in range(500):
        node._on_depth(depth_image(50 * NS + i * NS // 100, float(i)))
        assert len(node.depths) <= bound
    assert node.depths.high_water == bound
    # The newest depths are the ones kept: the last stamp still pairs, the first was evicted.
    node._on_image(rgb_image(50 * NS + 499 * NS // 100)[0])
    wait_until(lambda: len(engine.frames) == 1)
    assert float(engine.frames[0].depth_m[0, 0]) == 499.0
    node._on_image(rgb_image(50 * NS)[0])
    wait_until(lambda: len(engine.frames) == 2)
    assert engine.frames[1].depth_m is None and node.counters.notes() == {"no_depth_match": 1}


def test_compressed_images_are_decoded(trainer):
    node, engine = trainer
    put_tf(node, 0, 0.3, static=True)
    node._on_camera_info(info_msg())
    _, rgb = rgb_image(5 * NS)
    msg = rgb_to_compressed(rgb, "png", ros=True)
    msg.header.stamp, msg.header.frame_id = stamp_from_ns(5 * NS), "cam"
    node._on_image(msg)
    drain(node, engine, 1)
    np.testing.assert_array_equal(engine.frames[0].image, rgb)
    broken = rgb_to_compressed(rgb, "png", ros=True)
    broken.data = bytes(broken.data)[:20]
    broken.header.frame_id = "cam"
    node._on_image(broken)
    assert node.counters.snapshot()[1]["bad_image"] == 1


def test_each_bad_input_is_counted_under_its_reason(trainer):
    node, engine = trainer
    msg, _ = rgb_image(1 * NS)
    node._on_image(msg)  # before CameraInfo
    node._on_camera_info(info_msg())
    bad_encoding, _ = rgb_image(1 * NS)
    bad_encoding.encoding = "bayer_unknown"
    node._on_image(bad_encoding)
    node._on_image(numpy_to_image(np.zeros((H + 1, W, 3), np.uint8), "rgb8", ros=True))
    node._on_camera_info(info_msg(fx=0.0))
    node._on_image(rgb_image(1 * NS)[0])
    node._on_camera_info(info_msg())
    node._on_image(rgb_image(1 * NS, frame_id="nowhere")[0])
    put_tf(node, 50 * NS, 0.0, child="late")
    put_tf(node, 51 * NS, 0.0, child="late")
    node._on_image(rgb_image(1 * NS, frame_id="late")[0])
    drain(node, engine, 6)
    received, drops = node.counters.snapshot()
    assert received == 6
    assert drops == {"no_camera_info": 1, "bad_image": 1, "size_mismatch": 1, "bad_intrinsics": 1,
                     "tf_missing": 1, "tf_extrapolation": 1}
    assert engine.frames == []


def test_flood_is_bounded_by_the_queue(trainer):
    node, engine = trainer
    node._on_camera_info(info_msg())
    for i in range(50):  # no TF for "slow": each one waits tf_timeout_s in the ingest thread
        node._on_image(rgb_image(i * NS, frame_id="slow")[0])
        assert len(node.queue) <= 3
    drain(node, engine, 50, timeout=10.0)
    received, drops = node.counters.snapshot()
    assert received == 50 and node.queue.high_water == 3
    assert drops["queue_full"] + drops["tf_missing"] == 50
    assert drops["queue_full"] >= 40


def test_services_pause_and_reset(trainer):
    node, engine = trainer
    reply = node._on_pause(SetBool.Request(data=True), SetBool.Response())
    assert reply.success and reply.message == "paused"
    node.counters.drop("tf_missing")
    node.counters.not_keyframe("blurred")
    engine.frames.append(object())
    reply = node._on_reset(Trigger.Request(), Trigger.Response())
    assert reply.success and engine.resets == 1 and engine.frames == []
    assert node.counters.snapshot() == (0, {}) and node.counters.not_keyframes() == {}
    # The worker came back paused after the reset.
    end = time.monotonic() + 5.0
    while node.state_name() != "paused" and time.monotonic() < end:
        time.sleep(0.01)
    assert node.state_name() == "paused"
    reply = node._on_pause(SetBool.Request(data=False), SetBool.Response())
    assert reply.message == "resumed"
    end = time.monotonic() + 5.0
    while node.state_name() == "paused" and time.monotonic() < end:
        time.sleep(0.01)
    assert node.state_name() == "waiting"


def test_diagnostics_tasks_report_the_node_counters(trainer):
    from lerf_ros.compat.diagnostics import StatusSubstitute

    node, engine = trainer
    put_tf(node, 0, 0.0, static=True)
    node._on_camera_info(info_msg())
    for i in range(4):  # the fake engine keeps frames 1 and 3, finds 2 and 4 "redundant"
        node._on_image(rgb_image(60 * NS + i * NS // 10)[0])
        wait_until(lambda n=i + 1: len(engine.frames) == n)
    node._on_image(rgb_image(61 * NS, frame_id="nowhere")[0])  # no TF: a drop
    wait_until(lambda: node.counters.snapshot()[1] == {"tf_missing": 1}
               and sum(node.counters.not_keyframes().values()) == 2)
    camera = node._diagnose_input(StatusSubstitute("camera input"))
    values = {kv.key: kv.value for kv in camera.values}
    assert values["frames received"] == "5" and values["frames dropped"] == "1"
    assert values["TF failures"] == "1" and values["dropped: tf_missing"] == "1"
    assert values["frames not kept as keyframes"] == "2" and values["not a keyframe: redundant"] == "2"
    assert camera.hardware_id == "/camera/color/image_raw"
    training = node._diagnose_training(StatusSubstitute("training"))
    values = {kv.key: kv.value for kv in training.values}
    assert values["state"] == "waiting" and values["keyframes"] == "4"  # the fake engine counts every frame
    assert training.level == bytes([0]) and training.message.startswith("waiting, step 0, 4 keyframes")


class GatedEngine(FakeEngine):
    """``add_frame`` waits until ``gate`` is set: the engine lock held by a long step or by features."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def add_frame(self, frame):
        assert self.gate.wait(20.0)
        return super().add_frame(frame)


@pytest.fixture
def slow_tf_trainer():
    """A trainer whose TF wait (2 s) outlasts what the tests do meanwhile; add_frame gated."""
    rclpy.init()
    engine = GatedEngine()
    node = None
    try:
        node = TrainerNode(EngineSlot(engine), node_name="trainer_jumps", parameter_overrides=[
            Parameter("tf_timeout_s", value=2.0), Parameter("queue_size", value=3),
            Parameter("status_rate_hz", value=0.5), Parameter("max_frame_rate_hz", value=0.0),
            Parameter("skip_static_frames", value=False)])
        node._on_camera_info(info_msg())
        yield node, engine
    finally:
        if node is not None:
            engine.gate.set()
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()


def test_frames_posed_before_a_jump_back_reach_the_engine_behind_a_slow_add_frame(slow_tf_trainer):
    """Issue 10 (bag loop): frames are posed as soon as their TF is there, not when add_frame gets to them;
    frames that waited behind a slow add_frame are not lost when time then jumps back and TF is cleared."""
    node, engine = slow_tf_trainer
    for i in range(5):
        put_tf(node, 10 * NS + i * NS // 2, 0.1 * i)
    for i in range(3):
        node._on_image(rgb_image(10 * NS + (i + 1) * NS // 4)[0])
    wait_until(lambda: len(node.queue) == 0 and len(node.posed) == 2)  # one more is in add_frame
    put_tf(node, 1 * NS, 0.0)  # the bag starts over: the TF buffer clears its dynamic transforms
    assert node.tf_counts().jumps_back == 1
    engine.gate.set()
    wait_until(lambda: len(engine.frames) == 3)
    assert node.counters.snapshot()[1] == {}
    np.testing.assert_allclose([f.T_world_cam[0, 3] for f in engine.frames], [0.05, 0.1, 0.15])


def test_queued_frames_of_the_old_timeline_are_dropped_as_time_jump(slow_tf_trainer):
    """On a jump back the frames still waiting for their pose and stamped after the time jumped to are
    dropped at once as "time_jump" (their TF was cleared), not waited for and counted as tf_extrapolation;
    frames of the new timeline are posed and taken."""
    node, engine = slow_tf_trainer
    engine.gate.set()
    for i in range(5):
        put_tf(node, 10 * NS + i * NS // 2, 0.1 * i)
    node._on_image(rgb_image(12 * NS + NS // 2)[0])  # after the TF: the pose thread waits for it (2 s)
    wait_until(lambda: len(node.queue) == 0)
    node._on_image(rgb_image(11 * NS)[0])  # posable now, but queued behind the wait
    node._on_image(rgb_image(11 * NS + NS // 5)[0])
    put_tf(node, 1 * NS, 0.0)  # time jumps back to 1 s
    put_tf(node, 2 * NS, 1.0)
    wait_until(lambda: sum(node.counters.snapshot()[1].values()) == 3, timeout=10.0)
    assert node.counters.snapshot()[1] == {"time_jump": 3}
    node._on_image(rgb_image(1 * NS + NS // 2)[0])  # the new timeline
    wait_until(lambda: len(engine.frames) == 1)
    np.testing.assert_allclose(engine.frames[0].T_world_cam[0, 3], 0.5)
    reply = node._on_reset(Trigger.Request(), Trigger.Response())  # TF state and its counts start over
    assert reply.success and node.tf_counts().jumps_back == 0
    with pytest.raises(Exception, match="xtrapolation"):
        node.tf_buffer.lookup_matrix("map", "cam", 1 * NS + NS // 2)


#: Bound on the node's exit after a signal, s: the worker finishes its current step (tiny preset: well
#: under a second) and every thread is joined with a bound; far below Child.stop's 20 s SIGKILL fallback.
EXIT_BOUND_S = 10.0


def _signal_and_time_exit(child: Child, signum: int) -> tuple[int | None, float]:
    start = time.monotonic()
    child.proc.send_signal(signum)
    try:
        code = child.proc.wait(EXIT_BOUND_S)
    except Exception:  # subprocess.TimeoutExpired: report it as "still running"
        code = None
    return code, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_node_process_exits_promptly_with_status_0_on_a_signal_while_training(tmp_path, signum):
    """lerf_node via the launcher (tiny preset, demo encoders) trains on the room publisher's stream;
    a signal mid-training ends the process with exit status 0 within EXIT_BOUND_S."""
    rclpy.init()
    publisher = Child([str(ROOM_PUBLISHER), "--image-hz", "4", "--tf-hz", "15"], tmp_path / "publisher.log")
    node = launcher(tmp_path / "lerf_node.log", "preset:=tiny", "min_keyframes:=2", "status_rate_hz:=4.0",
                    "tf_timeout_s:=0.5", "steps_per_tick:=50")
    client = Client("shutdown_client")
    code = elapsed = None
    try:
        client.status(timeout=120.0, child=node)
        client.wait_status(lambda s: s.state_name == "training" and s.step > 0, 180.0, "training", node)
        code, elapsed = _signal_and_time_exit(node, signum)
    finally:
        client.close()
        node.stop()
        publisher.stop()
        rclpy.try_shutdown()
    assert code == 0, f"exit status {code} after {elapsed:.1f} s\n{node.log()}"
    assert elapsed < EXIT_BOUND_S
    print(f"{signal.Signals(signum).name}: exit status 0 after {elapsed:.2f} s")
    assert "Traceback" not in node.log(200_000), node.log()


class _Recorder:
    """Stands in for the status publisher: keeps what would have been published."""

    def __init__(self):
        self.messages = []

    def publish(self, msg):
        self.messages.append(msg)


def _wait_state(node, name, timeout=5.0):
    end = time.monotonic() + timeout
    while node.state_name() != name and time.monotonic() < end:
        time.sleep(0.01)
    assert node.state_name() == name


def test_state_watch_publishes_each_change_once(trainer):
    node, _ = trainer
    node.status_pub = sent = _Recorder()
    node.publish_status()
    assert [m.state_name for m in sent.messages] == ["waiting"]
    node.publish_status_if_state_changed()
    assert len(sent.messages) == 1  # no change, nothing new
    # A change no service made (here: the worker paused directly) is published by the watch, once.
    node._worker.pause()
    _wait_state(node, "paused")
    node.publish_status_if_state_changed()
    node.publish_status_if_state_changed()
    assert [m.state_name for m in sent.messages] == ["waiting", "paused"]


def test_save_and_load_replies_are_followed_by_a_status(trainer, tmp_path):
    from lerf_ros.srv import MapPath

    node, _ = trainer
    node.status_pub = sent = _Recorder()
    # The fake engine cannot save: the failure is answered and still followed by a status.
    reply = node._on_save(MapPath.Request(path="relative/map"), MapPath.Response())
    assert not reply.success and len(sent.messages) == 1
    reply = node._on_load(MapPath.Request(path=str(tmp_path / "missing")), MapPath.Response())
    assert not reply.success and len(sent.messages) == 2
