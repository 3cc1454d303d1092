"""``/diagnostics`` for the nodes: the real ``diagnostic_updater.Updater`` when importable; else, only on a
machine without ROS, ``UpdaterSubstitute`` (on a ROS 2 install a missing diagnostic_updater stops start-up,
see ``ros_install``; the PyPI wheels have diagnostic_msgs but no diagnostic_updater).

``make_updater(node)`` returns ``(updater, is_real)``; both answer the Updater API subset the nodes use:
``add(name, fn)`` (``fn(stat) -> stat``, the stat offering ``summary(level, message)``, ``add(key, value)``
and ``hardware_id``), ``setHardwareID``, ``update`` / ``force_update``. The substitute publishes what the
Updater publishes: every ``period_s`` one ``diagnostic_msgs/DiagnosticArray`` on the absolute topic
``/diagnostics`` (a node in a namespace still reports there), stamped with the node clock, one status per
task named ``"<node name>: <task>"`` and an OK "Node starting up" status when a task is added. It does not
declare the Updater's ``diagnostic_updater.*`` parameters.

``fill_stat(stat, diagnostic)`` writes a ``lerf_ros.ros.diagnostics.Diagnostic`` into either kind of stat;
``guarded(fn, logger)`` turns a task's exception into an ERROR status instead of stopping the executor.

rclpy and diagnostic_msgs are imported inside functions, so importing this module works without ROS.
"""

from __future__ import annotations

import threading

try:
    import diagnostic_updater as _diagnostic_updater
except ImportError as _exc:  # the substitute below may serve instead: see make_updater / ros_install
    _diagnostic_updater = None
    DIAGNOSTIC_UPDATER_IMPORT_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    DIAGNOSTIC_UPDATER_IMPORT_ERROR = None

#: True when the real diagnostic_updater imported; ``make_updater`` then returns its Updater.
HAVE_DIAGNOSTIC_UPDATER = _diagnostic_updater is not None
#: diagnostic_updater's default period, s (1 Hz).
PERIOD_S = 1.0
#: The topic diagnostic_updater publishes on (absolute) and its publisher depth.
TOPIC = "/diagnostics"
_QUEUE_DEPTH = 1


def _level_byte(level: int) -> bytes:
    return bytes([int(level)])


class StatusSubstitute:
    """diagnostic_updater.DiagnosticStatusWrapper subset: ``summary``, ``add``, and the status fields."""

    def __init__(self, name: str = "", hardware_id: str = ""):
        from diagnostic_msgs.msg import DiagnosticStatus

        self.name = name
        self.hardware_id = hardware_id
        self.level = DiagnosticStatus.ERROR
        self.message = "No message was set"
        self.values = []

    def summary(self, level, message: str) -> None:
        self.level = level
        self.message = str(message)

    def add(self, key: str, value) -> None:
        from diagnostic_msgs.msg import KeyValue

        self.values.append(KeyValue(key=str(key), value=str(value)))


class UpdaterSubstitute:
    """Runs the added tasks every ``period_s`` on a node timer and publishes their statuses together."""

    def __init__(self, node, period: float = PERIOD_S):
        from diagnostic_msgs.msg import DiagnosticArray

        if not period > 0:
            raise ValueError(f"diagnostics period must be positive, got {period}")
        self.node = node
        self.period = float(period)
        self.hwid = ""
        self._tasks: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self.publisher = node.create_publisher(DiagnosticArray, TOPIC, _QUEUE_DEPTH)
        self.timer = node.create_timer(self.period, self.update)

    def setHardwareID(self, hwid: str) -> None:
        self.hwid = str(hwid)

    def add(self, name: str, fn) -> None:
        """Add a task ``fn(stat) -> stat``; publishes it at once as OK "Node starting up" (as the Updater)."""
        from diagnostic_msgs.msg import DiagnosticStatus

        with self._lock:
            self._tasks.append((str(name), fn))
        stat = StatusSubstitute(str(name), self.hwid)
        stat.summary(DiagnosticStatus.OK, "Node starting up")
        self.publish([stat])

    def update(self) -> None:
        """Run every task and publish the array (what the timer calls)."""
        stats = []
        with self._lock:
            tasks = list(self._tasks)
        for name, fn in tasks:
            stats.append(fn(StatusSubstitute(name, self.hwid)))
        self.publish(stats)

    def force_update(self) -> None:
        self.update()

    def publish(self, stats) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        prefix = self.node.get_name()
        array.status = [DiagnosticStatus(level=s.level, name=f"{prefix}: {s.name}", message=s.message,
                                         hardware_id=s.hardware_id, values=list(s.values)) for s in stats]
        self.publisher.publish(array)


def make_updater(node, period_s: float = PERIOD_S, prefer_real: bool = True):
    """``(updater, is_real)``: ``diagnostic_updater.Updater(node, period_s)`` when importable (and
    ``prefer_real``), else ``UpdaterSubstitute``. On a machine with ROS 2 installed a diagnostic_updater that
    does not import raises ``ros_install.MissingRosDependency`` instead of falling back."""
    if HAVE_DIAGNOSTIC_UPDATER and prefer_real:
        return _diagnostic_updater.Updater(node, period=period_s), True
    if prefer_real:
        from lerf_ros.compat import ros_install

        ros_install.decide({"diagnostic_updater": DIAGNOSTIC_UPDATER_IMPORT_ERROR or "not imported"})
    return UpdaterSubstitute(node, period_s), False


def fill_stat(stat, diagnostic):
    """Write a ``Diagnostic`` (level, message, hardware id, values) into ``stat`` (either kind); return it."""
    stat.summary(_level_byte(diagnostic.level), diagnostic.message)
    stat.hardware_id = diagnostic.hardware_id
    for key, value in diagnostic.values:
        stat.add(key, value)
    return stat


def guarded(fn, logger):
    """``fn(stat) -> stat`` that reports its own exception as an ERROR status (logged, throttled) instead of
    raising into the executor, which would stop the node's spin."""
    def task(stat):
        try:
            return fn(stat)
        except Exception as exc:  # a status that cannot be made is itself the diagnosis
            text = f"diagnostics task failed: {type(exc).__name__}: {exc}"
            logger.error(text, throttle_duration_sec=10.0)
            stat.summary(_level_byte(2), text)
            return stat
    return task


def describe(is_real: bool) -> str:
    """One line for the start-up log: which publisher serves /diagnostics."""
    if is_real:
        return "diagnostic_updater"
    why = DIAGNOSTIC_UPDATER_IMPORT_ERROR or "substitute asked for"
    return f"lerf_ros.compat.diagnostics substitute ({why})"
