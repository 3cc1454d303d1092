"""How long the engine lock is held and waited for, measured on the live engine (ROS-free).

The engine's ``PriorityLock`` (``core/training/engine_lock.py``) lets queries, frames and status in ahead of
training steps, but a caller still waits for the one step (or pyramid insert) that holds the lock. Whether
that is 30 ms or 5 s is what decides query latency under load, so the nodes measure it: ``instrument``
gives an engine a ``MeteredLock`` (the same lock, timing every outermost hold and every urgent wait) before
any thread uses it, and ``LockStats`` is what ``/diagnostics`` reports.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, replace

from lerf_ros.core.training.engine_lock import PriorityLock


@dataclass(frozen=True)
class LockStats:
    """Longest outermost hold of the lock by background work (training steps, feature inserts) and by
    urgent callers (queries, ``add_frame``, status, save snapshots), the longest wait of an urgent caller,
    and the number of holds, all since the lock was made or ``reset``; seconds. For each longest hold, where
    it was taken (``module.function`` of the engine method that took it) and the CPU seconds its thread spent
    meanwhile: a hold of 2 s with 0.05 s of CPU waited for the GIL or a core, it did not compute."""

    max_hold_background_s: float = 0.0
    max_hold_urgent_s: float = 0.0
    max_wait_urgent_s: float = 0.0
    holds: int = 0
    max_hold_background_at: str = ""
    max_hold_urgent_at: str = ""
    max_hold_background_cpu_s: float = 0.0
    max_hold_urgent_cpu_s: float = 0.0

    @property
    def max_hold_s(self) -> float:
        return max(self.max_hold_background_s, self.max_hold_urgent_s)


#: Files whose frames are the lock's own machinery, not the caller that took it.
_LOCK_FILES = (__file__, sys.modules[PriorityLock.__module__].__file__, contextlib.__file__)


def _caller() -> str:
    """``module.function`` of the innermost frame that is not the lock's own code (called in ``release``,
    whose caller is the one that took the lock: ``with`` and ``background()`` release where they acquired)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _LOCK_FILES:
        frame = frame.f_back
    if frame is None:
        return "?"
    module = frame.f_globals.get("__name__", "?").rsplit(".", 1)[-1]
    return f"{module}.{frame.f_code.co_name}"


class MeteredLock(PriorityLock):
    """A ``PriorityLock`` that times its holds (outermost acquire to final release) and urgent waits, and
    notes where each longest hold was taken and how much CPU its thread had during it."""

    def __init__(self, clock=time.monotonic):
        super().__init__()
        self._clock = clock
        self._stats_lock = threading.Lock()
        self._stats = LockStats()
        self._since = 0.0
        self._since_cpu = 0.0
        self._background = False

    def acquire(self, background: bool = False) -> bool:
        start = self._clock()
        nested = self._owner == threading.get_ident()  # only the owner can make this true
        super().acquire(background)
        if nested:
            return True
        now = self._clock()
        self._since, self._background = now, background  # we own the lock now
        self._since_cpu = time.thread_time()
        if not background:
            with self._stats_lock:
                s = self._stats
                self._stats = replace(s, max_wait_urgent_s=max(s.max_wait_urgent_s, now - start))
        return True

    def release(self) -> None:
        outermost = self._owner == threading.get_ident() and self._depth == 1
        held = self._clock() - self._since
        cpu = time.thread_time() - self._since_cpu
        background = self._background
        super().release()
        if not outermost:
            return
        with self._stats_lock:
            s = replace(self._stats, holds=self._stats.holds + 1)
            # Where: looked up only for a new longest hold (the stack walk stays off every other release).
            if background and held > s.max_hold_background_s:
                s = replace(s, max_hold_background_s=held, max_hold_background_at=_caller(),
                            max_hold_background_cpu_s=cpu)
            elif not background and held > s.max_hold_urgent_s:
                s = replace(s, max_hold_urgent_s=held, max_hold_urgent_at=_caller(),
                            max_hold_urgent_cpu_s=cpu)
            self._stats = s

    def stats(self) -> LockStats:
        with self._stats_lock:
            return self._stats

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = LockStats()


def instrument(engine) -> MeteredLock | None:
    """Give ``engine`` a ``MeteredLock`` (once; the same one again on later calls; None for an engine without
    a ``PriorityLock``, e.g. a test double, and for one whose lock is held right now). Call it before any
    other thread uses the engine: a lock swapped while a thread waits for the old one would let two in."""
    lock = getattr(engine, "lock", None)
    if isinstance(lock, MeteredLock) or not isinstance(lock, PriorityLock):
        return lock if isinstance(lock, MeteredLock) else None
    if lock._owner is not None or lock.urgent_waiting:  # in use: swapping it would let two threads in
        return None
    engine.lock = MeteredLock()
    return engine.lock


def stats_of(engine) -> LockStats | None:
    """The engine's lock figures, None when its lock is not metered."""
    lock = getattr(engine, "lock", None)
    return lock.stats() if isinstance(lock, MeteredLock) else None
