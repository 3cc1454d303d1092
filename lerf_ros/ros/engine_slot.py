"""The one live ``LERFEngine`` shared by the nodes of a process, swappable as a whole, and fair access to it.

``LERFEngine.load`` returns a new engine, so loading a map means replacing the object both nodes use.
The slot holds the reference under a lock; each user calls ``get()`` per operation and never caches it,
so a query racing a ``load_map`` answers from either the old or the new model, never a half-built one.

Fairness: the engine's lock is a plain ``RLock`` taken once per training step. Python locks are not fair:
a training loop that releases and re-takes it at once, holding the GIL, can starve a waiting query or
``add_frame`` indefinitely (observed: a query that never returned while training ran). ``PriorityGate``
fixes that from outside the core: callers that must not wait (queries, frame ingest) announce themselves,
and the training worker, through ``YieldingEngine``, waits for them between single steps.
"""

from __future__ import annotations

import contextlib
import threading


class PriorityGate:
    """Lets short, latency-sensitive engine calls go before the next training step."""

    def __init__(self):
        self._cond = threading.Condition()
        self._waiting = 0

    @contextlib.contextmanager
    def priority(self):
        """Wrap a query / add_frame: training steps wait while any such call is in progress."""
        with self._cond:
            self._waiting += 1
        try:
            yield
        finally:
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()

    def wait_turn(self, timeout_s: float = 5.0) -> bool:
        """Block (up to ``timeout_s``) until no priority call is in progress; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting == 0, timeout_s)

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting


class YieldingEngine:
    """The engine as the training worker sees it: ``step(n)`` = n single steps, each after ``wait_turn``.

    Every other attribute (``data_version``, ``wait_for_data``, ``wake``, ``train_step``) is the engine's.
    """

    def __init__(self, engine, gate: PriorityGate):
        self._engine = engine
        self._gate = gate

    def step(self, max_steps: int = 1):
        from lerf_ros.core.engine import StepStats

        train = features = 0
        seconds = 0.0
        losses: dict = {}
        for _ in range(max(int(max_steps), 1)):
            self._gate.wait_turn()
            stats = self._engine.step(1)
            train += stats.train_steps
            features += stats.pyramid_keyframes
            seconds += stats.seconds
            losses = stats.losses or losses
            if not stats.work_done:
                break
        return StepStats(train, features, losses, seconds)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class EngineSlot:
    """A lock-guarded reference to the current engine (None until one is installed) and its gate."""

    def __init__(self, engine=None, error: str = ""):
        self._lock = threading.Lock()
        self._engine = engine
        self._error = error
        self.gate = PriorityGate()

    def get(self):
        with self._lock:
            return self._engine

    @property
    def error(self) -> str:
        """Why there is no engine (e.g. a map that failed to load); '' when there is one."""
        with self._lock:
            return self._error

    def set(self, engine, error: str = "") -> None:
        with self._lock:
            self._engine = engine
            self._error = error
