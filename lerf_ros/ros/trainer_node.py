"""The recorder / trainer node: camera + TF in, an online LERF out.

A lifecycle node (``ros/lifecycle.py``): the engine is built on configure, the camera subscriptions, the
ingest thread and training run while active (deactivate: unsubscribed, training paused), cleanup drops the
engine. With ``autostart`` (default) the constructor does configure + activate.

Threads (nothing slow runs in an executor callback):
- ``sensor`` callback group (mutually exclusive): Image / CompressedImage, CameraInfo, depth. Callbacks
  convert and validate the message and put it on a bounded queue (drop-oldest, counted as "queue_full").
- ingest thread (owned): TF lookup of ``T_world_cam`` at the image stamp (waiting up to ``tf_timeout_s``,
  interpolated by the TF buffer); with a depth topic, the depth image of the same stamp (within
  ``depth_stamp_tolerance_s``) from a bounded buffer the depth callback fills, waiting up to
  ``depth_wait_s`` because depth may arrive after colour (no match: ingested without depth, counted as
  in TrainingStatus.frames_without_depth, not a drop); then ``engine.add_frame`` (a frame it does not keep
  as a keyframe is counted in frames_not_keyframe, not as a drop).
- training worker (``core.training.worker.TrainingWorker``, owned): ``engine.step`` in a loop; the engine
  computes keyframe features first and trains once ``min_keyframes`` keyframes have them.
- ``control`` group: pause / reset / save_map / load_map services; ``status`` group: the status timer and
  the state watch; the default group: the 1 Hz ``/diagnostics`` update (``compat.diagnostics``: tasks
  "camera input" and "training", mapped by ``ros/diagnostics.py`` from the same counters and engine status).

``lerf/status`` is published every ``1 / status_rate_hz`` s, after every pause / reset / save_map / load_map
reply (and, in ``lerf_node``, every query reply: ``QueryNode.after_call``), and within ``_STATE_WATCH_S`` of a
change of state (waiting / training / paused / ready / error) that no service caused, e.g. training starting
once enough keyframes have arrived. The worker has no state-change callback, so the state is polled.

Names are relative (``lerf/status``, ``camera/color/image_raw`` ...), so pushing the node into a namespace
moves all of them; TF stays on /tf and /tf_static. Stamps and timers use the node clock (``/clock`` with
``use_sim_time``).

Maps: ``save_map`` copies the model under the engine lock and writes it to disk after releasing it
(``map_io.save_map_dir``), so queries, ingest and status go on during the write; the map records the world
frame it is in. ``load_map`` uses a map in its recorded frame (TF lookups, status and answers), warning when
that is not ``world_frame``; a reset returns to ``world_frame``. ``load_map`` accepts a journal too.

Journal (``journal_dir``, ``core/journal.py``): on start the engine resumes what the directory holds
(keyframes, features, the last model checkpoint; damaged entries skipped, counted in the status and logged),
in the world frame the journal records, then records into it: every keyframe before ``add_frame`` returns,
features when computed, the model every ``journal_interval_s``, and once more on a clean shutdown. A reset
empties it; a loaded map replaces its content.
"""

from __future__ import annotations

import math
import threading
import time

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import SetBool, Trigger

from lerf_ros.compat import diagnostics as compat_diagnostics
from lerf_ros.compat import image as image_conv
from lerf_ros.compat import tf as compat_tf
from lerf_ros.core.frames import scene_region
from lerf_ros.core.frames.frame import Frame
from lerf_ros.core.training.worker import TrainingWorker
from lerf_ros.ros import diagnostics, ingest, lifecycle, map_io
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.messages import stamp_to_ns, training_status_msg
from lerf_ros.ros.params import TRAINER, TRAINER_NODE_NAME, ParameterError, declare_and_resolve

#: worker.state -> TrainingStatus state name.
_STATE_NAMES = {"stopped": "waiting", "waiting": "waiting", "training": "training", "paused": "paused",
                "ready": "ready", "error": "error"}
_LOG_THROTTLE_S = 5.0
#: Depth images kept beyond ``queue_size``: every queued colour frame can still find its depth, plus
#: slack for depth that runs ahead of the colour being ingested.
_DEPTH_SLACK = 8
#: Per-thread bound on joining the worker / ingest thread at shutdown, s.
_SHUTDOWN_TIMEOUT_S = 5.0
_NO_ENGINE = "no model: the trainer is not configured (lifecycle)"
#: Period of the state watch (publishes TrainingStatus when the state changed since the last one), s.
_STATE_WATCH_S = 0.1


def make_engine(resolved):
    """The engine for resolved parameters; a start-up error (ValueError naming what failed) otherwise."""
    import torch

    from lerf_ros.core.engine import LERFEngine

    if resolved.device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "cuda", "torch.cuda.is_available() is False on this machine")
    try:
        return LERFEngine(resolved.engine, device=resolved.device)
    except (ValueError, RuntimeError, OSError, ImportError) as exc:
        v = resolved.values
        raise ValueError(f"cannot build the engine (preset {v['preset']!r}, clip_encoder "
                         f"{resolved.engine.clip_encoder.target!r}, dino_encoder "
                         f"{resolved.engine.dino_encoder.target!r}, device {v['device']!r}): {exc}") from exc


class TrainerNode(LifecycleNode):
    """Subscribes to the camera, trains the shared engine, publishes ``lerf/status``. A lifecycle node
    (``ros/lifecycle.py``): configure builds the engine (encoders, weights) and starts the journal and the
    TF listener; activate subscribes to the camera and starts training; deactivate unsubscribes and pauses
    training; cleanup stops the worker, drops the engine and releases CUDA's cache.

    slot: the process's ``EngineSlot``; when None (or empty) configure builds an engine from the parameters.
    Raises ``ParameterError`` from the constructor on an invalid parameter; with ``autostart`` (default)
    the node is active on return, and an engine that cannot be built from valid parameters (e.g. an encoder
    module that does not import) raises ValueError, a journal_dir that cannot be used ParameterError.
    """

    def __init__(self, slot: EngineSlot | None = None, *, node_name: str = TRAINER_NODE_NAME, **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        lifecycle.guard_change_state(self)
        self.params = declare_and_resolve(self, TRAINER)
        self.settings = self.params.trainer
        self.slot = slot if slot is not None else EngineSlot()
        self.journal = None
        self.resumed = map_io.ResumeReport()  # what the journal gave the engine at start
        self.counters = ingest.DropCounter()
        self.queue = ingest.BoundedQueue(self.settings.queue_size)
        self.depths = ingest.DepthBuffer(self.settings.queue_size + _DEPTH_SLACK)
        self._camera_info = None  # (CameraIntrinsics | None, error text)
        self._lock = threading.Lock()  # guards _camera_info, _last_error, _paused, _active, worker swap
        self._last_error = ""
        self._last_log: dict[str, float] = {}
        self._paused = False
        self._active = False  # lifecycle state active: frames taken, the worker runs
        self._worker: TrainingWorker | None = None  # from configure to cleanup
        self._stop = threading.Event()  # the node is shutting down (for good)
        self._ingest_stop = threading.Event()  # ends the current activation's ingest thread
        self._ingest_thread: threading.Thread | None = None
        self._subscriptions_active: list = []
        self._status_timers: list = []
        self._configure_error: Exception | None = None
        self.tf_buffer = self.tf_listener = None
        self.tf_is_real = False
        # Serialises publish_status (timer, state watch and service threads) and guards _published_state.
        self._status_lock = threading.Lock()
        self._published_state = ""

        s = self.settings
        self._camera_info_name = self.resolve_topic_name(s.camera_info_topic)  # namespace included, for logs
        from lerf_ros.msg import TrainingStatus
        from lerf_ros.srv import MapPath

        self._sensor_group = MutuallyExclusiveCallbackGroup()
        self._status_group = MutuallyExclusiveCallbackGroup()
        control = MutuallyExclusiveCallbackGroup()
        # A plain publisher, not a lifecycle one: an inactive trainer still reports its state ("paused").
        self.status_pub = self.create_publisher(TrainingStatus, "lerf/status", 10)
        # The services exist in every state; without an engine (unconfigured) they refuse, and pause needs
        # an active node (``_refusal``).
        self.create_service(SetBool, "lerf/pause", self._on_pause, callback_group=control)
        self.create_service(Trigger, "lerf/reset", self._on_reset, callback_group=control)
        self.create_service(MapPath, "lerf/save_map", self._on_save, callback_group=control)
        self.create_service(MapPath, "lerf/load_map", self._on_load, callback_group=control)

        self._ingest_rate = diagnostics.IngestRate(time.monotonic())
        self.diagnostics, diagnostics_real = compat_diagnostics.make_updater(self)
        self.diagnostics.setHardwareID(self.params.device)  # each task names the engine's device itself
        for task, fn in ((diagnostics.INPUT_TASK, self._diagnose_input),
                         (diagnostics.TRAINING_TASK, self._diagnose_training)):
            self.diagnostics.add(task, compat_diagnostics.guarded(fn, self.get_logger()))
        self._diagnostics_real = diagnostics_real
        self._box_reported = None
        if self.params.values["autostart"]:
            lifecycle.autostart(self, lambda: self._configure_error)
        else:
            self.get_logger().info("autostart is false: unconfigured, waiting for a lifecycle manager "
                                   "(configure, then activate)")

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Build the engine (unless the slot holds one), start the journal, the TF listener, the status
        timers and a worker that waits for activate. A failure is logged and returns FAILURE (the error is
        kept for ``autostart`` to raise)."""
        self._configure_error = None
        built = False
        try:
            if self.slot.get() is None:
                self.slot.set(make_engine(self.params))
                built = True
            if self.params.journal is not None and self.journal is None:
                self._start_journal(self.params.journal)
            # MissingRosDependency (a ValueError) on a ROS 2 machine without tf2_ros.
            self.tf_buffer, self.tf_listener, self.tf_is_real = compat_tf.make_tf_buffer(self)
        except Exception as exc:  # ParameterError / ValueError from the parameters; anything the encoders
            # raise while loading: the transition fails with the reason logged, the node stays unconfigured
            self._configure_error = exc
            if self.journal is not None:  # started with the engine dropped below: stop recording into it
                self.slot.get().attach_journal(None)
                self.journal = None
            if built:
                self.slot.set(None, _NO_ENGINE)
            self.get_logger().error(f"configure failed, still unconfigured: {exc}")
            return lifecycle.FAILURE
        if built:
            from lerf_ros.ros.main import report_encoders

            report_encoders(self.get_logger(), self.slot.get())
        with self._lock:
            self._worker = self._new_worker()
        s = self.settings
        self._status_timers = [
            self.create_timer(1.0 / s.status_rate_hz, self.publish_status, callback_group=self._status_group),
            self.create_timer(_STATE_WATCH_S, self.publish_status_if_state_changed,
                              callback_group=self._status_group)]
        self.get_logger().info(
            f"training preset '{self.params.values['preset']}' on {self.params.device}; camera "
            f"{self.resolve_topic_name(s.image_topic)} ({s.image_transport}), world frame '{s.world_frame}', "
            f"TF {'tf2_ros' if self.tf_is_real else 'compat buffer'}; /diagnostics "
            f"{compat_diagnostics.describe(self._diagnostics_real)}")
        return lifecycle.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the camera, start the ingest thread and training (paused again if lerf/pause
        paused it)."""
        s = self.settings
        qos, group = qos_profile_sensor_data, self._sensor_group
        if s.image_transport == "compressed":
            image = (CompressedImage, s.image_topic.rstrip("/") + "/compressed", self._on_image)
        else:
            image = (Image, s.image_topic, self._on_image)
        topics = [image, (CameraInfo, s.camera_info_topic, self._on_camera_info)]
        if s.depth_topic:
            topics.append((Image, s.depth_topic, self._on_depth))
        subs = [self.create_subscription(kind, name, callback, qos, callback_group=group)
                for kind, name, callback in topics]
        self._subscriptions_active = subs
        self._ingest_stop = threading.Event()
        self._ingest_thread = threading.Thread(target=self._ingest_loop, args=(self._ingest_stop,),
                                               name="lerf-ingest", daemon=True)
        self._ingest_thread.start()
        with self._lock:
            self._active = True
            if self._worker.state == "stopped":
                self._worker.start()
            if self._paused:
                self._worker.pause()
            else:
                self._worker.resume()
        self.get_logger().info("active: taking frames from "
                               f"{self.resolve_topic_name(s.image_topic)} and training")
        self.publish_status()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe, end the ingest thread (frames queued are dropped) and pause training."""
        self._stop_ingest()
        with self._lock:
            self._active = False
            self._worker.pause()
        self.get_logger().info("inactive: training paused, no frames taken")
        self.publish_status()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and the TF listener, write the journal's checkpoint, drop the engine (GPU
        memory back: CUDA's cache released)."""
        self._stop_ingest()
        clean = self._stop_worker(_SHUTDOWN_TIMEOUT_S)
        self._release_engine(clean)
        self.get_logger().info("cleaned up: unconfigured, engine released")
        return lifecycle.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.shutdown()
        return lifecycle.SUCCESS

    def _stop_ingest(self) -> None:
        for sub in self._subscriptions_active:
            self.destroy_subscription(sub)
        self._subscriptions_active = []
        self._ingest_stop.set()
        thread = self._ingest_thread
        if thread is not None:
            thread.join(timeout=_SHUTDOWN_TIMEOUT_S)
            if thread.is_alive():
                self.get_logger().error(f"ingest thread did not stop within {_SHUTDOWN_TIMEOUT_S} s")
        self._ingest_thread = None
        self.queue.clear()
        self.depths.clear()

    def _stop_worker(self, timeout_s: float) -> bool:
        """Stop the training worker (False when it did not end within ``timeout_s``: logged)."""
        with self._lock:  # a reset / load_map in flight finishes first; none starts a worker after this
            self._active = False
            worker, self._worker = self._worker, None
            if worker is None:
                return True
            try:
                worker.stop(timeout=timeout_s)
            except RuntimeError as exc:
                self.get_logger().error(f"stopping training: {exc}")
                return False
        return True

    def _release_engine(self, clean: bool) -> None:
        for timer in self._status_timers:
            self.destroy_timer(timer)
        self._status_timers = []
        if self.tf_listener is not None:
            compat_tf.close_tf_listener(self.tf_listener)
        self.tf_buffer = self.tf_listener = None
        engine = self.slot.get()
        if self.journal is not None and engine is not None:
            if clean:
                engine.checkpoint_journal(force=True)  # a clean stop loses no training
            engine.attach_journal(None)
        self.journal = None
        self.slot.set(None, _NO_ENGINE)
        del engine
        lifecycle.release_cuda_cache()

    # ------------------------------------------------------------------ helpers
    @property
    def engine(self):
        return self.slot.get()

    def _start_journal(self, config) -> None:
        """Resume from ``journal_dir`` and record into it (``map_io.start_journal``); ParameterError naming
        journal_dir when the directory cannot be used or holds what this configuration cannot continue."""
        value = self.params.values["journal_dir"]
        try:
            self.journal, self.resumed, frame, warning = map_io.start_journal(
                self.slot.get(), config, self.settings.world_frame)
        except ValueError as exc:
            raise ParameterError("journal_dir", value, f"holds a recording this configuration cannot "
                                 f"continue ({exc}); move it away or set another journal_dir") from exc
        except OSError as exc:
            raise ParameterError("journal_dir", value, f"cannot be used: {exc}") from exc
        self.slot.set(self.slot.get(), frame="" if frame == self.settings.world_frame else frame)
        log = self.get_logger()
        if warning:
            log.warning(f"journal {config.dir}: {warning}")
        r = self.resumed
        log.info(f"journal {config.dir}: " + (f"resumed {r.summary()}" if r.keyframes or r.step or r.skipped
                                              else f"recording (checkpoint every {config.interval_s} s, at "
                                                   f"most {config.max_mb} MiB)"))
        if r.skipped:
            log.warning(f"journal {config.dir}: {len(r.skipped)} damaged entries skipped (not used): "
                        + "; ".join(r.skipped[:10]))

    def _record_frame(self, frame: str) -> None:
        """The journal records the world frame its map is in (read back on resume and by load_map)."""
        if self.journal is not None:
            try:
                map_io.write_map_info(self.journal.root, {"world_frame": frame, "saved_by": "journal"})
            except OSError as exc:
                self.get_logger().error(f"journal {self.journal.root}: cannot record the world frame: {exc}")

    def _new_worker(self) -> TrainingWorker:
        s = self.settings
        return TrainingWorker(self.slot.get(), steps_per_tick=s.steps_per_tick, max_steps=s.max_steps or None)

    def _drop(self, reason: str, detail: str, log_key: str | None = None) -> None:
        """Count a dropped frame; log it throttled per ``log_key`` (default: the reason)."""
        self.counters.drop(reason)
        now = time.monotonic()
        key = log_key or reason
        with self._lock:
            self._last_error = f"{reason}: {detail}"
            # Throttled per key (rclpy throttles per call site): a flood of one kind of drop must not
            # hide the first occurrence of another.
            log = now - self._last_log.get(key, -math.inf) >= _LOG_THROTTLE_S
            if log:
                self._last_log[key] = now
        if log:
            self.get_logger().warning(f"dropped frame ({reason}): {detail}")

    # ------------------------------------------------------------------ subscriptions (no blocking here)
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            entry = (ingest.intrinsics_from_camera_info(msg), "")
        except (ValueError, IndexError) as exc:
            entry = (None, str(exc))
        with self._lock:
            self._camera_info = entry

    def _on_depth(self, msg: Image) -> None:
        try:
            depth = image_conv.depth_to_metres(msg)
        except ValueError as exc:
            self._drop(ingest.BAD_DEPTH, str(exc))
            return
        self.depths.put(stamp_to_ns(msg.header.stamp), depth)

    def _on_image(self, msg) -> None:
        self.counters.received()
        with self._lock:
            info = self._camera_info
        if info is None:
            self._drop(ingest.NO_CAMERA_INFO, f"no CameraInfo yet on {self._camera_info_name}")
            return
        intrinsics, info_error = info
        if intrinsics is None:
            self._drop(ingest.BAD_INTRINSICS, info_error)
            return
        try:
            if isinstance(msg, CompressedImage):
                rgb = image_conv.compressed_to_rgb(msg)
            else:
                rgb = image_conv.image_to_rgb(msg)
        except ValueError as exc:
            self._drop(ingest.BAD_IMAGE, str(exc))
            return
        h, w = rgb.shape[:2]
        if (w, h) != (intrinsics.width, intrinsics.height):
            self._drop(ingest.SIZE_MISMATCH,
                       f"image is {w}x{h} but CameraInfo is {intrinsics.width}x{intrinsics.height}")
            return
        try:
            intrinsics.validate()
        except ValueError as exc:
            self._drop(ingest.BAD_INTRINSICS, str(exc))
            return
        if not msg.header.frame_id:
            self._drop(ingest.TF_MISSING, "image header has an empty frame_id")
            return
        pending = ingest.PendingFrame(rgb, intrinsics, msg.header.frame_id, stamp_to_ns(msg.header.stamp))
        if not self.queue.put(pending):
            self._drop(ingest.QUEUE_FULL, f"ingest queue full ({self.queue.maxlen}); dropped the oldest")

    # ------------------------------------------------------------------ ingest thread
    def _lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float):
        # Runs on the ingest thread, so waiting here never blocks the executor that feeds the TF buffer.
        return compat_tf.lookup_matrix(self.tf_buffer, target, source, stamp_ns, timeout_s)

    def _stopping(self) -> bool:
        """Shutting down or deactivating: a wait cut short now is not a dropped frame."""
        return self._stop.is_set() or self._ingest_stop.is_set()

    def _ingest_loop(self, stop: threading.Event) -> None:
        while not (stop.is_set() or self._stop.is_set()):
            item = self.queue.get(timeout=0.5)
            if item is None:
                continue
            try:
                self._ingest(item)
            except Exception as exc:  # a bug must not kill the thread: report it in the status
                self.get_logger().error(f"ingest failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=_LOG_THROTTLE_S)
                self._drop(ingest.BAD_FRAME, f"{type(exc).__name__}: {exc}")

    def _ingest(self, item: ingest.PendingFrame) -> None:
        s = self.settings
        # The engine and its frame together: a frame posed in the old map's frame never reaches a new map.
        engine, world_frame = self.slot.get_with_frame(s.world_frame)
        T_world_cam, reason, detail = ingest.lookup_pose(self._lookup, world_frame, item.frame_id,
                                                         item.stamp_ns, s.tf_timeout_s, compat_tf)
        if self._stopping():  # a TF wait cut short by shutdown / deactivate is not a dropped frame
            return
        if T_world_cam is None:
            # Per frame id: a camera frame that has never had TF is news even while another one is failing.
            self._drop(reason, detail, f"{reason}:{item.frame_id}")
            return
        depth = None
        if s.depth_topic:
            # Waiting here (ingest thread) never blocks the executor that delivers the depth message.
            depth = self.depths.wait_match(item.stamp_ns, round(s.depth_stamp_tolerance_s * 1e9),
                                           s.depth_wait_s)
            if self._stopping():
                return
            if depth is None:
                self.counters.note(ingest.NO_DEPTH_MATCH)
        if depth is not None and depth.shape != item.image.shape[:2]:
            self._drop(ingest.BAD_DEPTH, f"depth {depth.shape} does not match image {item.image.shape[:2]}")
            depth = None
        if engine is None or self.slot.get_with_frame(s.world_frame) != (engine, world_frame):
            return  # a map was loaded (or reset) while this frame waited for TF / depth: not for the new one
        try:
            frame = Frame(item.image, item.intrinsics, T_world_cam, item.stamp_ns, depth)
            result = engine.add_frame(frame)
        except ValueError as exc:
            self._drop(ingest.BAD_FRAME, str(exc))
            return
        if not result.keyframe:
            # Not a drop: the frame was fine, the keyframe selector did not keep it ("redundant", "blurred").
            self.counters.not_keyframe(result.reason)

    # ------------------------------------------------------------------ services
    def _refusal(self, need_active: bool = False) -> str:
        """'' when the lifecycle state allows the service, else why not."""
        state = lifecycle.state_label(self)
        if self.slot.get() is None or self._worker is None:
            return f"not configured (lifecycle state '{state}'): configure the node first"
        if need_active and not self._active:
            return f"not active (lifecycle state '{state}'): activate the node first"
        return ""

    def _on_pause(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._lock:
            refusal = self._refusal(need_active=True)
            if not refusal:
                self._paused = bool(request.data)
                if self._paused:
                    self._worker.pause()
                else:
                    self._worker.resume()
        response.success = not refusal
        response.message = refusal or ("paused" if request.data else "resumed")
        if refusal:
            self.get_logger().warning(f"lerf/pause refused: {refusal}", throttle_duration_sec=2.0)
        self.publish_status()
        return response

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        refusal = self._refusal()
        if refusal:
            response.success, response.message = False, refusal
            self.get_logger().warning(f"lerf/reset refused: {refusal}", throttle_duration_sec=2.0)
            return response
        self.queue.clear()
        with self._lock:
            self._swap_worker(self._reset_engine)
            self.depths.clear()
            self._last_error = ""
        self.counters.reset()
        self.tf_buffer.clear()  # as after a time jump: transforms of the old run must not pose new frames
        response.success, response.message = True, "map cleared; waiting for keyframes"
        self.publish_status()
        return response

    def _swap_worker(self, change) -> None:
        """Stop the worker, apply ``change()`` (reset or a new engine), make a fresh worker on the slot's
        engine, started (paused again if it was) only while the node is active. The caller holds
        ``self._lock``. After ``shutdown`` or cleanup only ``change()`` runs: no worker is made again."""
        if self._stop.is_set() or self._worker is None:
            change()
            return
        self._worker.stop()
        change()
        self._worker = self._new_worker()
        if self._active:
            self._worker.start()
            if self._paused:
                self._worker.pause()

    def _reset_engine(self) -> None:
        engine = self.slot.get()
        engine.reset()  # empties the journal too
        self.slot.set(engine)  # an empty model: back in the world_frame parameter's frame
        self._record_frame(self.settings.world_frame)

    def _on_save(self, request, response):
        path = request.path
        try:
            refusal = self._refusal()
            if refusal:
                raise ValueError(refusal)
            if not path.startswith("/"):
                raise ValueError(f"path must be absolute, got {path!r}")
            engine, frame = self.slot.get_with_frame(self.settings.world_frame)
            # Snapshot under the engine lock, disk write off it: queries, ingest and status go on meanwhile.
            saved = map_io.save_map_dir(engine, path, frame)
            response.success = True
            response.message = (f"saved {saved.keyframes} keyframes, step {saved.step} to {path} "
                                f"(frame '{saved.world_frame}')")
        except (OSError, ValueError, RuntimeError) as exc:
            response.success, response.message = False, f"save to {path!r} failed: {exc}"
        self.get_logger().info(response.message)
        self.publish_status()
        return response

    def _on_load(self, request, response):
        from lerf_ros.core.engine import LERFEngine

        path = request.path
        try:
            refusal = self._refusal()
            if refusal:
                raise ValueError(refusal)
            if not path.startswith("/"):
                raise ValueError(f"path must be absolute, got {path!r}")
            engine, skipped = map_io.load_map_or_journal(LERFEngine, path, self.params.device)
        except (OSError, ValueError, RuntimeError) as exc:
            response.success = False
            response.message = f"load of {path!r} failed, kept the running map: {exc}"
            self.get_logger().error(response.message)
        else:
            frame, warning = map_io.answer_frame(map_io.read_world_frame(path), self.settings.world_frame)
            if warning:
                self.get_logger().warning(f"{path}: {warning}")
            response.success = True
            response.message = self.install_engine(engine, path, frame) + (f"; {skipped}" if skipped else "")
        self.publish_status()
        return response

    def install_engine(self, engine, source: str, frame: str = "") -> str:
        """Make ``engine`` (e.g. a loaded map) the one trained and queried; training goes on from it.
        ``frame``: the world frame of its data ("" = the world_frame parameter)."""
        self.queue.clear()
        with self._lock:
            old = self.slot.get()
            self._swap_worker(lambda: self.slot.set(engine, frame=frame))
        if self.journal is not None and old is not engine:
            # The old engine stops recording before the journal is emptied for the new one; the new one's
            # keyframes added meanwhile are in the snapshot attach_journal writes (off the node lock).
            old.attach_journal(None)
            try:
                engine.attach_journal(self.journal)
            except OSError as exc:
                self.get_logger().error(f"journal {self.journal.root}: cannot record the loaded map: {exc}")
            self._record_frame(frame or self.settings.world_frame)
        st = engine.status()
        message = (f"loaded {st.keyframes} keyframes, step {st.step} from {source} "
                   f"(frame '{frame or self.settings.world_frame}')")
        self.get_logger().info(message)
        return message

    # ------------------------------------------------------------------ status
    def state_name(self) -> str:
        """TrainingStatus state: the worker's; "paused" while the node is inactive (its worker is paused)."""
        with self._lock:
            return _STATE_NAMES[self._worker.state] if self._worker is not None else "waiting"

    def publish_status(self) -> None:
        """Publish the TrainingStatus; nothing while unconfigured (there is no engine to report on)."""
        if self.slot.get() is None:
            return
        with self._status_lock:
            msg = self.status_msg()
            self._published_state = msg.state_name
            self.status_pub.publish(msg)

    def publish_status_if_state_changed(self) -> None:
        """Publish now when the state differs from the last published one (the state watch timer)."""
        with self._status_lock:
            published = self._published_state
        if self.state_name() != published:
            self.publish_status()

    def status_msg(self):
        """The current ``TrainingStatus`` (engine status + this node's counters and state)."""
        engine, world_frame = self.slot.get_with_frame(self.settings.world_frame)
        received, drops = self.counters.snapshot()
        notes = self.counters.notes()
        with self._lock:
            node_error = self._last_error
            worker_error = self._worker.last_error if self._worker is not None else None
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=world_frame)
        engine_status = engine.status()  # the engine lock lets status() in ahead of training steps
        if engine_status.scene_box is not None and engine_status.scene_box != self._box_reported:
            self._box_reported = engine_status.scene_box
            lo, hi = (tuple(round(v, 2) for v in c) for c in engine_status.scene_box)
            source = scene_region.describe_source(engine_status.scene_box_source)
            self.get_logger().info(f"scene box ({source}): "
                                   f"min {lo} max {hi} m in '{world_frame}'")
        return training_status_msg(engine_status, self.state_name(), header, received, drops,
                                   worker_error or node_error,
                                   frames_without_depth=notes.get(ingest.NO_DEPTH_MATCH, 0),
                                   not_keyframe=self.counters.not_keyframes())

    def _diagnose_input(self, stat):
        """diagnostic_updater task "camera input": image rate, TF failures, drops and not-kept frames."""
        received, drops = self.counters.snapshot()
        window = self._ingest_rate.sample(time.monotonic(), received, sum(drops.values()))
        diagnostic = diagnostics.input_diagnostic(
            self.state_name(), window, received, drops, self.counters.not_keyframes(),
            self.counters.notes().get(ingest.NO_DEPTH_MATCH, 0),
            hardware_id=self.resolve_topic_name(self.settings.image_topic))
        return compat_diagnostics.fill_stat(stat, diagnostic)

    def _diagnose_training(self, stat):
        """diagnostic_updater task "training": state, step, keyframes, GPU memory, encoders."""
        engine = self.slot.get()
        if engine is None:  # waiting for a lifecycle manager (or cleaned up): expected, but not training
            label = lifecycle.state_label(self)
            return compat_diagnostics.fill_stat(stat, diagnostics.Diagnostic(
                diagnostics.TRAINING_TASK, diagnostics.WARN, f"not configured (lifecycle state '{label}')",
                "none", (("lifecycle state", label),)))
        with self._lock:
            error = (self._worker.last_error if self._worker is not None else None) or self._last_error
        diagnostic = diagnostics.training_diagnostic(engine.status(), self.state_name(), error)
        return compat_diagnostics.fill_stat(stat, diagnostic)

    def shutdown(self, timeout_s: float = _SHUTDOWN_TIMEOUT_S) -> bool:
        """Stop the training worker and the ingest thread, close the TF listener (call before
        destroy_node; idempotent). Returns False when a thread did not end within ``timeout_s`` each
        (logged; both are daemon threads, so they cannot keep the process alive).

        Order: wake everything that waits (queue, depth buffer) first, then stop the worker so that an
        ``add_frame`` in flight does not queue behind training, then join the ingest thread. The engine
        stays in the slot (the process ends; a journal checkpoint is written on a clean stop).
        """
        self._stop.set()
        self._ingest_stop.set()
        self.queue.close()
        self.depths.close()
        clean = self._stop_worker(timeout_s)
        engine = self.slot.get()
        if self.journal is not None and clean and engine is not None:
            engine.checkpoint_journal(force=True)  # a clean stop loses no training
        thread = self._ingest_thread
        if thread is not None:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                self.get_logger().error(f"shutdown: ingest thread did not stop within {timeout_s} s")
                clean = False
        if self.tf_listener is not None:
            compat_tf.close_tf_listener(self.tf_listener)
            self.tf_listener = None
        return clean
