"""Counting the places where the host would wait for the device, on any machine (the CPU included).

On CUDA, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``,
``.cpu()``, ``.numpy()``) and every operation whose result size depends on the data (boolean-mask indexing,
``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``) stops the host
until the GPU has caught up. `HostSyncCounter` is a ``TorchFunctionMode`` that records each such call with
the ``lerf_ros`` source line it came from, so a CPU test can assert how often a code path would sync on a
GPU (``torch.cuda.set_sync_debug_mode`` does the same only where CUDA is present).
"""

from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

import lerf_ros

_PACKAGE = os.path.dirname(os.path.abspath(lerf_ros.__file__)) + os.sep

#: Calls that hand a value to the host, or whose output size the host must learn from the device.
SYNCING = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
                     "nonzero", "masked_select", "unique", "unique_consecutive", "equal", "allclose",
                     "repeat_interleave", "argwhere"})


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...``; then ``syncs.count`` and ``syncs.sites`` (a Counter of
    ``"name @ lerf_ros/path.py:line"``, the innermost lerf_ros frame; a call from elsewhere: the name)."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNCING or (name in ("__getitem__", "__setitem__") and len(args) > 1
                               and _bool_index(args[1])):
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(_PACKAGE)]
            where = ""
            if frames:
                path = frames[-1].filename[len(_PACKAGE):].replace(os.sep, "/")
                where = f" @ lerf_ros/{path}:{frames[-1].lineno}"
            self.sites[name + where] += 1
        return func(*args, **kwargs)
