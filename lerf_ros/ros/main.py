"""``lerf_node``: the trainer and the query node in ONE process sharing one engine.

Sharing the process is what lets a query read the model being trained (under the engine's brief lock)
without copying it. ``run(mode, args)`` is also what ``lerf_trainer_node``, ``lerf_query_node`` and the
no-``ros2 launch`` starter (``lerf_ros.compat.launcher``) call.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.params import ParameterError

MODES = ("both", "trainer", "query")
#: Executor threads: sensor, control, status and query groups plus the TF listener each get one.
EXECUTOR_THREADS = 6


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


def destroy_nodes(nodes) -> None:
    for node in nodes:
        shutdown = getattr(node, "shutdown", None)
        if shutdown is not None:
            shutdown()
        node.destroy_node()


def run(mode: str = "both", args: Sequence[str] | None = None) -> int:
    """Initialise rclpy with ``args`` (``--ros-args`` ...), build and spin the nodes; return an exit status.

    2 = invalid parameters (logged naming the parameter) or an engine that cannot be built from them,
    0 = clean shutdown (SIGINT included).
    """
    rclpy.init(args=list(args) if args is not None else None)
    logger = rclpy.logging.get_logger("lerf_node")
    nodes: list = []
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
    finally:
        destroy_nodes(nodes)
        rclpy.try_shutdown()
    return 0


def main(args=None) -> int:
    """Console entry ``lerf_node``."""
    return run("both", sys.argv if args is None else args)


if __name__ == "__main__":
    sys.exit(main())
