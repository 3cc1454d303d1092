"""The one live ``LERFEngine`` shared by the nodes of a process, swappable as a whole.

``LERFEngine.load`` returns a new engine, so loading a map means replacing the object both nodes use.
The slot holds the reference under a lock; each user calls ``get()`` per operation and never caches it,
so a query racing a ``load_map`` answers from either the old or the new model, never a half-built one.

Fairness between training and queries is the engine's own job now: its lock (``core/training/engine_lock.py``)
makes a training step give way to any waiting query, ``add_frame``, ``status`` or ``save``.
"""

from __future__ import annotations

import threading


class EngineSlot:
    """A lock-guarded reference to the current engine (None until one is installed)."""

    def __init__(self, engine=None, error: str = ""):
        self._lock = threading.Lock()
        self._engine = engine
        self._error = error

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
