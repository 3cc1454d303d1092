"""`PriorityLock`: the engine's lock, reentrant, where training steps give way to every other caller.

Python's ``RLock`` is not fair: a training loop that releases it and takes it again at once (holding the
GIL) can keep a waiting query, ``add_frame``, ``status`` or ``save`` out for as long as training runs.
Here a training step takes the lock with ``background()``, which waits while any ordinary
(``with lock:``) caller is waiting; so an ordinary caller waits at most for the one training step that
already holds the lock. Ordinary callers are short (a query, a frame, a snapshot); training may pause
while they queue, which is the intended trade.
"""

from __future__ import annotations

import contextlib
import threading


class PriorityLock:
    """Reentrant lock with two classes of acquirer: urgent (``with lock:`` / ``acquire()``) and background.

    A background acquire waits until the lock is free AND no urgent caller is waiting; an urgent acquire
    only waits until the lock is free. Reentrant for its owning thread in either mode.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._urgent_waiting = 0

    def acquire(self, background: bool = False) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if background:
                self._cond.wait_for(lambda: self._owner is None and self._urgent_waiting == 0)
            else:
                self._urgent_waiting += 1
                try:
                    self._cond.wait_for(lambda: self._owner is None)
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
