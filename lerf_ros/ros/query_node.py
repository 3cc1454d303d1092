"""The query node: ``lerf/query`` (lerf_ros/srv/Query) and ``lerf/locate`` (lerf_ros/action/Locate) over the
live engine or a saved map.

Live mode (same process as the trainer, ``lerf_node``): answers from the ``EngineSlot`` the trainer trains;
the engine takes its lock inside ``query`` only briefly, so training goes on. Standalone mode
(``map_path`` set, query node alone): loads ``LERFEngine.load(map_path)``, no trainer runs; a map that
cannot be loaded is logged and every reply says why (RESULT_ERROR), the node stays up.

Answers are in the frame of the map's data (``EngineSlot.get_with_frame``): a loaded map's recorded world
frame (``map_io``; a mismatch with ``world_frame`` is logged as a warning at load), else ``world_frame``.
Header stamps are the node clock's (``/clock`` with ``use_sim_time``).

Every answer the engine gives also goes to RViz: ``lerf/relevancy_cloud`` (PointCloud2, transient local so
a late RViz still gets it) always carries the answer's relevancy cloud, whatever the request's
``with_cloud`` (which only decides whether the reply carries it too); ``lerf/target_markers`` (one
MarkerArray, transient local) starts with a DELETEALL that clears the previous answer, then a sphere and a
label per target. Refused requests (invalid, no model) publish nothing.

Requests never raise to the client; every reply carries a ``result`` code:
- RESULT_INVALID_REQUEST: the request is checked here, in full, before the engine sees it
  (``parse_request``);
- RESULT_NOT_READY / RESULT_FOUND / RESULT_NOT_FOUND: from the engine's answer
  (``messages.query_result_code``);
- RESULT_ERROR: no model and none coming (a map that failed to load), or an exception inside the query. A
  ValueError from the engine counts here too: the engine also raises ValueError for internal faults (an
  encoder returning bad embeddings), and everything a request can get wrong is refused before.
``after_call`` (``lerf_node``: the trainer's ``publish_status``) runs after every reply.

``lerf/locate`` asks the same question through the same path (``_answer``: same checks, same engine call,
same RViz output) again and again until found or its timeout (the loop: ``ros/locate.py``). Its goals run in
a reentrant callback group of their own, so ``lerf/query`` (its own group) and the trainer's services stay
responsive while a goal waits; at most ``MAX_LOCATE_GOALS`` run at once (each holds an executor thread), more
are rejected, as are goals that break a rule (``parse_goal``): rejection is immediate, which a planner can
act on without waiting for a result. ``shutdown()`` ends running goals (aborted) within ``locate.POLL_S``
plus any query in flight.

``/diagnostics`` (1 Hz, ``compat.diagnostics``): task "model", ERROR while there is no model (a map that
failed to load), WARN while a demo encoder answers (``ros/diagnostics.model_diagnostic``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from lerf_ros.compat import diagnostics as compat_diagnostics
from lerf_ros.core.language.query import MAX_RESULTS_LIMIT
from lerf_ros.core.training.worker import set_torch_threads
from lerf_ros.ros import diagnostics, lifecycle, map_io
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.locate import LocateLoop, Progress
from lerf_ros.ros.messages import (
    RESULTS,
    answer_markers,
    empty_cloud,
    fill_locate_result,
    fill_query_response,
    fill_refusal,
    locate_feedback,
)
from lerf_ros.ros.params import QUERY, QUERY_NODE_NAME, declare_and_resolve

_LATCHED_CLOUD = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                            reliability=ReliabilityPolicy.RELIABLE)
# One MarkerArray is one whole answer (DELETEALL first), so the last one is all a late subscriber needs.
_LATCHED_MARKERS = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                              reliability=ReliabilityPolicy.RELIABLE)
MAX_NEGATIVES = 32
#: Locate goals running at once; each holds an executor thread while it runs (``main.EXECUTOR_THREADS``).
MAX_LOCATE_GOALS = 2
_UNCONFIGURED = "no model: the node is not configured (lifecycle)"


class InvalidRequest(ValueError):
    """A Query request that is refused with RESULT_INVALID_REQUEST; the text names the field and value."""


@dataclass(frozen=True)
class QueryArgs:
    """A checked request: stripped text and negatives, threshold (None = the node's query_threshold)."""

    text: str
    negatives: tuple[str, ...]
    threshold: float | None
    with_cloud: bool
    max_results: int


@dataclass(frozen=True)
class LocateArgs:
    """A checked Locate goal: the query it repeats (no cloud in the replies) and its timeout, s."""

    query: QueryArgs
    timeout_s: float


def parse_request(request, max_chars: int) -> QueryArgs:
    """Check a ``Query.Request`` against everything the engine would refuse; InvalidRequest otherwise.

    text: non-empty after stripping, at most ``max_chars``; negatives: blank ones dropped, at most
    MAX_NEGATIVES of at most ``max_chars`` each; threshold: finite and <= 1 (<= 0: node default);
    max_results: 1..MAX_RESULTS_LIMIT (the core's bound).
    """
    return _parse_query(request, bool(request.with_cloud), max_chars)


def parse_goal(goal, max_chars: int) -> LocateArgs:
    """Check a ``Locate.Goal``: the Query rules (``parse_request``) on its text, negatives, threshold and
    max_results, and timeout_s finite and > 0; InvalidRequest naming the field otherwise."""
    query = _parse_query(goal, False, max_chars)
    timeout_s = float(goal.timeout_s)
    if not (math.isfinite(timeout_s) and timeout_s > 0.0):
        raise InvalidRequest(f"timeout_s: {timeout_s} is not a finite number of seconds > 0")
    return LocateArgs(query, timeout_s)


def _parse_query(request, with_cloud: bool, max_chars: int) -> QueryArgs:
    text = str(request.text).strip()
    if not text:
        raise InvalidRequest("text: empty query text")
    if len(text) > max_chars:
        raise InvalidRequest(f"text: query text has {len(text)} characters; the limit (max_query_chars) is "
                             f"{max_chars}")
    negatives = tuple(n for n in (str(v).strip() for v in request.negatives) if n)
    if len(negatives) > MAX_NEGATIVES or any(len(n) > max_chars for n in negatives):
        longest = max((len(n) for n in negatives), default=0)
        raise InvalidRequest(f"negatives: at most {MAX_NEGATIVES} negatives of <= {max_chars} characters, "
                             f"got {len(negatives)} of up to {longest}")
    threshold = float(request.threshold)
    if not math.isfinite(threshold) or threshold > 1.0:
        raise InvalidRequest(f"threshold: {threshold} is not a confidence in [0, 1] (<= 0: node default)")
    max_results = int(request.max_results)
    if not 1 <= max_results <= MAX_RESULTS_LIMIT:
        raise InvalidRequest(f"max_results: {max_results} is not in 1..{MAX_RESULTS_LIMIT}")
    return QueryArgs(text, negatives, threshold if threshold > 0.0 else None, with_cloud, max_results)


def load_map(path: str, device: str) -> tuple[object | None, str]:
    """(engine, '') or (None, why) for a map directory (its world frame: ``map_io.read_world_frame``)."""
    import os

    from lerf_ros.core.engine import LERFEngine

    if not os.path.isdir(path):
        return None, f"map_path {path!r} does not exist or is not a directory"
    try:
        return LERFEngine.load(path, device=device), ""
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"map_path {path!r} could not be loaded: {exc}"


class QueryNode(LifecycleNode):
    """Serves ``lerf/query``; publishes the last answer's cloud and marker. A lifecycle node
    (``ros/lifecycle.py``): configure loads the map (``map_path``) or takes the shared live engine; only an
    active node answers (otherwise RESULT_ERROR "not active", Locate goals rejected); cleanup drops a loaded
    map and releases CUDA's cache.

    slot: the live engine shared with a trainer in this process. With ``map_path`` set the node loads the
    map into a slot of its own; ``lerf_node`` (``main.build_nodes``) then hands that map to the trainer and
    gives the node the shared slot back, so both keep working on one model.
    after_call: called after every reply (``lerf_node`` publishes the TrainingStatus there).
    refusal: why no query can be answered now ('' = answer); ``lerf_node`` sets the trainer's
    ``no_map_reason`` (a ``map_path`` that did not load) so that no answer comes from an empty map.
    Raises ParameterError on an invalid parameter; with ``autostart`` the node is active on return.
    """

    def __init__(self, slot: EngineSlot | None = None, *, node_name: str = QUERY_NODE_NAME,
                 after_call: Callable[[], None] | None = None, refusal: Callable[[], str] | None = None,
                 **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        lifecycle.guard_change_state(self)
        self.after_call = after_call
        self.refusal = refusal
        self.params = declare_and_resolve(self, QUERY)
        self.settings = self.params.query
        self._shared_slot = slot
        self.slot = EngineSlot(None, _UNCONFIGURED)
        self._active = threading.Event()
        from lerf_ros.srv import Query

        group = MutuallyExclusiveCallbackGroup()
        # Plain publishers, not lifecycle ones: they publish only answers, and an inactive node gives none.
        self.cloud_pub = self.create_publisher(PointCloud2, "lerf/relevancy_cloud", _LATCHED_CLOUD)
        self.marker_pub = self.create_publisher(MarkerArray, "lerf/target_markers", _LATCHED_MARKERS)
        # The service and the action server exist in every state (a client waiting for them keeps its
        # connection); while not active they refuse (RESULT_ERROR "not active", goals rejected).
        self.create_service(Query, "lerf/query", self._on_query, callback_group=group)
        from lerf_ros.action import Locate

        self._stopping = threading.Event()
        self._goals_lock = threading.Lock()
        self._goals = 0
        # Reentrant: a goal's cancel request and new goals must get through while a goal runs.
        self.locate_server = ActionServer(
            self, Locate, "lerf/locate", self._execute_locate, goal_callback=self._on_locate_goal,
            cancel_callback=lambda _goal: CancelResponse.ACCEPT, callback_group=ReentrantCallbackGroup())
        self._model_source = self.settings.map_path or "live (the trainer in this process)"
        self.diagnostics, diagnostics_real = compat_diagnostics.make_updater(self)
        self.diagnostics.setHardwareID(self.params.device)  # the task names the engine's device itself
        self.diagnostics.add(diagnostics.MODEL_TASK,
                             compat_diagnostics.guarded(self._diagnose_model, self.get_logger()))
        self.get_logger().info(f"/diagnostics: {compat_diagnostics.describe(diagnostics_real)}")
        if self.params.values["autostart"]:
            lifecycle.autostart(self, lambda: None)
        else:
            self.get_logger().info("autostart is false: unconfigured, waiting for a lifecycle manager "
                                   "(configure, then activate)")

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load ``map_path`` or take the live engine. Never a FAILURE: a map that fails to load is logged
        and every query is answered RESULT_ERROR with the reason (as before the node was managed), which
        tells a client more than an unconfigured node would."""
        map_path = self.settings.map_path
        if self._shared_slot is None:  # the query node alone: nothing trains in this process
            set_torch_threads(self.settings.torch_threads, self.get_logger().info, trains=False)
        if map_path:
            engine, error = load_map(map_path, self.params.device)
            frame, warning = map_io.answer_frame(map_io.read_world_frame(map_path), self.settings.world_frame)
            self.slot = EngineSlot(engine, error, frame if engine is not None else "")
            if error:
                self.get_logger().error(error + "; the node stays up and answers RESULT_ERROR")
            else:
                self.get_logger().info(f"loaded the map at {map_path} (frame '{frame}')")
                if warning:
                    self.get_logger().warning(f"{map_path}: {warning}")
                from lerf_ros.ros.main import report_encoders

                report_encoders(self.get_logger(), engine)
                threading.Thread(target=self._warm_up, args=(engine,), name="lerf_query_warm_up",
                                 daemon=True).start()
        elif self._shared_slot is not None:
            self.slot = self._shared_slot
        else:
            self.slot = EngineSlot(None, "no model: start with map_path or in one process with the trainer "
                                         "(lerf_node)")
            self.get_logger().error(self.slot.error)
        self.get_logger().info("configured")
        return lifecycle.SUCCESS

    def _warm_up(self, engine) -> None:
        """A loaded map's query caches, built off the executor (`LERFEngine.warm_up_queries`); a failure
        only costs the first query its speed."""
        try:
            seconds = engine.warm_up_queries()
        except Exception as exc:  # the node answers queries either way
            self.get_logger().warning(f"query warm-up failed ({type(exc).__name__}: {exc}); the first "
                                      "query builds its caches itself")
        else:
            self.get_logger().info(f"query caches built in {seconds:.1f} s")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active.set()
        self.get_logger().info("active: answering lerf/query and lerf/locate")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        # Running Locate goals end at their next query (RESULT_ERROR "not active": aborted).
        self._active.clear()
        self.get_logger().info("inactive: queries are refused until activated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active.clear()
        own = self.slot is not self._shared_slot  # a loaded map; the live engine is the trainer's
        self.slot = EngineSlot(None, _UNCONFIGURED)
        if own:
            lifecycle.release_cuda_cache()
        self.get_logger().info("cleaned up: unconfigured")
        return lifecycle.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active.clear()
        self.shutdown()
        return lifecycle.SUCCESS

    def _not_active(self) -> str:
        """'' when active, else why a request is refused."""
        if self._active.is_set():
            return ""
        return f"not active (lifecycle state '{lifecycle.state_label(self)}'): activate the node first"

    def _diagnose_model(self, stat):
        """diagnostic_updater task "model": the model answered from (or why there is none), encoders."""
        engine = self.slot.get()
        diagnostic = diagnostics.model_diagnostic(None if engine is None else engine.status(),
                                                  self._model_source, self.slot.error)
        return compat_diagnostics.fill_stat(stat, diagnostic)

    def _threshold(self) -> float:
        # Read live: query_threshold is the one dynamic parameter.
        return float(self.get_parameter("query_threshold").value)

    def _refuse(self, response, header: Header, code: int, message: str):
        fill_refusal(response, header, code, message)
        # rclpy throttles per call site and allows one severity per site: one call each.
        if code == RESULTS["error"]:
            self.get_logger().error(f"query error: {message}", throttle_duration_sec=2.0)
        else:
            self.get_logger().warning(f"query refused: {message}", throttle_duration_sec=2.0)
        return response

    def _on_query(self, request, response):
        try:
            return self._answer_request(request, response)
        finally:
            self._after("query")

    def _after(self, what: str) -> None:
        """``after_call`` once a reply or result is made; its failure is logged, never lost into the reply."""
        if self.after_call is None:
            return
        try:
            self.after_call()
        except Exception as exc:
            self.get_logger().error(f"after {what}: {type(exc).__name__}: {exc}", throttle_duration_sec=2.0)

    def _answer_request(self, request, response):
        try:
            args = parse_request(request, self.settings.max_query_chars)
        except InvalidRequest as exc:
            return self._refuse(response, self._header(), RESULTS["invalid_request"], str(exc))
        return self._answer(args, response)

    def _header(self, frame: str | None = None) -> Header:
        if frame is None:
            frame = self.slot.get_with_frame(self.settings.world_frame)[1]
        return Header(stamp=self.get_clock().now().to_msg(), frame_id=frame)

    def _answer(self, args: QueryArgs, response):
        """Answer a checked request into ``response`` (a ``Query.Response``): the one path of both
        ``lerf/query`` and every ``lerf/locate`` query."""
        engine, frame = self.slot.get_with_frame(self.settings.world_frame)
        header = self._header(frame)
        not_active = self._not_active()
        if not_active:
            return self._refuse(response, header, RESULTS["error"], not_active)
        if engine is None:
            return self._refuse(response, header, RESULTS["error"], self.slot.error or "no model loaded")
        refusal = self.refusal() if self.refusal is not None else ""
        if refusal:
            return self._refuse(response, header, RESULTS["error"], refusal)
        threshold = self._threshold() if args.threshold is None else args.threshold
        try:
            # The engine lock lets a query in ahead of the trainer's next step. The cloud is always
            # computed: RViz gets it whatever the request's with_cloud (it costs a capped point copy).
            result = engine.query(args.text, negatives=list(args.negatives), threshold=threshold,
                                  with_cloud=True, max_results=args.max_results)
        except Exception as exc:  # answered with RESULT_ERROR: the service never raises to the client
            return self._refuse(response, header, RESULTS["error"],
                                f"query {args.text[:60]!r} failed: {type(exc).__name__}: {exc}")
        fill_query_response(response, result, header)
        self.cloud_pub.publish(response.cloud)
        self.marker_pub.publish(answer_markers(args.text, response.targets, header))
        if not args.with_cloud:
            response.cloud = empty_cloud(header)
        return response

    def _on_locate_goal(self, goal) -> GoalResponse:
        try:
            parse_goal(goal, self.settings.max_query_chars)
        except InvalidRequest as exc:
            self.get_logger().warning(f"locate goal rejected: {exc}", throttle_duration_sec=2.0)
            return GoalResponse.REJECT
        not_active = self._not_active()
        if not_active:
            self.get_logger().warning(f"locate goal rejected: {not_active}", throttle_duration_sec=2.0)
            return GoalResponse.REJECT
        with self._goals_lock:
            if self._stopping.is_set() or self._goals >= MAX_LOCATE_GOALS:
                self.get_logger().warning(
                    f"locate goal rejected: {MAX_LOCATE_GOALS} goals already running"
                    if not self._stopping.is_set() else "locate goal rejected: the node is shutting down",
                    throttle_duration_sec=2.0)
                return GoalResponse.REJECT
            self._goals += 1  # released when the goal's execution ends
        return GoalResponse.ACCEPT

    def _execute_locate(self, goal_handle):
        from lerf_ros.action import Locate
        from lerf_ros.srv import Query

        try:
            args = parse_goal(goal_handle.request, self.settings.max_query_chars)

            def feedback(progress: Progress) -> None:
                goal_handle.publish_feedback(
                    locate_feedback(progress.best, progress.last, progress.attempts, progress.elapsed_s))

            loop = LocateLoop(lambda: self._answer(args.query, Query.Response()), feedback,
                              cancelled=lambda: goal_handle.is_cancel_requested,
                              stopping=self._stopping.is_set, clock=time.monotonic, wait=self._stopping.wait)
            outcome = loop.run(args.timeout_s)
            result = fill_locate_result(Locate.Result(), outcome.answer, outcome.attempts, outcome.message,
                                        self._header())
            if outcome.state == "succeeded":
                goal_handle.succeed()
            elif outcome.state == "canceled":
                goal_handle.canceled()
            else:
                goal_handle.abort()
            self.get_logger().info(f"locate {args.query.text[:60]!r}: {outcome.state} after "
                                   f"{outcome.attempts} queries: {outcome.message}")
            return result
        finally:
            with self._goals_lock:
                self._goals -= 1
            self._after("locate")

    def shutdown(self) -> None:
        """End running Locate goals (aborted at their next check) and reject new ones; the executor's
        bounded shutdown (``main.run``) then waits for them. Idempotent."""
        self._stopping.set()
