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

from .relevancy import closest_negative

if TYPE_CHECKING:
    from ..model import LERFModel


def points_digest(points: torch.Tensor) -> str:
    """SHA-1 of a points tensor's float32 content: caches compare the points they were built for by it."""
    return hashlib.sha1(points.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


#: `GridFeatureCache.closest` keeps the closest negatives of this many sets of negatives per block (a query
#: with negatives of its own adds one; the canonical set is every other query's).
MAX_NEGATIVE_SETS = 4


class GridFeatureCache:
    """The language hash grids' features (`LERFModel.language_features`) of the last points asked for,
    reused while neither the points nor the weights change: an idle map's queries all score the same
    candidate points, so only the first pays for the grids. The caller names the weights' state with a
    ``version`` that changes whenever they may have (the engine: the model object, its step count and a
    counter of training calls; tensors' in-place version counters do not serve, fused Adam leaves them
    as they are); the points are compared by content.

    `multiscale` also keeps those points' CLIP embeddings per block of scales (`LERFModel.clip_multiscale`)
    while they fit ``embed_budget_bytes``: they do not depend on the query text, so an idle map's scale
    search runs the language MLP once, not once per query (the tiny preset: 12 scales x 50 k points x 16
    dims, 40 MB). Larger embeddings (CLIP's 512 dims) are computed each time, as without a cache."""

    def __init__(self, embed_budget_bytes: int = 256 * 2**20) -> None:
        self._lock = threading.Lock()  # queries run concurrently (outside the engine lock)
        self._key: tuple | None = None
        self._owner = None
        self._features: torch.Tensor | None = None
        self._embeds: dict[tuple, torch.Tensor] = {}  # scales of a block -> (S, N, D), for self._key
        self._closest: dict[tuple, torch.Tensor] = {}  # (scales, negatives' digest) -> (S, N), likewise
        self.embed_budget_bytes = int(embed_budget_bytes)
        self.hits = 0

    def _current(self, model: LERFModel, points: torch.Tensor, version: object) -> tuple[tuple, torch.Tensor]:
        """(key, features) of these points, computed unless cached. Caller holds ``_lock``."""
        key = (id(model.language), version, tuple(points.shape), points_digest(points))
        if self._key == key and self._owner is model.language:
            self.hits += 1
            return key, self._features
        self._features = model.language_features(points)
        self._key, self._owner, self._embeds, self._closest = key, model.language, {}, {}
        return key, self._features

    def get(self, model: LERFModel, points: torch.Tensor, version: object) -> torch.Tensor:
        with self._lock:
            return self._current(model, points, version)[1]

    def multiscale(self, model: LERFModel, points: torch.Tensor, version: object,
                   scales_m: torch.Tensor) -> torch.Tensor:
        """``model.clip_multiscale(points, scales_m)`` (S, N, D), from the cache when these points, weights
        and scales were asked for before (and fitted the budget); checked finite once, when computed
        (ValueError if not). Treat the result as read-only."""
        with self._lock:
            _, feats = self._current(model, points, version)
            scales = tuple(float(s) for s in scales_m.reshape(-1).tolist())
            hit = self._embeds.get(scales)
            if hit is not None:
                return hit
            emb = model.clip_multiscale(points, scales_m, feats)
            if not bool(torch.isfinite(emb.sum())):  # a NaN or inf anywhere makes the sum one
                raise ValueError(f"the language field gave non-finite embeddings at {points.shape[0]} points")
            if self._held() + emb.numel() * emb.element_size() <= self.embed_budget_bytes:
                self._embeds[scales] = emb
            return emb

    def closest(self, emb: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """(S, N) `closest_negative` of a block ``emb`` (S, N, D) that `multiscale` returned, kept with it
        (per set of negatives) when it was kept: the query-independent half of the scale search."""
        with self._lock:
            scales = next((k for k, e in self._embeds.items() if e is emb), None)
            key = (scales, points_digest(negatives))
            hit = self._closest.get(key) if scales is not None else None
            if hit is not None:
                return hit
            out = _closest_per_scale(emb, negatives)
            fits = self._held() + out.numel() * out.element_size() <= self.embed_budget_bytes
            if scales is not None and fits:
                while len(self._closest) >= MAX_NEGATIVE_SETS * max(1, len(self._embeds)):
                    self._closest.pop(next(iter(self._closest)))  # the oldest: sets of negatives come and go
                self._closest[key] = out
            return out

    def _held(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._embeds, self._closest) for t in d.values())


def _closest_per_scale(emb: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(S, N) `closest_negative` of each scale of a block (S, N, D)."""
    return torch.stack([closest_negative(e, negatives) for e in emb])


def multiscale_embed_fn(model: LERFModel, scales_m: Sequence[float], budget_bytes: int = 256 * 2**20,
                        cache: GridFeatureCache | None = None, version: object = None):
    """``embed_fn(points (N, 3), scale_m) -> (N, D)`` for `locate`: at the first of ``scales_m`` asked
    for, evaluates the language hash grids once for a block of the following scales
    (``model.clip_multiscale``, (S_block, N, D) float32 bounded by ``budget_bytes``) and answers the
    next calls from it; a scale not in ``scales_m``, or an (N,) tensor of one scale per point, is evaluated
    alone (``clip_at_points``). With a ``cache`` the grids' features of those blocks' points come from
    it (`GridFeatureCache`, ``version`` naming the weights' state)."""
    index = {float(np.float32(s)): i for i, s in enumerate(scales_m)}  # locate passes float32 values
    block: dict = {"pts": None, "start": 0, "emb": None, "closest": None, "negatives": None}

    def at(scale_m) -> int | None:  # the index of a configured scale (locate passes float32 values)
        return index.get(float(np.float32(scale_m)))

    def in_block(pts: torch.Tensor, i: int | None) -> bool:  # scale i of these points is in the block
        start = block["start"]
        return i is not None and block["pts"] is pts and start <= i < start + len(block["emb"])

    def embed_fn(pts: torch.Tensor, scale_m: float | torch.Tensor) -> torch.Tensor:
        if isinstance(scale_m, torch.Tensor) and (scale_m.numel() != 1 or pts.shape[0] == 1):
            # one scale per point (a cluster's members, a sample): evaluated alone, never through the
            # block or the cache, which hold the scale search's points (a one-member cluster asked
            # through the cache would replace them)
            with torch.no_grad():
                return model.clip_at_points(pts, scale_m)
        if isinstance(scale_m, torch.Tensor):
            scale_m = float(scale_m.reshape(-1)[0])
        i = at(scale_m)
        if i is None:
            with torch.no_grad():
                return model.clip_at_points(pts, scale_m)
        if not in_block(pts, i):
            n = max(1, budget_bytes // max(1, pts.shape[0] * model.clip_dim * 4))
            scales = torch.tensor(scales_m[i:i + n], dtype=torch.float32, device=pts.device)
            emb = (model.clip_multiscale(pts, scales) if cache is None
                   else cache.multiscale(model, pts, version, scales))
            block.update(pts=pts, start=i, emb=emb, closest=None)
        return block["emb"][i - block["start"]]

    def closest(pts: torch.Tensor, scale_m: float, negatives: torch.Tensor) -> torch.Tensor | None:
        """(N,) `closest_negative` of ``pts`` at ``scale_m`` for `locate`'s scale search, from the block
        just read for them (kept in the cache with the block's embeddings); None when the block is not
        these points' or lacks the scale."""
        i = at(scale_m)
        if not in_block(pts, i):
            return None
        if block["closest"] is None or block["negatives"] is not negatives:
            emb = block["emb"]
            block["closest"] = (_closest_per_scale(emb, negatives) if cache is None
                                else cache.closest(emb, negatives))
            block["negatives"] = negatives
        return block["closest"][i - block["start"]]

    def verified(pts: torch.Tensor, scale_m: float) -> bool:
        """Whether ``pts`` at ``scale_m`` is read from a block the cache checked finite (`locate` then does
        not check it again: a sum over every embedding, each query, for each scale)."""
        return cache is not None and in_block(pts, at(scale_m))

    def rows(pts: torch.Tensor, idx: torch.Tensor, scale_m: torch.Tensor,
             keep: bool = False) -> torch.Tensor | None:
        """(M, D) embeddings of ``pts[idx]``, each at its own scale ``scale_m`` (M,), read from the block
        already computed for ``pts`` (a cluster's members after the scale search); None when the block
        is not these points' or lacks one of the scales (the caller then evaluates them). ``keep`` changes
        nothing here: the block is kept already."""
        if block["pts"] is not pts or idx.numel() == 0:
            return None
        uniq, inverse = torch.unique(scale_m.reshape(-1), return_inverse=True)
        where = [at(s) for s in uniq.tolist()]
        if not all(in_block(pts, i) for i in where):
            return None
        local = torch.tensor(where, dtype=torch.long, device=idx.device) - block["start"]
        return block["emb"][local[inverse], idx]

    embed_fn.per_point_scale = True
    embed_fn.rows = rows
    embed_fn.closest = closest
    embed_fn.verified = verified
    return embed_fn
