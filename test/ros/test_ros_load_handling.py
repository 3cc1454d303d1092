"""The trainer under a camera flood (issue 10, item 4): images skipped before conversion (by rate, by a camera
that has not moved), images DDS never delivered (sequence and stamp gaps), the engine lock's longest hold and
wait, torch's thread count. ROS-free parts are tested directly; the node's use of them in-process."""

import threading
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter

from lerf_ros.compat.image import numpy_to_image
from lerf_ros.compat.tf import matrix_to_transform_msg
from lerf_ros.core.frames.transforms import make_transform
from lerf_ros.ros import diagnostics, ingest, lock_meter
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.messages import stamp_from_ns
from lerf_ros.ros.trainer_node import TrainerNode

NS = 1_000_000_000
MS = 1_000_000


def _pose(x=0.0, yaw_deg=0.0):
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    return make_transform(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]), [x, 0.0, 0.0])


def test_decimator_skips_by_rate_and_keeps_the_first_of_each_period():
    d = ingest.Decimator(0.1, 0.1, 10.0, 5.0)
    taken = [i for i in range(60) if d.decide(i * NS // 30) == ""]  # 2 s at 30 Hz, no pose
    # 10 Hz from 30 Hz: every third frame (stamps 100 ms apart), none in between.
    assert taken == list(range(0, 60, 3))


def test_decimator_skips_a_static_camera_until_it_moves_or_half_the_interval_passes():
    d = ingest.Decimator(0.0, 0.1, 10.0, 4.0)
    assert d.decide(0, _pose()) == ""
    assert d.decide(100 * MS, _pose(0.04)) == ingest.SKIPPED_STATIC  # 4 cm < half of 10 cm
    assert d.decide(200 * MS, _pose(0.0, 4.0)) == ingest.SKIPPED_STATIC  # 4 deg < half of 10 deg
    assert d.decide(300 * MS, _pose(0.06)) == ""  # moved 6 cm: taken, the new reference
    assert d.decide(400 * MS, _pose(0.06, 6.0)) == ""  # turned 6 deg
    assert d.decide(500 * MS, _pose(0.06, 6.0)) == ingest.SKIPPED_STATIC
    assert d.decide(2_401 * MS, _pose(0.06, 6.0)) == ""  # 2 s = half of max_interval since the last one
    assert d.decide(2_500 * MS, None) == ""  # no pose known: never skipped as static


def test_decimator_starts_afresh_when_time_jumps_back():
    d = ingest.Decimator(0.5, 0.1, 10.0, 5.0)
    assert d.decide(100 * NS, _pose()) == ""
    assert d.decide(100 * NS + 100 * MS, _pose(1.0)) == ingest.SKIPPED_RATE
    # A bag loop: stamps 60 s back. Without the restart every frame of the second play would be "too soon".
    assert d.decide(40 * NS, _pose()) == ""
    assert d.decide(40 * NS + 100 * MS, _pose()) == ingest.SKIPPED_RATE
    assert d.decide(40 * NS + 600 * MS, _pose(1.0)) == ""
    with pytest.raises(ValueError, match="min_period_s"):
        ingest.Decimator(float("nan"), 0.1, 10.0, 5.0)


def test_delivery_gaps_count_sequence_and_stamp_gaps():
    gaps = ingest.DeliveryGaps(min_steps=8)
    period = 33 * MS
    sent = [i for i in range(200) if i % 10 not in (3, 4)]  # 2 of every 10 lost: 40 in all
    for i in sent:
        gaps.observe(5 * NS + i * period, sequence=i + 1)
    assert gaps.lost_by_sequence == 40
    assert gaps.period_ns() == period
    # The first 8 steps only learn the period (one gap of 2 falls in them).
    assert gaps.missing_by_stamp == 38
    assert gaps.received == 160
    # A publisher restart (sequence back to 1) and a bag loop (stamps back) count nothing.
    gaps.observe(1 * NS, sequence=1)
    gaps.observe(1 * NS + period, sequence=2)
    assert (gaps.lost_by_sequence, gaps.missing_by_stamp) == (40, 38)
    gaps.reset()
    assert (gaps.lost_by_sequence, gaps.missing_by_stamp, gaps.received) == (0, 0, 0)


def test_metered_lock_reports_the_longest_hold_and_wait():
    lock = lock_meter.MeteredLock()
    with lock.background():
        with lock:  # nested: one hold
            time.sleep(0.05)
    stats = lock.stats()
    assert stats.holds == 1 and 0.045 <= stats.max_hold_background_s < 1.0 and stats.max_hold_urgent_s == 0
    held = threading.Event()

    def train_step():
        with lock.background():
            held.set()
            time.sleep(0.2)

    worker = threading.Thread(target=train_step)
    worker.start()
    held.wait(5.0)
    with lock:  # a query waits for the step in progress
        pass
    worker.join()
    stats = lock.stats()
    assert stats.holds == 3 and stats.max_hold_background_s >= 0.19 and stats.max_wait_urgent_s >= 0.1
    assert stats.max_hold_s == stats.max_hold_background_s
    # Where the longest hold was taken, and that it slept rather than computed.
    assert stats.max_hold_background_at == "test_ros_load_handling.train_step"
    assert stats.max_hold_background_cpu_s < 0.1 < stats.max_hold_background_s


def test_metered_lock_tells_a_hold_that_computed_from_one_that_waited():
    lock = lock_meter.MeteredLock()

    def busy():
        with lock:
            end = time.thread_time() + 0.1
            while time.thread_time() < end:
                pass

    busy()
    stats = lock.stats()
    assert stats.max_hold_urgent_at == "test_ros_load_handling.busy"
    assert stats.max_hold_urgent_cpu_s >= 0.09 and stats.max_hold_background_at == ""


def test_engines_in_a_slot_get_a_metered_lock_once():
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset

    engine = LERFEngine(make_preset("tiny"), "cpu")
    slot = EngineSlot(engine)
    lock = engine.lock
    assert isinstance(lock, lock_meter.MeteredLock)
    slot.set(engine)  # a reset puts the same engine back: the same lock
    assert engine.lock is lock and lock_meter.stats_of(engine) == lock_meter.LockStats()
    engine.status()
    assert lock_meter.stats_of(engine).holds >= 1
    d = diagnostics.training_diagnostic(engine.status(), "waiting", lock=lock_meter.stats_of(engine))
    assert float(d.value("longest engine-lock hold, queries/frames/status (s)")) >= 0.0
    assert d.value("longest engine-lock hold, queries/frames/status, taken in").startswith("engine.status (")


class _Engine:
    """Counts the frames that reach it."""

    def __init__(self):
        self.frames = []
        self.lock = threading.RLock()
        self.data_version = self.train_step = 0

    def add_frame(self, frame):
        from lerf_ros.core.engine import AddResult

        self.frames.append(frame)
        return AddResult(True, "first", len(self.frames))

    def step(self, max_steps=1):
        from lerf_ros.core.engine import StepStats

        return StepStats()

    def wait_for_data(self, version, timeout):
        time.sleep(0.01)
        return 0

    def wake(self):
        pass

    def status(self):
        from lerf_ros.core.engine import EngineStatus

        return EngineStatus(step=0, keyframes=len(self.frames), keyframes_pending=0, losses={},
                            rays_per_s=0.0, gpu_mem_allocated_mb=0.0, gpu_mem_peak_mb=0.0, last_error=None,
                            ready=False)


def _image(stamp_ns, w=32, h=24):
    msg = numpy_to_image(np.zeros((h, w, 3), np.uint8), "rgb8", ros=True)
    msg.header.stamp, msg.header.frame_id = stamp_from_ns(stamp_ns), "cam"
    return msg


def _info(w=32, h=24):
    from sensor_msgs.msg import CameraInfo

    msg = CameraInfo(width=w, height=h, distortion_model="plumb_bob")
    msg.k = [20.0, 0.0, w / 2 - 0.5, 0.0, 20.0, h / 2 - 0.5, 0.0, 0.0, 1.0]
    msg.d = [0.0] * 5
    return msg


def test_the_node_converts_a_30hz_static_camera_far_less_often(ros):
    engine = _Engine()
    node = TrainerNode(EngineSlot(engine), node_name="decimating_trainer", parameter_overrides=[
        Parameter("max_frame_rate_hz", value=10.0), Parameter("keyframe_max_interval_s", value=2.0)])
    ros.append(node)
    node.tf_buffer.set_transform_static(matrix_to_transform_msg(_pose(), "map", "cam", 0), "test")
    node._on_camera_info(_info())
    for i in range(90):  # 3 s at 30 Hz; the camera never moves
        node._on_image(_image(100 * NS + i * NS // 30), {"publication_sequence_number": i + 1 + i // 30})
    deadline = time.monotonic() + 5.0
    # until the pose thread and the add thread have both handed their frames on (the add thread may still
    # hold the last one when the pose queue is already empty)
    while (len(node.queue) or len(node.posed) or len(engine.frames) < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    received, drops = node.counters.snapshot()
    skipped = node.counters.not_keyframes()
    # Taken: the first image, then one per second (half of keyframe_max_interval_s); the rest skipped
    # before conversion, none of them a drop: the two within 100 ms (10 Hz) of each image taken by rate,
    # the others as static.
    assert received == 90 and drops == {}
    assert skipped[ingest.SKIPPED_RATE] == 6 and skipped[ingest.SKIPPED_STATIC] == 81
    assert len(engine.frames) == 3
    # Two sequence numbers were skipped by the "publisher": lost in DDS, in the diagnostics.
    assert node.delivery.lost_by_sequence == 2 and node.delivery.missing_by_stamp == 0
    status = node.status_msg()
    assert dict(zip(status.not_keyframe_reasons, status.not_keyframe_counts, strict=True))[
        ingest.SKIPPED_STATIC] == 81 and status.frames_dropped == 0


def test_the_image_subscription_gets_the_dds_sequence_number(ros):
    """Over DDS in one process: rclpy hands the message info to the two-argument callback."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    engine = _Engine()
    node = TrainerNode(EngineSlot(engine), node_name="sequence_trainer")
    ros.append(node)
    pub = node.create_publisher(Image, "camera/color/image_raw", 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        deadline = time.monotonic() + 10.0
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for i in range(5):
            pub.publish(_image(200 * NS + i * NS))
        while node.delivery.received < 5 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.remove_node(node)
    assert node.delivery.received == 5 and node.delivery.lost_by_sequence == 0
    assert node.delivery._seq == 5  # the publisher's sequence numbers reached the node
    assert rclpy.ok()
