"""The /diagnostics publisher: the substitute publishes what diagnostic_updater's Updater publishes (one
DiagnosticArray on the absolute /diagnostics, statuses named "<node name>: <task>"), and a ROS 2 machine
without diagnostic_updater refuses the substitute."""

import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from lerf_ros.compat import diagnostics as compat_diagnostics
from lerf_ros.compat.ros_install import MissingRosDependency
from lerf_ros.ros.diagnostics import WARN, Diagnostic


@pytest.fixture
def nodes():
    rclpy.init()
    publisher = Node("diag_under_test", namespace="robot1")  # a namespace must not move /diagnostics
    listener = Node("diag_listener")
    executor = SingleThreadedExecutor()
    executor.add_node(publisher)
    executor.add_node(listener)
    arrays: list = []
    listener.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    try:
        yield publisher, executor, arrays
    finally:
        executor.shutdown()
        publisher.destroy_node()
        listener.destroy_node()
        rclpy.try_shutdown()


def spin_until(executor, predicate, timeout=5.0):
    import time

    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
    assert predicate()


def test_substitute_publishes_the_tasks_as_diagnostic_updater_does(nodes):
    node, executor, arrays = nodes
    updater = compat_diagnostics.UpdaterSubstitute(node, period=0.2)
    updater.setHardwareID("cpu")
    diagnostic = Diagnostic("camera input", WARN, "no image for 6.0 s", "/camera/color/image_raw",
                            (("image rate (Hz)", "0.00"), ("TF failures", "3")))
    calls = []

    def task(stat):
        calls.append(stat.name)
        return compat_diagnostics.fill_stat(stat, diagnostic)

    updater.add("camera input", task)
    # As the Updater: adding a task publishes it at once, OK "Node starting up", with the hardware id set.
    spin_until(executor, lambda: len(arrays) >= 1)
    first = arrays[0].status[0]
    assert (first.name, first.level, first.message) == ("diag_under_test: camera input", DiagnosticStatus.OK,
                                                       "Node starting up")
    assert first.hardware_id == "cpu" and calls == []
    # Then the timer runs the task and publishes its status.
    spin_until(executor, lambda: len(arrays) >= 3)
    status = arrays[-1].status[0]
    assert len(arrays[-1].status) == 1 and calls[0] == "camera input"
    assert status.name == "diag_under_test: camera input"
    assert (status.level, status.message) == (DiagnosticStatus.WARN, "no image for 6.0 s")
    assert status.hardware_id == "/camera/color/image_raw"
    assert [(kv.key, kv.value) for kv in status.values] == [("image rate (Hz)", "0.00"), ("TF failures", "3")]
    stamp = arrays[-1].header.stamp
    assert stamp.sec > 0  # stamped with the node clock


def test_make_updater_without_diagnostic_updater_uses_the_substitute_here(nodes, monkeypatch):
    node, _, _ = nodes
    for name in ("ROS_DISTRO", "ROS_VERSION", "AMENT_PREFIX_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(compat_diagnostics, "HAVE_DIAGNOSTIC_UPDATER", False)
    updater, real = compat_diagnostics.make_updater(node)
    assert not real and isinstance(updater, compat_diagnostics.UpdaterSubstitute)
    assert updater.period == 1.0 and updater.publisher.topic_name == "/diagnostics"
    assert "substitute" in compat_diagnostics.describe(real)


def test_make_updater_refuses_the_substitute_on_a_ros_machine(monkeypatch):
    monkeypatch.setattr(compat_diagnostics, "HAVE_DIAGNOSTIC_UPDATER", False)
    monkeypatch.setattr(compat_diagnostics, "DIAGNOSTIC_UPDATER_IMPORT_ERROR",
                        "ModuleNotFoundError: No module named 'diagnostic_updater'")
    monkeypatch.setenv("ROS_DISTRO", "jazzy")
    monkeypatch.setenv("ROS_VERSION", "2")
    # Refused before the node is touched (None would fail on first use).
    with pytest.raises(MissingRosDependency, match="ros-jazzy-diagnostic-updater"):
        compat_diagnostics.make_updater(None)


def test_a_failing_task_becomes_an_error_status_not_an_exception():
    logged = []

    class Logger:
        def error(self, text, throttle_duration_sec=None):
            logged.append(text)

    def broken(stat):
        raise RuntimeError("engine gone")

    stat = compat_diagnostics.guarded(broken, Logger())(compat_diagnostics.StatusSubstitute("training"))
    assert stat.level == DiagnosticStatus.ERROR
    assert stat.message == "diagnostics task failed: RuntimeError: engine gone" and logged == [stat.message]
