"""The recorder / trainer node: camera + TF in, an online LERF out.

A lifecycle node (``ros/lifecycle.py``): the engine is built on configure, the camera subscriptions, the
ingest thread and training run while active (deactivate: unsubscribed, training paused), cleanup drops the
engine. With ``autostart`` (default) the constructor does configure + activate.

Threads (nothing slow runs in an executor callback):
- ``sensor`` callback group (mutually exclusive): Image / CompressedImage, CameraInfo, depth of every camera
  (``cameras``: one set per namespace, each bound to its ``ros/cameras.CameraInput``). Callbacks
  convert and validate the message and put it on a bounded queue (drop-oldest, counted as "queue_full").
  Before converting, an image is skipped (``ingest.Decimator``: "skipped_rate" above ``max_frame_rate_hz``,
  "skipped_static" while TF's pose at the stamp has not moved; counted with the frames not kept, never drops),
  and its stamp and DDS sequence number feed ``ingest.DeliveryGaps`` (images never delivered). Services,
  status and queries sit in other groups, so they never wait for an image callback to finish.
- ingest: two owned threads. The pose thread: TF lookup of ``T_world_cam`` at the image stamp (waiting up to
  ``tf_timeout_s``, interpolated by the TF buffer); with a depth topic, the depth image of the same stamp
  (within ``depth_stamp_tolerance_s``) from a bounded buffer the depth callback fills, waiting up to
  ``depth_wait_s`` because depth may arrive after colour (no match: ingested without depth, counted as
  in TrainingStatus.frames_without_depth, not a drop); then onto a second bounded queue. The add thread:
  ``engine.add_frame`` (a frame it does not keep as a keyframe is counted in frames_not_keyframe, not as a
  drop). Apart, so that a frame waiting for the engine lock is posed while its TF is still in the buffer:
  one thread made frames queued behind a slow add_frame fail as tf_extrapolation once time jumped back
  (the TF buffer cleared) or the cache time passed. When time jumps back (``compat.tf.tf_health``), the
  frames still waiting for a pose stamped after the time jumped to are dropped as "time_jump".
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

import collections
import dataclasses
import functools
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
from lerf_ros.core.training.worker import TrainingWorker, set_gil_switch_interval, set_torch_threads
from lerf_ros.ros import cameras, diagnostics, ingest, lifecycle, lock_meter, map_io
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
        self.queue = ingest.BoundedQueue(self.settings.queue_size)  # frames waiting for their pose
        self.posed = ingest.BoundedQueue(self.settings.queue_size)  # posed frames waiting for add_frame
        self.depths = ingest.DepthBuffer(self.settings.queue_size + _DEPTH_SLACK)
        kf = self.params.engine.keyframes
        rate = self.settings.max_frame_rate_hz
        # Images skipped before conversion (rate, a camera that has not moved): the executor is not
        # saturated converting frames that ingest would drop or the keyframe selector find redundant.
        def decimator():
            return ingest.Decimator(1.0 / rate if rate > 0 else 0.0, kf.min_translation_m,
                                    kf.min_rotation_deg, kf.max_interval_s)

        self.decimator = decimator()
        self.delivery = ingest.DeliveryGaps()  # images DDS never delivered: sequence and stamp gaps
        # One input per camera (``ros/cameras.py``: the ``cameras`` namespaces, or the one camera of the topic
        # parameters); the first one's depth buffer, decimator and delivery gaps are the attributes above.
        now = time.monotonic()
        self.cameras = [
            cameras.CameraInput(t, self.depths, now, self.decimator, self.delivery) if i == 0 else
            cameras.CameraInput(t, ingest.DepthBuffer(self.depths.maxlen), now, decimator(),
                                ingest.DeliveryGaps())
            for i, t in enumerate(cameras.camera_topics(self.settings.cameras, self.settings.image_topic,
                                                        self.settings.camera_info_topic,
                                                        self.settings.depth_topic))]
        self._cameras_by_name = {c.name: c for c in self.cameras}
        self._camera_states: dict[str, str] = {}  # last state logged per camera
        self._lock = threading.Lock()  # guards _last_error, _paused, _active, worker swap
        self._last_error = ""
        self._no_map = ""  # why there is no map to record into (``refuse_map``); '' normally
        self._last_log: dict[str, float] = {}
        self._paused = False
        self._active = False  # lifecycle state active: frames taken, the worker runs
        self._worker: TrainingWorker | None = None  # from configure to cleanup
        self._stop = threading.Event()  # the node is shutting down (for good)
        self._ingest_stop = threading.Event()  # ends the current activation's ingest thread
        self._ingest_threads: list[threading.Thread] = []  # the pose thread and the add thread
        self._tf_base = None  # TF health at the last reset: the status counts since then
        self._jumps_seen = 0  # time jumps (TF health) the pose thread has acted on
        self._subscriptions_active: list = []
        self._status_timers: list = []
        self._configure_error: Exception | None = None
        self.tf_buffer = self.tf_listener = None
        self.tf_is_real = False
        # Serialises publish_status (timer, state watch and service threads) and guards _published_state.
        self._status_lock = threading.Lock()
        self._published_state = ""

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
                set_torch_threads(self.settings.torch_threads, self.get_logger().info)
                set_gil_switch_interval(self.get_logger().info)
                self.slot.set(make_engine(self.params))
                built = True
            if self.params.journal is not None and self.journal is None:
                self._start_journal(self.params.journal)
            # MissingRosDependency (a ValueError) on a ROS 2 machine without tf2_ros. The listener spins on
            # its own node and thread: on this node's executor, behind image callbacks and services, a
            # 40-100 Hz /tf arrived seconds late under load (tf_extrapolation drops, false jumps back).
            tf = compat_tf.make_tf_buffer(self, spin_thread=True)
            self.tf_buffer, self.tf_listener, self.tf_is_real = tf
            self._tf_base, self._jumps_seen = None, 0  # a new listener counts from 0
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
            f"training preset '{self.params.values['preset']}' on {self.params.device}; "
            + ", ".join(f"camera '{c.name}' {self.resolve_topic_name(c.topics.image)}" for c in self.cameras)
            + f" ({s.image_transport}), world frame '{s.world_frame}', "
            f"TF {'tf2_ros' if self.tf_is_real else 'compat buffer'}; /diagnostics "
            f"{compat_diagnostics.describe(self._diagnostics_real)}")
        return lifecycle.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the camera, start the ingest thread and training (paused again if lerf/pause
        paused it)."""
        s = self.settings
        qos, group = qos_profile_sensor_data, self._sensor_group
        topics = []
        for cam in self.cameras:  # every camera's callbacks know their camera (functools.partial)
            t = cam.topics
            if s.image_transport == "compressed":
                image = (CompressedImage, t.image.rstrip("/") + "/compressed",
                         functools.partial(self._on_image_with_info, camera=cam))
            else:
                image = (Image, t.image, functools.partial(self._on_image_with_info, camera=cam))
            info = (CameraInfo, t.camera_info, functools.partial(self._on_camera_info, camera=cam))
            topics += [image, info]
            if t.depth:
                topics.append((Image, t.depth, functools.partial(self._on_depth, camera=cam)))
            cam.activated(time.monotonic())
        subs = [self.create_subscription(kind, name, callback, qos, callback_group=group)
                for kind, name, callback in topics]
        self._subscriptions_active = subs
        self._ingest_stop = threading.Event()
        self._ingest_threads = [
            threading.Thread(target=loop, args=(self._ingest_stop,), name=name, daemon=True)
            for loop, name in ((self._pose_loop, "lerf-ingest-pose"), (self._add_loop, "lerf-ingest-add"))]
        for thread in self._ingest_threads:
            thread.start()
        with self._lock:
            self._active = True
            if self._worker.state == "stopped":
                self._worker.start(paused=self._paused or self._no_map)
            if self._paused or self._no_map:
                self._worker.pause()
            else:
                self._worker.resume()
        self.get_logger().info("active: taking frames from " + ", ".join(
            self.resolve_topic_name(c.topics.image) for c in self.cameras) + " and training")
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
        for thread in self._ingest_threads:
            thread.join(timeout=_SHUTDOWN_TIMEOUT_S)
            if thread.is_alive():
                self.get_logger().error(f"{thread.name} thread did not stop within {_SHUTDOWN_TIMEOUT_S} s")
        self._ingest_threads = []
        self.queue.clear()
        self.posed.clear()
        for cam in self.cameras:
            cam.depths.clear()

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

    def _drop(self, reason: str, detail: str, log_key: str | None = None, camera=None) -> None:
        """Count a dropped frame (and for its ``camera``, a ``cameras.CameraInput``, when known); log it
        throttled per ``log_key`` (default: the reason)."""
        self.counters.drop(reason)
        if camera is not None:
            camera.dropped()
            detail = f"camera '{camera.name}': {detail}" if len(self.cameras) > 1 else detail
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
    def _on_camera_info(self, msg: CameraInfo, camera=None) -> None:
        """CameraInfo of ``camera`` (a ``cameras.CameraInput``; None = the first camera)."""
        try:
            entry = (ingest.intrinsics_from_camera_info(msg), "")
        except (ValueError, IndexError) as exc:
            entry = (None, str(exc))
        (camera or self.cameras[0]).set_info(entry)

    def _on_depth(self, msg: Image, camera=None) -> None:
        cam = camera or self.cameras[0]
        try:
            depth = image_conv.depth_to_metres(msg)
        except ValueError as exc:
            self._drop(ingest.BAD_DEPTH, str(exc), camera=cam)
            return
        cam.depth_received()
        cam.depths.put(stamp_to_ns(msg.header.stamp), depth)

    def _on_image_with_info(self, msg, message_info, camera=None) -> None:
        """The image subscription's callback: rclpy passes the message info (its DDS sequence number) to a
        callback that takes two arguments."""
        self._on_image(msg, message_info, camera)

    def _pose_hint(self, frame_id: str, stamp_ns: int):
        """``T_world_cam`` at the image stamp if TF already has it, without waiting (the decimator's pose
        check); None when unknown. Not TF's latest: after a jump back that would be a stale pose."""
        if not (self.settings.skip_static_frames and frame_id and self.tf_buffer is not None):
            return None
        _, world_frame = self.slot.get_with_frame(self.settings.world_frame)
        try:
            return compat_tf.lookup_matrix(self.tf_buffer, world_frame, frame_id, stamp_ns, 0.0)
        except compat_tf.TransformException:
            return None

    def _on_image(self, msg, message_info=None, camera=None) -> None:
        """An image of ``camera`` (a ``cameras.CameraInput``; None = the first camera)."""
        cam = camera or self.cameras[0]
        drop = functools.partial(self._drop, camera=cam)
        stamp_ns = stamp_to_ns(msg.header.stamp)
        cam.delivery.observe(stamp_ns, (message_info or {}).get("publication_sequence_number"))
        self.counters.received()
        cam.image_received(time.monotonic())
        no_map = self._no_map
        if no_map:  # not converted: there is no map to record into until load_map or reset
            drop(ingest.NO_MAP, no_map)
            return
        info = cam.info
        if info is None:
            drop(ingest.NO_CAMERA_INFO,
                 f"no CameraInfo yet on {self.resolve_topic_name(cam.topics.camera_info)}")
            return
        intrinsics, info_error = info
        if intrinsics is None:
            drop(ingest.BAD_INTRINSICS, info_error)
            return
        skipped = cam.decimator.decide(stamp_ns, self._pose_hint(msg.header.frame_id, stamp_ns))
        if skipped:  # not converted: counted with the frames not kept, never as a drop
            self.counters.not_keyframe(skipped)
            return
        try:
            if isinstance(msg, CompressedImage):
                rgb = image_conv.compressed_to_rgb(msg)
            else:
                rgb = image_conv.image_to_rgb(msg)
        except ValueError as exc:
            drop(ingest.BAD_IMAGE, str(exc))
            return
        h, w = rgb.shape[:2]
        if (w, h) != (intrinsics.width, intrinsics.height):
            drop(ingest.SIZE_MISMATCH,
                 f"image is {w}x{h} but CameraInfo is {intrinsics.width}x{intrinsics.height}")
            return
        try:
            intrinsics.validate()
        except ValueError as exc:
            drop(ingest.BAD_INTRINSICS, str(exc))
            return
        if not msg.header.frame_id:
            drop(ingest.TF_MISSING, "image header has an empty frame_id")
            return
        pending = ingest.PendingFrame(rgb, intrinsics, msg.header.frame_id, stamp_ns, camera=cam.name)
        if not self.queue.put(pending):
            drop(ingest.QUEUE_FULL, f"ingest queue full ({self.queue.maxlen}); dropped the oldest")

    # ------------------------------------------------------------------ ingest threads
    def _lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float):
        # Runs on the ingest thread, so waiting here never blocks the executor that feeds the TF buffer.
        return compat_tf.lookup_matrix(self.tf_buffer, target, source, stamp_ns, timeout_s)

    def _stopping(self) -> bool:
        """Shutting down or deactivating: a wait cut short now is not a dropped frame."""
        return self._stop.is_set() or self._ingest_stop.is_set()

    def _pose_loop(self, stop: threading.Event) -> None:
        self._loop(stop, self.queue, self._pose)

    def _add_loop(self, stop: threading.Event) -> None:
        self._loop(stop, self.posed, self._add)

    def _loop(self, stop: threading.Event, queue: ingest.BoundedQueue, handle) -> None:
        while not (stop.is_set() or self._stop.is_set()):
            item = queue.get(timeout=0.5)
            if item is None:
                continue
            try:
                handle(item)
            except Exception as exc:  # a bug must not kill the thread: report it in the status
                self.get_logger().error(f"ingest failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=_LOG_THROTTLE_S)
                self._drop(ingest.BAD_FRAME, f"{type(exc).__name__}: {exc}")

    def _stale_after_jump(self) -> int | None:
        """When time jumped back since the last call: drop the queued frames stamped after the time it
        jumped to (the old timeline: the TF buffer cleared their transforms, so they would only wait out
        ``tf_timeout_s`` each and fail) and return that time; else None. Pose thread only."""
        if self.tf_buffer is None:
            return None
        health = compat_tf.tf_health(self.tf_buffer, self.tf_listener)
        if health.jumps_back <= self._jumps_seen:
            return None
        self._jumps_seen = health.jumps_back
        limit = health.jump_to_ns + ingest.JUMP_BACK_NS
        for item in self.queue.remove_if(lambda it: it.stamp_ns > limit):
            cam = self._cameras_by_name.get(item.camera, self.cameras[0])
            self._drop(ingest.TIME_JUMP, f"image at {item.stamp_ns / 1e9:.3f} s is from before time jumped "
                       f"back to {health.jump_to_ns / 1e9:.3f} s; its transforms were cleared", camera=cam)
        return health.jump_to_ns

    def _pose(self, item: ingest.PendingFrame) -> None:
        """Pose thread: ``T_world_cam`` at the image stamp (and depth), then on to the add thread."""
        s = self.settings
        cam = self._cameras_by_name.get(item.camera, self.cameras[0])
        drop = functools.partial(self._drop, camera=cam)
        self._stale_after_jump()
        # The engine and its frame together: a frame posed in the old map's frame never reaches a new map.
        engine, world_frame = self.slot.get_with_frame(s.world_frame)
        T_world_cam, reason, detail = ingest.lookup_pose(self._lookup, world_frame, item.frame_id,
                                                         item.stamp_ns, s.tf_timeout_s, compat_tf)
        if self._stopping():  # a TF wait cut short by shutdown / deactivate is not a dropped frame
            return
        if T_world_cam is None:
            jumped_to = self._stale_after_jump()  # time jumped back while this frame waited for TF
            if jumped_to is not None and item.stamp_ns > jumped_to + ingest.JUMP_BACK_NS:
                reason, detail = ingest.TIME_JUMP, f"time jumped back while it waited for TF: {detail}"
            # Per frame id: a camera frame that has never had TF is news even while another one is failing.
            drop(reason, detail, f"{reason}:{item.frame_id}")
            return
        depth = None
        if cam.wants_depth:
            # Waiting here (pose thread) never blocks the executor that delivers the depth message.
            depth = cam.depths.wait_match(item.stamp_ns, round(s.depth_stamp_tolerance_s * 1e9),
                                           s.depth_wait_s)
            if self._stopping():
                return
            if depth is None:
                self.counters.note(ingest.NO_DEPTH_MATCH)
        if depth is not None and depth.shape != item.image.shape[:2]:
            drop(ingest.BAD_DEPTH, f"depth {depth.shape} does not match image {item.image.shape[:2]}")
            depth = None
        if not self.posed.put(ingest.PosedFrame(item, T_world_cam, depth, engine, world_frame)):
            drop(ingest.QUEUE_FULL, f"posed-frame queue full ({self.posed.maxlen}): add_frame is behind; "
                 "dropped the oldest")

    def _add(self, posed: ingest.PosedFrame) -> None:
        """Add thread: ``engine.add_frame`` for a posed frame (it may wait for the engine lock)."""
        item = posed.pending
        cam = self._cameras_by_name.get(item.camera, self.cameras[0])
        engine, now = posed.engine, self.slot.get_with_frame(self.settings.world_frame)
        if engine is None or now != (engine, posed.world_frame):
            return  # a map was loaded (or reset) while this frame waited for TF / depth: not for the new one
        try:
            frame = Frame(item.image, item.intrinsics, posed.T_world_cam, item.stamp_ns, posed.depth_m,
                          cam.name)
            result = engine.add_frame(frame)
        except ValueError as exc:
            self._drop(ingest.BAD_FRAME, str(exc), camera=cam)
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
            if not refusal and self._no_map and not request.data:  # resuming would train an empty map
                refusal = f"{self._no_map}"
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
        self.posed.clear()
        with self._lock:
            if self._no_map:
                self.get_logger().info("lerf/reset: starting a fresh map, as asked (map_path was not loaded)")
            self._no_map = ""  # the operator asked for a fresh map: recording and training start
            self._swap_worker(self._reset_engine)
            self._last_error = ""
        self.counters.reset()
        for cam in self.cameras:  # depth, decimator, delivery gaps and the camera's counts
            cam.reset(time.monotonic())
        self.tf_buffer.clear()  # as after a time jump: transforms of the old run must not pose new frames
        self._tf_base = compat_tf.tf_health(self.tf_buffer, self.tf_listener)  # TF counts restart
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
            self._worker.start(paused=self._paused)  # a paused node's new map takes no step

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
        self.posed.clear()
        with self._lock:
            old = self.slot.get()
            self._no_map = ""  # a map to record into and train
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

    def refuse_map(self, reason: str) -> None:
        """The map the node was told to continue (``map_path``) is not there: state "error" with ``reason``
        as last_error, training paused, every image dropped as "no_map" (nothing recorded, nothing written
        to a journal), queries refused with the reason (``no_map_reason``), until ``lerf/load_map`` loads a
        map or ``lerf/reset`` starts a fresh one. Never a fresh map started quietly."""
        reason = (f"{reason}; nothing is recorded or trained until lerf/load_map loads a map or lerf/reset "
                  "starts a fresh one")
        with self._lock:
            self._no_map = reason
            if self._worker is not None:
                self._worker.pause()
        self.queue.clear()
        self.posed.clear()
        self.get_logger().error(reason)
        self.publish_status()

    def no_map_reason(self) -> str:
        """Why there is no map (``refuse_map``); '' when there is one."""
        with self._lock:
            return self._no_map

    # ------------------------------------------------------------------ status
    def state_name(self) -> str:
        """TrainingStatus state: the worker's; "paused" while the node is inactive (its worker is paused)."""
        with self._lock:
            if self._no_map:
                return "error"
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
            worker_error = self._no_map or (self._worker.last_error if self._worker is not None else None)
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
                                   not_keyframe=self.counters.not_keyframes(),
                                   cameras=self.camera_reports(engine_status.keyframes_by_camera),
                                   tf=self.tf_counts())

    def tf_counts(self):
        """The TF stream's ``compat.tf.TfHealth`` (rejected, loops, jumps back, parent changes) since the
        start or the last reset; None without a listener (unconfigured)."""
        buffer, listener = self.tf_buffer, self.tf_listener
        if buffer is None:
            return None
        health, base = compat_tf.tf_health(buffer, listener), self._tf_base
        if base is None or base.listener != health.listener:
            return health
        return health._replace(
            rejected=health.rejected - base.rejected, loops=health.loops - base.loops,
            jumps_back=health.jumps_back - base.jumps_back,
            parent_changes=health.parent_changes - base.parent_changes)

    def camera_reports(self, keyframes_by_camera=None) -> list:
        """Per camera (``cameras.CameraReport``): frames received and dropped, keyframes it has in the map,
        and "ok" or why it gives nothing usable (no publisher on its topics, no CameraInfo, silent: after
        ``cameras.SILENT_S``; logged when it changes, never fatal). keyframes_by_camera: the engine's count
        (None: counted from the keyframe store here)."""
        if keyframes_by_camera is None:
            engine = self.slot.get()
            keyframes_by_camera = {} if engine is None else collections.Counter(
                f.camera for f in engine.store.frames())
        suffix = "/compressed" if self.settings.image_transport == "compressed" else ""
        now, label, out = time.monotonic(), lifecycle.state_label(self), []
        for cam in self.cameras:
            image = self.resolve_topic_name(cam.topics.image.rstrip("/") + suffix)
            info = self.resolve_topic_name(cam.topics.camera_info)
            report = cam.report(now, keyframes_by_camera.get(cam.name, 0),
                                image_publishers=self.count_publishers(image),
                                info_publishers=self.count_publishers(info), image_name=image, info_name=info)
            if not self._active:  # no subscriptions: silence means nothing
                report = dataclasses.replace(report, state=f"not subscribed (lifecycle state '{label}')")
            elif cameras.state_kind(report.state) != self._camera_states.get(cam.name, cameras.OK):
                # one call site per severity: rclpy refuses a call site whose severity changes
                if report.state == cameras.OK:
                    self.get_logger().info(f"camera '{cam.name}': {report.state}")
                else:
                    self.get_logger().warning(f"camera '{cam.name}': {report.state}")
            if self._active:  # logged when the kind of state changes, not as its seconds count up
                self._camera_states[cam.name] = cameras.state_kind(report.state)
            out.append(report)
        return out

    def _diagnose_input(self, stat):
        """diagnostic_updater task "camera input": image rate, TF failures, drops and not-kept frames."""
        received, drops = self.counters.snapshot()
        window = self._ingest_rate.sample(time.monotonic(), received, sum(drops.values()))
        diagnostic = diagnostics.input_diagnostic(
            self.state_name(), window, received, drops, self.counters.not_keyframes(),
            self.counters.notes().get(ingest.NO_DEPTH_MATCH, 0),
            hardware_id=", ".join(self.resolve_topic_name(c.topics.image) for c in self.cameras),
            delivery=self.delivery,
            cameras=self.camera_reports() if self.settings.cameras else None, tf=self.tf_counts())
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
            error = (self._no_map or (self._worker.last_error if self._worker is not None else None)
                     or self._last_error)
        diagnostic = diagnostics.training_diagnostic(engine.status(), self.state_name(), error,
                                                     lock=lock_meter.stats_of(engine))
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
        self.posed.close()
        for cam in self.cameras:
            cam.depths.close()
        clean = self._stop_worker(timeout_s)
        engine = self.slot.get()
        if self.journal is not None and clean and engine is not None:
            engine.checkpoint_journal(force=True)  # a clean stop loses no training
        for thread in self._ingest_threads:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                self.get_logger().error(f"shutdown: {thread.name} thread did not stop within {timeout_s} s")
                clean = False
        if self.tf_listener is not None:
            compat_tf.close_tf_listener(self.tf_listener)
            self.tf_listener = None
        return clean
