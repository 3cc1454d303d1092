"""``lerf_node``: the trainer and the query node in ONE process sharing one engine.

Sharing the process is what lets a query read the model being trained (under the engine's brief lock)
without copying it. ``run(mode, args)`` is also what ``lerf_trainer_node``, ``lerf_query_node`` and the
no-``ros2 launch`` starter (``lerf_ros.compat.launcher``) call.

Shutdown (SIGINT or SIGTERM, e.g. Ctrl-C or ``ros2 launch`` / systemd stopping the process): rclpy's signal
handlers shut the context down, which ends ``executor.spin``; then, in this order, each node's threads
are stopped (training worker, ingest thread: bounded joins), the executor is shut down, the nodes are
destroyed and ``rclpy.try_shutdown`` runs. The exit status is 0 for a signal-initiated stop, like any
clean stop: the process did what it was asked. A second signal while stopping exits at once with the
shell's convention 128 + signal number (130 for SIGINT, 143 for SIGTERM), for a user who does not want
to wait for the (bounded) clean-up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.params import ParameterError

MODES = ("both", "trainer", "query")
#: Executor threads: sensor, control, status and query groups plus the TF listener each get one.
EXECUTOR_THREADS = 6
#: Bound on waiting for executor callbacks in flight (a query, a save) when stopping, s.
EXECUTOR_SHUTDOWN_S = 3.0


def build_nodes(mode: str) -> list:
    """The nodes for ``mode`` (rclpy must be initialised). Raises ParameterError."""
    from lerf_ros.ros.query_node import QueryNode
    from lerf_ros.ros.trainer_node import TrainerNode

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    nodes = []
    try:
        slot = EngineSlot()
        if mode in ("both", "trainer"):
            nodes.append(TrainerNode(slot))
        if mode in ("both", "query"):
            query = QueryNode(slot if mode == "both" else None)
            nodes.append(query)
            if mode == "both" and query.slot is not slot:
                # map_path given to lerf_node: the map becomes the shared model, and training continues
                # from it; a map that failed to load leaves the fresh model (the error was logged).
                if query.slot.get() is not None:
                    nodes[0].install_engine(query.slot.get(), query.settings.map_path)
                query.slot = slot
    except BaseException:
        destroy_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes) -> None:
    """Stop each node's own threads (``node.shutdown()`` where it has one); nodes stay usable to destroy."""
    for node in nodes:
        shutdown = getattr(node, "shutdown", None)
        if shutdown is not None:
            shutdown()


def destroy_nodes(nodes) -> None:
    stop_nodes(nodes)
    for node in nodes:
        node.destroy_node()


def _second_signal_exits_at_once() -> None:
    """While cleaning up, a second SIGINT / SIGTERM ends the process at once (128 + signum) instead of
    raising KeyboardInterrupt in the middle of the clean-up. Python allows this in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return

    def hard_exit(signum, _frame):
        sys.stderr.write(f"lerf_node: second signal {signum} while stopping, exiting now\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, hard_exit)


def run(mode: str = "both", args: Sequence[str] | None = None) -> int:
    """Initialise rclpy with ``args`` (``--ros-args`` ...), build and spin the nodes; return an exit status.

    2 = invalid parameters (logged naming the parameter) or an engine that cannot be built from them,
    0 = clean shutdown, SIGINT and SIGTERM included (see the module docstring for the order).
    """
    rclpy.init(args=list(args) if args is not None else None)
    logger = rclpy.logging.get_logger("lerf_node")
    nodes: list = []
    executor = None
    try:
        try:
            nodes = build_nodes(mode)
        except ParameterError as exc:
            logger.fatal(f"invalid parameter, not starting: {exc}")
            return 2
        except ValueError as exc:  # valid parameters the engine cannot work with (encoder, weights ...)
            logger.fatal(f"cannot start: {exc}")
            return 2
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        for node in nodes:
            executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        # A signal that shuts the context down while spin builds its next wait set surfaces as an
        # RCLError ("the given context is not valid"): that is a shutdown, anything else a real error.
        if rclpy.ok():
            raise
    finally:
        _second_signal_exits_at_once()
        start = time.monotonic()
        if nodes:
            logger.info("stopping")
        stop_nodes(nodes)
        if executor is not None:
            executor.shutdown(timeout_sec=EXECUTOR_SHUTDOWN_S)
        for node in nodes:
            node.destroy_node()
        if nodes:
            logger.info(f"stopped in {time.monotonic() - start:.1f} s")
        rclpy.try_shutdown()
    return 0


def main(args=None) -> int:
    """Console entry ``lerf_node``: trainer and query node sharing one model."""
    return run("both", sys.argv if args is None else args)


def trainer_main(args=None) -> int:
    """Console entry ``lerf_trainer_node``: the trainer alone (queries need ``lerf_node`` or a saved map)."""
    return run("trainer", sys.argv if args is None else args)


def query_main(args=None) -> int:
    """Console entry ``lerf_query_node``: the query node alone (give it ``map_path``)."""
    return run("query", sys.argv if args is None else args)


if __name__ == "__main__":
    sys.exit(main())
