"""`PriorityLock`: the engine's lock, reentrant, where training steps give way to every other caller.

Python's ``RLock`` is not fair: a training loop that releases it and takes it again at once (holding the
GIL) can keep a waiting query, ``add_frame``, ``status`` or ``save`` out for as long as training runs.
Here a training step takes the lock with ``background()``, which waits while any ordinary
(``with lock:``) caller is waiting; so an ordinary caller waits at most for the one training step that
already holds the lock. Ordinary callers are short (a query, a frame, a snapshot); training may pause
while they queue, which is the intended trade.

But not forever: callers that follow each other without a gap (two clients asking query after query,
each taking the lock for its inputs) would leave a background caller waiting as long as they keep coming,
and training, candidate refreshes and the merges queries read would stop. A background caller that has
waited ``patience_s`` goes next: ordinary callers then wait for that one hold as well.
"""

from __future__ import annotations

import contextlib
import threading
import time

#: How long a background caller gives way to ordinary callers before it goes next, seconds.
BACKGROUND_PATIENCE_S = 0.2


class PriorityLock:
    """Reentrant lock with two classes of acquirer: urgent (``with lock:`` / ``acquire()``) and background.

    A background acquire waits until the lock is free AND no urgent caller is waiting, or until it has
    waited ``patience_s``; an urgent acquire waits until the lock is free and no background caller has
    waited that long. Reentrant for its owning thread in either mode.
    """

    def __init__(self, patience_s: float = BACKGROUND_PATIENCE_S):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._urgent_waiting = 0
        self.patience_s = float(patience_s)
        self._background_since: dict[int, float] = {}  # waiting background callers -> when they began

    def _starving(self, now: float) -> bool:
        """A background caller has waited its patience out (caller holds ``_cond``)."""
        return any(now - t >= self.patience_s for t in self._background_since.values())

    def _wait_until(self, ready) -> None:
        """Wait on ``_cond`` until ``ready(now)``; wakes by itself when a waiting background caller's
        patience runs out (time passing changes the answer without a notify)."""
        while True:
            now = time.monotonic()
            if ready(now):
                return
            due = [t + self.patience_s - now for t in self._background_since.values()]
            due = [d for d in due if d > 0]
            self._cond.wait(timeout=min(due) if due else None)

    def acquire(self, background: bool = False) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if background:
                self._background_since[me] = time.monotonic()
                try:
                    self._wait_until(lambda now: self._owner is None and (
                        self._urgent_waiting == 0 or self._starving(now)))
                finally:
                    del self._background_since[me]
            else:
                self._urgent_waiting += 1
                try:
                    self._wait_until(lambda now: self._owner is None and not self._starving(now))
                finally:
                    self._urgent_waiting -= 1
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("PriorityLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> PriorityLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @contextlib.contextmanager
    def background(self):
        """Hold the lock for low-priority work (one training step): waits for urgent callers first."""
        self.acquire(background=True)
        try:
            yield self
        finally:
            self.release()

    @property
    def urgent_waiting(self) -> int:
        """How many urgent callers are blocked right now (a hint, for tests and status)."""
        with self._cond:
            return self._urgent_waiting
