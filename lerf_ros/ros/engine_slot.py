"""The one live ``LERFEngine`` shared by the nodes of a process, swappable as a whole.

``LERFEngine.load`` returns a new engine, so loading a map means replacing the object both nodes use.
The slot holds the reference under a lock; each user calls ``get()`` per operation and never caches it,
so a query racing a ``load_map`` answers from either the old or the new model, never a half-built one.
With the engine the slot holds the frame its data is in (``get_with_frame``): a loaded map's recorded
world frame, or "" for "the node's ``world_frame`` parameter" (a fresh or reset model).

Fairness between training and queries is the engine's own job now: its lock (``core/training/engine_lock.py``)
makes a training step give way to any waiting query, ``add_frame``, ``status`` or ``save``. Every engine put
in a slot gets a metered lock (``lock_meter.instrument``: the longest hold and wait go to ``/diagnostics``);
engines enter a slot fresh (built, loaded) or already metered (a reset), never while another thread uses them.
"""

from __future__ import annotations

import threading

from lerf_ros.ros import lock_meter


class EngineSlot:
    """A lock-guarded reference to the current engine (None until one is installed) and its frame."""

    def __init__(self, engine=None, error: str = "", frame: str = ""):
        self._lock = threading.Lock()
        lock_meter.instrument(engine)
        self._engine = engine
        self._error = error
        self._frame = frame

    def get(self):
        with self._lock:
            return self._engine

    def get_with_frame(self, default_frame: str) -> tuple[object, str]:
        """(engine, the world frame of its data; ``default_frame`` when the slot names none), together."""
        with self._lock:
            return self._engine, self._frame or default_frame

    @property
    def error(self) -> str:
        """Why there is no engine (e.g. a map that failed to load); '' when there is one."""
        with self._lock:
            return self._error

    def set(self, engine, error: str = "", frame: str = "") -> None:
        """Install ``engine``; ``frame``: the world frame of a loaded map ("" = the node's parameter)."""
        lock_meter.instrument(engine)
        with self._lock:
            self._engine = engine
            self._error = error
            self._frame = frame
