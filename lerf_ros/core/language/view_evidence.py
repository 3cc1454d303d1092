"""Multi-view evidence for queries from the keyframes' own CLIP crop pyramids (no encoder call).

A candidate point seen by keyframe k at pixel (u, v) and ray distance d is covered there, at language
scale s metres, by a crop of tile fraction ``s * fy / (H * d)`` of the image height. Reading the stored
pyramid embedding at (u, v) and that tile fraction gives what the encoder itself said about the place at
that scale, from that view. ``view_fn`` returns those observations (for `core.language.query.locate`'s
existence check); ``views_embed_fn`` averages them per point into an ``embed_fn``, which answers queries
before the language field has trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..frames.frame import Frame
from ..presets import CandidateConfig
from .candidates import CandidateSet, visible
from .pyramid import ClipPyramid

#: Observations whose tile fraction falls outside the pyramid's range by more than this factor are
#: out of the scales that view supervised; `views_embed_fn` still uses them with a tiny weight.
FRAC_SLACK = 1.25
_OUT_OF_RANGE_WEIGHT = 1e-3


def observations(points: Tensor, scale_m: float, cset: CandidateSet, frames: dict[int, Frame],
                 pyramid: ClipPyramid, cfg: CandidateConfig, in_range_only: bool = True):
    """Crop embeddings of ``points`` (M, 3) world metres at ``scale_m`` from every keyframe that sees them.

    Returns embeds (O, D) float32 unit, point (O,) long index into points, view (O,) long keyframe id,
    in_range (O,) bool (the tile fraction lies within the pyramid's, up to FRAC_SLACK); with
    in_range_only only those rows.
    """
    dev = pyramid.device
    pts = points.detach().double().cpu().numpy()
    lo, hi = pyramid.config.tile_fracs[0] / FRAC_SLACK, pyramid.config.tile_fracs[-1] * FRAC_SLACK
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
    for kf_id in ([] if cset.grid_ids is None else cset.grid_ids.tolist()):
        kf = frames.get(int(kf_id))
        if kf is None or not pyramid.ready(int(kf_id)):
            continue
        seen, uv, dist = visible(pts, kf, cset.grid_of(kf_id), cfg.pixel_stride, cfg)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = scale_m * kf.intrinsics.fy / (kf.intrinsics.height * dist)
        ok = seen & (frac >= lo) & (frac <= hi) if in_range_only else seen
        idx = np.nonzero(ok)[0]
        if idx.size:
            rows.append((idx, uv[idx], frac[idx], int(kf_id)))
    if not rows:
        d = pyramid.dim
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return torch.zeros(0, d, device=dev), empty, empty, torch.zeros(0, dtype=torch.bool, device=dev)
    idx = torch.from_numpy(np.concatenate([r[0] for r in rows])).to(dev)
    uv = torch.from_numpy(np.concatenate([r[1] for r in rows])).float().to(dev)
    frac = torch.from_numpy(np.concatenate([r[2] for r in rows])).float().to(dev)
    view = torch.cat([torch.full((r[0].size,), r[3], dtype=torch.long) for r in rows]).to(dev)
    emb = pyramid.sample(view, uv, frac)
    return emb, idx, view, (frac >= lo) & (frac <= hi)


def view_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
            cfg: CandidateConfig):
    """``fn(points (M, 3), scale_m) -> (embeds (O, D), view (O,))`` for `locate` (in-range rows only)."""
    by_id = dict(frames)

    def fn(points: Tensor, scale_m: float) -> tuple[Tensor, Tensor]:
        emb, _, view, _ = observations(points, scale_m, cset, by_id, pyramid, cfg)
        return emb, view

    return fn


def views_embed_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                   cfg: CandidateConfig):
    """``embed_fn(points (M, 3), scale_m) -> (M, D)`` unit: per point the mean crop embedding over the
    keyframes that see it at that scale (views out of their tile range count 1e-3; a point no keyframe
    sees gets the mean over all observations, so the output is always defined)."""
    by_id = dict(frames)

    def fn(points: Tensor, scale_m: float) -> Tensor:
        emb, idx, _, in_range = observations(points, scale_m, cset, by_id, pyramid, cfg, in_range_only=False)
        m = points.shape[0]
        out = torch.zeros(m, pyramid.dim, device=emb.device)
        if emb.shape[0] == 0:
            out[:, 0] = 1.0
            return out.to(points.device)
        w = torch.where(in_range, 1.0, _OUT_OF_RANGE_WEIGHT).unsqueeze(1)
        out.index_add_(0, idx, emb * w)
        empty = out.norm(dim=1) == 0
        out[empty] = emb.mean(dim=0)
        return F.normalize(out, dim=1).to(points.device)

    return fn
