"""What the nodes already track -> ``/diagnostics`` statuses in diagnostic_updater's shape (ROS-free).

Each function returns a ``Diagnostic``: one diagnostic_updater task's summary (level + message), its
hardware id and its key/value pairs as strings. ``lerf_ros.compat.diagnostics`` writes it into the stat of a
real ``diagnostic_updater.Updater`` task or of the substitute, which names it ``"<node name>: <task>"``.
Nothing is counted here: the inputs are the trainer's ``ingest.DropCounter`` counts and the engine's
``EngineStatus``, the same numbers ``lerf/status`` (TrainingStatus) carries; only the image rate is new, and
it is derived from ``frames_received`` sampled over a window (``IngestRate``).

Tasks and levels (the worst reason wins the message; reasons of one level are joined with "; ", as
diagnostic_updater's ``mergeSummary`` does):
- trainer ``camera input``: WARN when no image arrived for more than ``IMAGE_STALE_S`` while the trainer
  is collecting (state waiting or training; a paused or finished trainer may see a silent camera), or when
  more than ``HIGH_DROP_FRACTION`` of the frames received in the window were dropped; OK otherwise. Frames
  the keyframe selector did not keep ("redundant", "blurred") are listed apart and are never drops.
- trainer ``training``: ERROR in the error state; WARN while a demo encoder is in use; OK otherwise.
- query node ``model``: ERROR without a model (a map that failed to load); WARN while a demo encoder is in
  use; OK otherwise.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lerf_ros.ros import ingest

#: diagnostic_msgs/DiagnosticStatus levels (the message declares them as bytes; here as ints).
OK, WARN, ERROR, STALE = 0, 1, 2, 3
#: No image for longer than this while the trainer is collecting is a WARN, s.
IMAGE_STALE_S = 5.0
#: The image rate and the drop share are measured over this window, s.
RATE_WINDOW_S = 5.0
#: More than this share of the window's frames dropped is a WARN ...
HIGH_DROP_FRACTION = 0.5
#: ... once the window holds at least this many frames (one bad frame at start-up is not "high").
HIGH_DROP_MIN_FRAMES = 5
#: Trainer states in which images are expected (TrainingStatus.state_name).
COLLECTING_STATES = ("waiting", "training")
#: Drop reasons that are TF failures (no pose for the image stamp).
TF_DROP_REASONS = (ingest.TF_MISSING, ingest.TF_EXTRAPOLATION, ingest.BAD_TRANSFORM, ingest.TF_LOOP,
                   ingest.TIME_JUMP)
#: Task names; the published status is named "<node name>: <task>".
INPUT_TASK = "camera input"
TRAINING_TASK = "training"
MODEL_TASK = "model"


@dataclass(frozen=True)
class Diagnostic:
    """One task's status: ``level`` (OK .. STALE), ``message``, ``hardware_id`` and ``values`` as
    (key, value text) pairs in a fixed order."""

    task: str
    level: int
    message: str
    hardware_id: str
    values: tuple[tuple[str, str], ...]

    def value(self, key: str) -> str:
        """The value of ``key``; KeyError naming the keys when absent."""
        for k, v in self.values:
            if k == key:
                return v
        raise KeyError(f"{key!r} not in {[k for k, _ in self.values]}")


@dataclass(frozen=True)
class IngestWindow:
    """The camera input over the last window: ``image_rate_hz`` (frames received per second over
    ``window_s``), ``received`` / ``dropped`` frames in it, ``since_image_s`` (seconds since the last image,
    or since the start / a reset when ``any_image`` is False)."""

    image_rate_hz: float
    window_s: float
    received: int
    dropped: int
    since_image_s: float
    any_image: bool


class IngestRate:
    """Image rate and drop share from the ``frames_received`` / ``frames_dropped`` counters, sampled once
    per diagnostics update (one caller; not thread-safe). A counter that went back (the reset service)
    restarts the window. Times are monotonic seconds."""

    def __init__(self, start_s: float, window_s: float = RATE_WINDOW_S):
        if not math.isfinite(window_s) or window_s <= 0:
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s}")
        self.window_s = float(window_s)
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._last_image_s = float(start_s)
        self._any_image = False

    def sample(self, now_s: float, received: int, dropped: int) -> IngestWindow:
        """Record the counters at ``now_s``; the window ending there."""
        received, dropped = int(received), int(dropped)
        last = self._samples[-1] if self._samples else None
        if last is not None and (received < last[1] or dropped < last[2]):  # reset: start over
            self._samples.clear()
            self._last_image_s, self._any_image = now_s, False
            last = None
        if received > (last[1] if last is not None else 0):
            self._last_image_s, self._any_image = now_s, True
        self._samples.append((now_s, received, dropped))
        # Keep one sample at or before the window's start as the base of the differences.
        while len(self._samples) >= 2 and self._samples[1][0] <= now_s - self.window_s:
            self._samples.popleft()
        t0, received0, dropped0 = self._samples[0]
        span = now_s - t0
        frames = received - received0
        return IngestWindow(image_rate_hz=frames / span if span > 0 else 0.0, window_s=span,
                            received=frames, dropped=dropped - dropped0,
                            since_image_s=max(now_s - self._last_image_s, 0.0), any_image=self._any_image)


def _merge(reasons: Sequence[tuple[int, str]], ok_message: str) -> tuple[int, str]:
    """(level, message): the worst level; its reasons joined with "; " (``ok_message`` when none)."""
    if not reasons:
        return OK, ok_message
    level = max(lvl for lvl, _ in reasons)
    return level, "; ".join(text for lvl, text in reasons if lvl == level)


def _counts(prefix: str, counts: Mapping[str, int]) -> list[tuple[str, str]]:
    return [(f"{prefix}{reason}", str(int(counts[reason]))) for reason in sorted(counts)]


def input_diagnostic(state: str, window: IngestWindow, frames_received: int, drops: Mapping[str, int],
                     not_keyframe: Mapping[str, int], frames_without_depth: int = 0,
                     hardware_id: str = "", image_stale_s: float = IMAGE_STALE_S,
                     delivery: ingest.DeliveryGaps | None = None, cameras: Sequence = (),
                     tf=None) -> Diagnostic:
    """The trainer's camera input. ``state``: TrainingStatus.state_name; ``drops`` / ``not_keyframe``:
    totals by reason since the start or the last reset (``ingest.DropCounter``); ``delivery``: images that
    never reached the node (DDS sequence gaps, header stamp gaps), also since the start or the last reset;
    ``cameras``: per camera (``ros/cameras.CameraReport``) frames, drops, keyframes and state, a camera whose
    state is not "ok" (no publisher, no CameraInfo, silent) a WARN; ``tf``: the TF stream's
    ``compat.tf.TfHealth`` since the start or the last reset (transforms rejected, loops closed, jumps back,
    parent changes; tf2_ros exposes only the jumps), a loop a WARN: it drops every frame posed through it."""
    tf_failures = sum(int(drops.get(r, 0)) for r in TF_DROP_REASONS)
    reasons = []
    if state in COLLECTING_STATES and window.since_image_s > image_stale_s:
        quiet = f"{window.since_image_s:.1f} s"
        reasons.append((WARN, f"no image for {quiet}" if window.any_image
                        else f"no image in the {quiet} since the start or the last reset"))
    reasons += [(WARN, f"camera '{c.name}': {c.state}") for c in cameras or () if c.state != "ok"]
    if tf is not None and tf.loops:
        reasons.append((WARN, f"TF: {tf.loops} loops formed in the tree (a frame its own ancestor): "
                              "frames posed through one are dropped as tf_loop"))
    if window.received >= HIGH_DROP_MIN_FRAMES and window.dropped > HIGH_DROP_FRACTION * window.received:
        reasons.append((WARN, f"high drops: {window.dropped} of {window.received} frames in the last "
                              f"{window.window_s:.1f} s"))
    level, message = _merge(reasons, f"images at {window.image_rate_hz:.1f} Hz")
    values = [
        ("image rate (Hz)", f"{window.image_rate_hz:.2f}"),
        ("rate window (s)", f"{window.window_s:.1f}"),
        ("seconds since last image", f"{window.since_image_s:.1f}" if window.any_image else "n/a (none yet)"),
        ("frames received", str(int(frames_received))),
        ("frames dropped", str(sum(int(v) for v in drops.values()))),
        ("TF failures", str(tf_failures)),
        *_counts("dropped: ", drops),
        ("frames not kept as keyframes", str(sum(int(v) for v in not_keyframe.values()))),
        *_counts("not a keyframe: ", not_keyframe),
        ("frames without depth", str(int(frames_without_depth))),
    ]
    if tf is not None:
        partial = " (not exposed by tf2_ros)" if tf.listener == "tf2_ros" else ""
        values += [("TF listener", str(tf.listener)),
                   ("TF transforms rejected", f"{int(tf.rejected)}{partial}"),
                   ("TF loops", f"{int(tf.loops)}{partial}"),
                   ("TF jumps back (buffer cleared)", str(int(tf.jumps_back))),
                   ("TF parent changes", f"{int(tf.parent_changes)}{partial}")]
    if delivery is not None:
        period = delivery.period_ns()
        values += [("images lost in DDS (sequence gaps)", str(int(delivery.lost_by_sequence))),
                   ("images missing by header stamps", str(int(delivery.missing_by_stamp))),
                   ("image period from stamps (s)", f"{period / 1e9:.4f}" if period else "n/a")]
    for c in cameras or ():
        values += [(f"camera '{c.name}': state", c.state),
                   (f"camera '{c.name}': frames received", str(int(c.frames_received))),
                   (f"camera '{c.name}': frames dropped", str(int(c.frames_dropped))),
                   (f"camera '{c.name}': keyframes", str(int(c.keyframes)))]
    return Diagnostic(INPUT_TASK, level, message, hardware_id, tuple(values))


def _gpu_memory(status) -> list[tuple[str, str]]:
    cuda = str(status.device).startswith("cuda")

    def mib(v: float) -> str:
        return f"{float(v):.1f}" if cuda else "n/a (no CUDA)"
    return [("GPU memory allocated (MiB)", mib(status.gpu_mem_allocated_mb)),
            ("GPU memory reserved (MiB)", mib(status.gpu_mem_reserved_mb)),
            ("GPU memory peak (MiB)", mib(status.gpu_mem_peak_mb))]


def _encoders(status) -> list[tuple[str, str]]:
    return [("CLIP encoder", str(status.clip_encoder)), ("DINO encoder", str(status.dino_encoder)),
            ("demo encoder", str(bool(status.demo_encoders)))]


def _demo_warning(status) -> list[tuple[int, str]]:
    if not status.demo_encoders:
        return []
    return [(WARN, f"demo encoder in use (CLIP {status.clip_encoder!r}, DINO {status.dino_encoder!r}): "
                   "answers match colours, not objects")]


def training_diagnostic(status, state: str, last_error: str = "", lock=None) -> Diagnostic:
    """The trainer's training. ``status``: the engine's ``EngineStatus``; ``state``:
    TrainingStatus.state_name; ``last_error``: the node's (the engine's own wins when set); ``lock``: the
    engine lock's ``lock_meter.LockStats`` (None: not metered)."""
    error = str(status.last_error or last_error or "")
    reasons = []
    if state == "error":
        reasons.append((ERROR, f"training stopped: {error or 'error state'}"))
    reasons += _demo_warning(status)
    conv = status.convergence
    level, message = _merge(reasons, f"{state}, step {int(status.step)}, {int(status.keyframes)} keyframes"
                            + (", usable" if conv.usable else f", progress {conv.progress:.2f}"))
    values = [
        ("state", state),
        ("step", str(int(status.step))),
        ("keyframes", str(int(status.keyframes))),
        ("keyframes pending", str(int(status.keyframes_pending))),
        ("usable", str(bool(conv.usable))),
        ("progress", f"{float(conv.progress):.3f}"),
        ("convergence", str(conv.note)),
        ("non-finite steps", str(int(status.nonfinite_steps))),
        ("rays per second", f"{float(status.rays_per_s):.0f}"),
        ("journal bytes", str(int(status.journal_bytes))),
        ("device", str(status.device) or "n/a"),
        ("neural-field backends", str(status.backends) or "n/a (no model yet)"),
        *_gpu_memory(status),
        *_encoders(status),
        ("last error", error),
    ]
    if lock is not None:
        values += [("longest engine-lock hold, training (s)", f"{lock.max_hold_background_s:.3f}"),
                   ("longest engine-lock hold, training, taken in",
                    _hold_site(lock.max_hold_background_at, lock.max_hold_background_cpu_s)),
                   ("longest engine-lock hold, queries/frames/status (s)", f"{lock.max_hold_urgent_s:.3f}"),
                   ("longest engine-lock hold, queries/frames/status, taken in",
                    _hold_site(lock.max_hold_urgent_at, lock.max_hold_urgent_cpu_s)),
                   ("longest wait for the engine lock (s)", f"{lock.max_wait_urgent_s:.3f}")]
    return Diagnostic(TRAINING_TASK, level, message, str(status.device) or "none",
                      tuple(values))


def _hold_site(at: str, cpu_s: float) -> str:
    """Where a lock hold was taken and its thread's CPU seconds meanwhile ("n/a" before any hold)."""
    return f"{at} (thread CPU {cpu_s:.3f} s)" if at else "n/a"


def model_diagnostic(status, source: str, load_error: str = "") -> Diagnostic:
    """The query node's model. ``status``: the engine's ``EngineStatus``, None without a model;
    ``source``: where the model comes from (a map path, or the live trainer); ``load_error``: why there is
    no model (``EngineSlot.error``)."""
    if status is None:
        message = f"no model: {load_error or 'none loaded'}"
        values = (("model", source), ("error", load_error))
        return Diagnostic(MODEL_TASK, ERROR, message, "none", values)
    conv = status.convergence
    level, message = _merge(_demo_warning(status),
                            f"answering from step {int(status.step)}, {int(status.keyframes)} keyframes"
                            + (", usable" if conv.usable else ", still converging"))
    values = [
        ("model", source),
        ("step", str(int(status.step))),
        ("keyframes", str(int(status.keyframes))),
        ("ready", str(bool(status.ready))),
        ("usable", str(bool(conv.usable))),
        ("progress", f"{float(conv.progress):.3f}"),
        ("device", str(status.device) or "n/a"),
        *_gpu_memory(status),
        *_encoders(status),
    ]
    return Diagnostic(MODEL_TASK, level, message, str(status.device) or "none",
                      tuple(values))
