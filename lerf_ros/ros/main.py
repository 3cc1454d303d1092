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

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from lerf_ros.compat import ros_install
from lerf_ros.core.encoders import is_demo_encoder
from lerf_ros.core.encoders.base import MissingWeightsError
from lerf_ros.ros import lifecycle
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.params import ParameterError

MODES = ("both", "trainer", "query")
#: Executor threads: sensor, control, status and query groups plus the TF listener each get one, one more is
#: spare, and every running Locate goal holds one (``query_node.MAX_LOCATE_GOALS``).
EXECUTOR_THREADS = 6 + 2
#: Bound on waiting for executor callbacks in flight (a query, a save) when stopping, s.
EXECUTOR_SHUTDOWN_S = 3.0


def check_ros_pieces(logger) -> None:
    """Stop start-up (MissingRosDependency, a ValueError) on a ROS 2 machine that lacks tf2_ros, cv_bridge
    or diagnostic_updater; elsewhere log which substitutes serve (a warning: a robot should not run on
    them)."""
    decision = ros_install.check_ros_pieces()
    (logger.warning if decision.substitutes else logger.info)(decision.message())


def demo_encoders(engine) -> list[str]:
    """Names of the engine's encoders that are the deterministic demo encoders."""
    return [enc.name for enc in (engine.clip_encoder, engine.dino_encoder) if is_demo_encoder(enc)]


def report_encoders(logger, engine) -> None:
    """Name the encoders in the start-up log; warn when a demo encoder answers the queries."""
    logger.info(f"encoders: CLIP {engine.clip_encoder.name!r}, DINO {engine.dino_encoder.name!r}")
    demo = demo_encoders(engine)
    if demo:
        logger.warning(
            f"DEMO encoder in use ({', '.join(demo)}): it embeds colour names, not language, so answers "
            "mean nothing on a robot. For real use: preset 'default' (or 'lite') with OpenCLIP and DINO "
            "weights (clip_checkpoint, dino_checkpoint)")


def build_nodes(mode: str) -> list:
    """The nodes for ``mode`` (rclpy must be initialised). Raises ParameterError, or ValueError when the
    nodes cannot start (MissingRosDependency, an engine that cannot be built)."""
    from lerf_ros.ros.query_node import QueryNode
    from lerf_ros.ros.trainer_node import TrainerNode

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("both", "trainer"):  # the trainer is what uses tf2_ros and cv_bridge
        check_ros_pieces(rclpy.logging.get_logger("lerf_node"))
    nodes = []
    try:
        slot = EngineSlot()
        if mode in ("both", "trainer"):
            nodes.append(TrainerNode(slot))
        if mode in ("both", "query"):
            # With a trainer in the process, every query reply is followed by a TrainingStatus.
            after_call = nodes[0].publish_status if mode == "both" else None
            query = QueryNode(slot if mode == "both" else None, after_call=after_call)
            nodes.append(query)
            # Only a configured query node has loaded its map (autostart; under a lifecycle manager the
            # query node answers from the map it loads, and the trainer trains its own model).
            if mode == "both" and query.slot is not slot and lifecycle.state_label(query) != "unconfigured":
                # map_path given to lerf_node: the map becomes the shared model, and training continues
                # from it. A map that failed to load puts the trainer in state "error" (no fresh map is
                # recorded or trained, queries say why) until load_map or reset.
                engine, frame = query.slot.get_with_frame("")
                resumed = nodes[0].resumed
                if engine is not None and (resumed.keyframes or resumed.step):
                    # The journal is the later state (it began from the map and carried on): a restart
                    # after a crash must not throw away what was recorded since.
                    nodes[0].get_logger().warning(
                        f"map_path {query.settings.map_path} not loaded: journal_dir "
                        f"{nodes[0].journal.root} holds a recording ({resumed.keyframes} keyframes, step "
                        f"{resumed.step}), which was resumed instead; empty it (or /lerf/reset) to start "
                        f"from the map again")
                elif engine is not None:
                    nodes[0].install_engine(engine, query.settings.map_path, frame)
                elif resumed.keyframes or resumed.step:  # the journal's recording is a map to go on with
                    nodes[0].get_logger().warning(f"{query.slot.error}; continuing the recording resumed "
                                                  f"from journal_dir {nodes[0].journal.root}")
                else:
                    nodes[0].refuse_map(query.slot.error)
                query.refusal = nodes[0].no_map_reason
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

    2 = invalid parameters (logged naming the parameter), an engine that cannot be built from them (e.g.
    missing weights: the error lists the paths searched), or a ROS 2 install lacking tf2_ros / cv_bridge;
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
        except ValueError as exc:  # valid parameters the engine cannot work with (encoder, weights ...),
            # or a ROS 2 install without tf2_ros / cv_bridge
            hint = ""
            if isinstance(exc.__cause__, MissingWeightsError):  # the core's message speaks of checkpoint_path
                hint = (". On the node: set clip_checkpoint and dino_checkpoint to absolute paths of the "
                        "weights files (DINO's are looked for after CLIP's)")
            logger.fatal(f"cannot start: {exc}{hint}")
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
        idle = executor is None or executor.shutdown(timeout_sec=EXECUTOR_SHUTDOWN_S)
        if idle:
            for node in nodes:
                node.destroy_node()
        else:  # destroying a service or publisher under a running callback can crash rcl: leave them
            logger.warning(f"callbacks still running after {EXECUTOR_SHUTDOWN_S:.0f} s; exiting without "
                           "destroying the nodes")
        if nodes:
            logger.info(f"stopped in {time.monotonic() - start:.1f} s")
        rclpy.try_shutdown()
    return 0


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` once `run` has returned (everything it made is stopped, destroyed and
    written: the journal fsyncs each entry as it goes). Logs and streams are flushed, then ``os._exit``:
    interpreter finalisation was seen to hang after "stopped" (once in a CI run, once with exit -11), which
    would turn a clean SIGINT into a SIGKILL from whoever waits for the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))


def main(args=None) -> None:
    """Console entry ``lerf_node``: trainer and query node sharing one model."""
    exit_process(run("both", sys.argv if args is None else args))


def trainer_main(args=None) -> None:
    """Console entry ``lerf_trainer_node``: the trainer alone (queries need ``lerf_node`` or a saved map)."""
    exit_process(run("trainer", sys.argv if args is None else args))


def query_main(args=None) -> None:
    """Console entry ``lerf_query_node``: the query node alone (give it ``map_path``)."""
    exit_process(run("query", sys.argv if args is None else args))


if __name__ == "__main__":
    main()
