"""Language-field evaluation for `core.language.query.locate`, all searched scales from one hash-grid pass.

``locate`` asks ``embed_fn(points, scale_m)`` once per scale (30 for LERF's scale search); evaluating
the language hash grids each time repeats the expensive part. `multiscale_embed_fn` keeps locate's
per-scale interface but computes a block of scales at once with ``LERFModel.clip_multiscale``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..model import LERFModel


class GridFeatureCache:
    """The language hash grids' features (`LERFModel.language_features`) of the last points asked for,
    reused while neither the points nor the weights change: an idle map's queries all score the same
    candidate points, so only the first pays for the grids. The caller names the weights' state with a
    ``version`` that changes whenever they may have (the engine: the model object, its step count and a
    counter of training calls; tensors' in-place version counters do not serve, fused Adam leaves them
    as they are); the points are compared by content."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # queries run concurrently (outside the engine lock)
        self._key: tuple | None = None
        self._owner = None
        self._features: torch.Tensor | None = None
        self.hits = 0

    def get(self, model: LERFModel, points: torch.Tensor, version: object) -> torch.Tensor:
        digest = hashlib.sha1(points.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()
        key = (id(model.language), version, tuple(points.shape), digest)
        with self._lock:
            if self._key == key and self._owner is model.language:
                self.hits += 1
                return self._features
            self._features = model.language_features(points)
            self._key, self._owner = key, model.language
            return self._features


def multiscale_embed_fn(model: LERFModel, scales_m: Sequence[float], budget_bytes: int = 256 * 2**20,
                        cache: GridFeatureCache | None = None, version: object = None):
    """``embed_fn(points (N, 3), scale_m) -> (N, D)`` for `locate`: at the first of ``scales_m`` asked
    for, evaluates the language hash grids once for a block of the following scales
    (``model.clip_multiscale``, (S_block, N, D) float32 bounded by ``budget_bytes``) and answers the
    next calls from it; a scale not in ``scales_m``, or an (N,) tensor of one scale per point, is evaluated
    alone (``clip_at_points``). With a ``cache`` the grids' features of those blocks' points come from
    it (`GridFeatureCache`, ``version`` naming the weights' state)."""
    index = {float(np.float32(s)): i for i, s in enumerate(scales_m)}  # locate passes float32 values
    block: dict = {"pts": None, "start": 0, "emb": None}

    def embed_fn(pts: torch.Tensor, scale_m: float | torch.Tensor) -> torch.Tensor:
        if isinstance(scale_m, torch.Tensor):  # one scale per point
            if scale_m.numel() != 1:
                with torch.no_grad():
                    return model.clip_at_points(pts, scale_m)
            scale_m = float(scale_m.reshape(-1)[0])
        i = index.get(float(np.float32(scale_m)))
        if i is None:
            with torch.no_grad():
                return model.clip_at_points(pts, scale_m)
        if block["pts"] is not pts or not block["start"] <= i < block["start"] + block["emb"].shape[0]:
            n = max(1, budget_bytes // max(1, pts.shape[0] * model.clip_dim * 4))
            scales = torch.tensor(scales_m[i:i + n], dtype=torch.float32, device=pts.device)
            feats = None if cache is None else cache.get(model, pts, version)
            block.update(pts=pts, start=i, emb=model.clip_multiscale(pts, scales, feats))
        return block["emb"][i - block["start"]]

    embed_fn.per_point_scale = True
    return embed_fn
