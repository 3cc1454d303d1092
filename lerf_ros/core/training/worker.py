"""`TrainingWorker`: a background thread that drives an engine's ``step``.

The worker owns no model state; it only calls ``engine.step(steps_per_tick)`` in a loop. The engine takes
its own lock per training step, so queries stay safe while the worker runs. When there is nothing to do
(too few keyframes, ``max_steps`` reached, paused) the thread blocks on a condition variable and is woken by
``engine.wait_for_data`` returning (new frames) or by ``resume``/``stop``: it never busy-waits.

``stop`` also sets the engine's ``cancel_event`` (when it has one, as ``LERFEngine`` does) so a step busy
with a keyframe's CLIP pyramid gives up after the encoder batch in flight instead of finishing the
keyframe; the event is cleared again once the thread has ended.

An exception raised by ``step`` is caught, recorded in ``last_error`` and puts the worker in state
``"error"``; the thread stays alive and idle until ``resume()`` (retry) or ``stop()``.

``start`` shortens the interpreter's GIL switch interval (`set_gil_switch_interval`) when it is longer
than ``GIL_SWITCH_INTERVAL_S``: beside any thread running Python, a training step otherwise crawls.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Protocol

#: The states ``TrainingWorker.state`` can report.
STATES = ("stopped", "waiting", "training", "paused", "ready", "error")

GIL_SWITCH_INTERVAL_S = 0.0005
_log = logging.getLogger(__name__)


def set_gil_switch_interval(info: Callable[[str], None] | None = None,
                            interval_s: float = GIL_SWITCH_INTERVAL_S) -> float:
    """Shorten how long a thread that wants the GIL back waits for the thread running Python bytecode
    (process-wide, ``sys.setswitchinterval``); ``info`` gets one line saying so. Returns the interval.

    A training step is thousands of small torch operators, and each one gives the GIL up and takes it back.
    Beside a thread running Python (the executor's callbacks, the TF listener, a query's bookkeeping) every
    take-back waited up to the default 5 ms: steps of 60 ms held the engine lock for 1.1-1.3 s with 0.07-0.1 s
    of their own CPU (``bench/reliability.py``, query storm and flood), and a thread spinning Python made one
    step last 35 s (0.5 ms: 1.1 s); a worker beside a thread querying once a second took 1 step in 40 s
    (``bench/query_latency.py``; 376 without the queries). The cost is more frequent switches between Python
    threads."""
    sys.setswitchinterval(interval_s)
    (info or _log.info)(f"GIL switch interval: {sys.getswitchinterval() * 1e3:.2f} ms (training steps wait "
                        f"less for the GIL behind Python threads)")
    return sys.getswitchinterval()


def torch_threads_for(requested: int, cpu_count: int | None, trains: bool = True,
                      omp_limit: int | None = None) -> int:
    """The torch CPU thread count for ``torch_threads``: ``requested`` when above 0; otherwise one less
    than the cores (at least 1) in a process that trains (``trains``), all of them in one that only
    answers queries (the query node alone, on a saved map), and never more than ``omp_limit`` (a positive
    ``OMP_NUM_THREADS`` the user set to share the CPU: `omp_thread_limit`).

    Two OpenMP threads fighting over two busy cores made one training step hold the engine lock for
    seconds (issue 10: up to 5.5 s, median 37 ms); a core left to the executor and the ingest thread
    keeps the lock holds short and the image callbacks on time. Without training a query is the only
    work: on four of the quality benchmark's RGB-only maps, both cores of a 2-core CPU answered absent
    names in 0.088 / 0.148 s p50 / p95 against 0.142 / 0.223 s with one (bench/RESULTS.md, sixteenth
    landing)."""
    if requested > 0:
        return int(requested)
    cores = cpu_count or 2
    auto = max(1, cores - 1) if trains else cores
    return min(auto, omp_limit) if omp_limit is not None and omp_limit > 0 else auto


def omp_thread_limit(environ=None) -> int | None:
    """``OMP_NUM_THREADS`` as a positive integer (its first entry: OpenMP allows a list per nesting level),
    None when unset or not one."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_cpus() -> int | None:
    """The CPUs this process may run on (its affinity: a container's cpuset, ``taskset``), else the
    machine's count (None when unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        return os.cpu_count()


def set_torch_threads(requested: int, info: Callable[[str], None] | None = None, trains: bool = True) -> int:
    """Set torch's intra-op threads for this process (`torch_threads_for` over `available_cpus`; training
    and queries alike); ``info`` gets one line saying how many and why. Returns the count."""
    import torch

    cpus, omp = available_cpus(), omp_thread_limit()
    threads = torch_threads_for(requested, cpus, trains, omp)
    torch.set_num_threads(threads)
    why = "torch_threads" if requested > 0 else ("cores - 1" if trains else "all cores: nothing trains here")
    if threads < torch_threads_for(requested, cpus, trains):  # only a choice of 0 is capped
        why += f", at most OMP_NUM_THREADS={omp}"
    (info or _log.info)(f"torch CPU threads: {threads} ({why}, {cpus} cores available)")
    return threads


class SteppableEngine(Protocol):
    """What the worker needs from an engine (``LERFEngine`` satisfies it)."""

    def step(self, max_steps: int = 1): ...  # returns an object with ``.train_steps`` and ``.work_done``

    def wait_for_data(self, version: int, timeout: float | None) -> int: ...

    def wake(self) -> None: ...  # make a pending ``wait_for_data`` return now

    @property
    def data_version(self) -> int: ...

    @property
    def train_step(self) -> int: ...


class TrainingWorker:
    """Background training thread.

    engine:         object with ``step(max_steps) -> StepStats``, ``data_version``, ``wait_for_data`` and
                    ``train_step`` (see `SteppableEngine`).
    steps_per_tick: training steps per ``engine.step`` call; between calls the thread checks pause / stop,
                    so a larger value is slightly faster but reacts later.
    max_steps:      stop training (state ``"ready"``) once ``engine.train_step`` reaches this; None = forever.
    idle_poll_s:    upper bound on one idle wait; wake-ups normally come from new data or a command.
    """

    def __init__(self, engine: SteppableEngine, steps_per_tick: int = 10, max_steps: int | None = None,
                 idle_poll_s: float = 1.0):
        if int(steps_per_tick) < 1:
            raise ValueError(f"steps_per_tick must be >= 1, got {steps_per_tick}")
        if max_steps is not None and int(max_steps) < 0:
            raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
        if not idle_poll_s > 0:
            raise ValueError(f"idle_poll_s must be > 0, got {idle_poll_s}")
        self.engine = engine
        self.steps_per_tick = int(steps_per_tick)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.idle_poll_s = float(idle_poll_s)
        self._cond = threading.Condition()
        self._state = "stopped"
        self._paused = False
        self._stop = False
        self._retry = False
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- commands
    def start(self, paused: bool = False) -> None:
        """Start the thread (idempotent while running); ``paused``: it takes no step until ``resume`` (a
        ``start()`` then ``pause()`` may let a step in between). Shortens the GIL switch interval to
        ``GIL_SWITCH_INTERVAL_S`` when it is longer (module docstring)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
                set_gil_switch_interval()
            self._stop = False
            self._paused = bool(paused)
            self._state = "paused" if paused else "waiting"
            self._thread = threading.Thread(target=self._run, name="lerf-training-worker", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """Finish the current tick, then idle until ``resume``."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()

    def resume(self) -> None:
        """Leave ``paused`` (or ``error``: retry the step that failed)."""
        with self._cond:
            self._paused = False
            self._retry = True
            self._cond.notify_all()
        self.engine.wake()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the thread to finish and join it. Raises RuntimeError if it does not end within ``timeout``.

        Returns within about one encoder batch / training step: the engine's ``cancel_event`` aborts
        keyframe feature work in progress (the keyframe stays pending, nothing half-built is stored).
        """
        cancel = getattr(self.engine, "cancel_event", None)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if cancel is not None:
            cancel.set()
        self.engine.wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"training worker did not stop within {timeout} s")
        if cancel is not None:
            cancel.clear()  # the thread has ended: the engine may be stepped again (CLI, a new worker)
        with self._cond:
            self._state = "stopped"
            self._thread = None

    def notify(self) -> None:
        """Wake an idle worker now (e.g. after frames were added outside ``wait_for_data``'s reach)."""
        with self._cond:
            self._cond.notify_all()
        self.engine.wake()

    # ----------------------------------------------------------------- queries
    @property
    def state(self) -> str:
        """One of ``STATES``."""
        with self._cond:
            return self._state

    @property
    def last_error(self) -> str | None:
        """``"ExceptionType: message"`` of the last failed step, or None."""
        with self._cond:
            return self._last_error

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ----------------------------------------------------------------- loop
    def _set_state(self, state: str) -> None:
        with self._cond:
            self._state = state

    def _idle(self, state: str) -> None:
        """Wait (blocking, no spinning) until a command arrives or ``idle_poll_s`` passes."""
        with self._cond:
            if self._stop:
                return
            self._state = state
            self._cond.wait(self.idle_poll_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                paused, errored = self._paused, self._state == "error" and not self._retry
                self._retry = False
            if paused:
                self._idle("paused")
                continue
            if errored:
                self._idle("error")
                continue
            budget_left = None if self.max_steps is None else self.max_steps - self.engine.train_step
            version = self.engine.data_version
            # With the step budget spent, step(0) still computes the features of keyframes that arrived
            # late: "ready" then means every held keyframe has its language targets.
            n = self.steps_per_tick if budget_left is None else max(0, min(self.steps_per_tick, budget_left))
            try:
                stats = self.engine.step(n)
            except Exception as exc:  # the thread must survive: record, report, wait for resume/stop
                with self._cond:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    self._state = "error"
                continue
            if n == 0 and not stats.work_done:
                self._idle("ready")
                continue
            if stats.train_steps > 0:
                self._set_state("training")
            elif not stats.work_done:
                # Nothing trainable yet: block until the engine sees new frames (or a command / poll).
                self._set_state("waiting")
                self.engine.wait_for_data(version, self.idle_poll_s)
