"""Multi-view evidence for queries from the keyframes' own CLIP crop pyramids (no encoder call).

A candidate point seen by keyframe k at pixel (u, v) and ray distance d is covered there, at language
scale s metres, by a crop of tile fraction ``s * fy / (H * d)`` of the image height. Reading the stored
pyramid embedding at (u, v) and that tile fraction gives what the encoder itself said about the place at
that scale, from that view. ``view_fn`` returns those observations (for `core.language.query.locate`'s
existence check); ``views_embed_fn`` averages them per point into an ``embed_fn``, and
``views_relevancy_fn`` averages the views' relevancy per point (the cheap form `locate`'s scale search
needs): together they answer queries from the views alone, before the language field has trained or where
it has not learnt an object.

``refine_fn`` places an answer where the views agree, independently of the surface depth: every point of a
small grid around it is scored by the mean relevancy, over the keyframes whose view reaches it, of their
crops there. The views' high-relevancy cones intersect at the object (a visual hull of the query), so the
centre of the best-scored region does not inherit the rendered depth's errors along each ray, which is
what misplaces RGB-only answers. Before that, ``refine_fn`` triangulates: each keyframe that sees the
answer's neighbourhood gives the ray through the centre of its own relevancy peak there (the query's image
position in that view), and the point closest to those rays (weighted least squares, outlier rays dropped)
is where the views place the target. The hull's best region is flat along the mean viewing direction;
rays from a few tens of degrees apart pin it to centimetres. The hull serves when the rays cannot
(fewer than two views, or all from nearly one direction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..frames.frame import Frame
from ..presets import CandidateConfig
from .candidates import CandidateSet, in_view, visible
from .pyramid import ClipPyramid
from .relevancy import relevancy

#: Observations whose tile fraction falls outside the pyramid's range by more than this factor are
#: out of the scales that view supervised; `views_embed_fn` still uses them with a tiny weight.
FRAC_SLACK = 1.25
_OUT_OF_RANGE_WEIGHT = 1e-3
#: `refine_fn` counts a view for grid points up to this far behind its rendered depth there (relative,
#: metres): rendered depth without a depth sensor is often short by a few centimetres to a decimetre.
#: Behind measured depth, the candidates' own tolerance applies.
BEHIND_REL, BEHIND_M = 0.1, 0.1


def _sightings(pts: np.ndarray, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
               cfg: CandidateConfig):
    """Per keyframe with a grid and features that sees some of ``pts`` (P, 3) (`visible`): (kf_id, kf,
    indices of those points, their pixel coordinates (n, 2), their ray distances (n,))."""
    for kf_id in ([] if cset.grid_ids is None else cset.grid_ids.tolist()):
        kf = frames.get(int(kf_id))
        if kf is None or not pyramid.ready(int(kf_id)):
            continue
        seen, uv, dist = visible(pts, kf, cset.grid_of(kf_id), cfg.pixel_stride, cfg)
        idx = np.nonzero(seen)[0]
        if idx.size:
            yield int(kf_id), kf, idx, uv[idx], dist[idx]


def observations(points: Tensor, scale_m: float | Tensor, cset: CandidateSet, frames: dict[int, Frame],
                 pyramid: ClipPyramid, cfg: CandidateConfig, in_range_only: bool = True):
    """Crop embeddings of ``points`` (M, 3) world metres at ``scale_m`` (metres, or (M,): one per point)
    from every keyframe that sees them.

    Returns embeds (O, D) float32 unit, point (O,) long index into points, view (O,) long keyframe id,
    in_range (O,) bool (the tile fraction lies within the pyramid's, up to FRAC_SLACK); with
    in_range_only only those rows.
    """
    dev = pyramid.device
    pts = points.detach().double().cpu().numpy()
    scale = (scale_m.detach().double().cpu().numpy().reshape(-1) if isinstance(scale_m, Tensor)
             else np.full(pts.shape[0], float(scale_m)))
    lo, hi = pyramid.config.tile_fracs[0] / FRAC_SLACK, pyramid.config.tile_fracs[-1] * FRAC_SLACK
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
    for kf_id, kf, idx, uv, dist in _sightings(pts, cset, frames, pyramid, cfg):
        frac = scale[idx] * kf.intrinsics.fy / (kf.intrinsics.height * dist)
        ok = (frac >= lo) & (frac <= hi) if in_range_only else np.ones(idx.size, dtype=bool)
        if ok.any():
            rows.append((idx[ok], uv[ok], frac[ok], kf_id))
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

    def fn(points: Tensor, scale_m: float | Tensor) -> Tensor:
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

    fn.per_point_scale = True
    return fn


class _CellRelevancy:
    """Relevancy of every stored crop of a keyframe to one query, computed once per keyframe, and its
    interpolation at pixels and tile fractions (`ClipPyramid.sample_cells`)."""

    def __init__(self, pyramid: ClipPyramid, text: Tensor, negatives: Tensor, temperature: float):
        self.pyramid = pyramid
        self._fn = lambda grid: relevancy(F.normalize(grid, dim=1), text, negatives, temperature)
        self._cells: dict[int, Tensor] = {}

    def _values(self, kf_id: int) -> Tensor:
        if kf_id not in self._cells:
            self._cells[kf_id] = self.pyramid.cell_values(kf_id, self._fn)
        return self._cells[kf_id]

    def sample(self, kf_id: int, uv: np.ndarray, frac: np.ndarray) -> Tensor:
        return self.pyramid.sample_cells(kf_id, self._values(kf_id), torch.from_numpy(uv).float(),
                                         torch.from_numpy(frac).float())

    def levels(self, kf_id: int, uv: np.ndarray) -> Tensor:
        """(n_levels, R): the relevancy at pixels uv on every pyramid level."""
        return self.pyramid.cell_levels(kf_id, self._values(kf_id), torch.from_numpy(uv).float())


def views_relevancy_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                       cfg: CandidateConfig, text: Tensor, negatives: Tensor, temperature: float):
    """``relevancy_fn(points (M, 3), scale_m) -> (M,)`` for `locate`'s scale search: per point the mean,
    over the keyframes that see it (`visible`), of the relevancy of their crops there at that scale
    (views out of their tile range count 1e-3, as in `views_embed_fn`). Which keyframe sees which point
    is worked out once per points tensor and each keyframe's crop relevancies once, so the scales cost
    one scalar interpolation each. Points no keyframe sees get the median of the others."""
    by_id = dict(frames)
    cells = _CellRelevancy(pyramid, text, negatives, temperature)
    lo, hi = pyramid.config.tile_fracs[0] / FRAC_SLACK, pyramid.config.tile_fracs[-1] * FRAC_SLACK
    seen_by: dict = {"points": None}

    def observe(points: Tensor) -> dict:
        """Every (point, keyframe that sees it) pair: point index, image extent there and the relevancy
        on every level, all keyframes concatenated (scale-independent, so worked out once)."""
        if seen_by["points"] is not points:
            pts = points.detach().double().cpu().numpy()
            idx, extent, levels = [], [], []
            for kf_id, kf, hit, uv, dist in _sightings(pts, cset, by_id, pyramid, cfg):
                idx.append(torch.from_numpy(hit))
                extent.append(torch.from_numpy(kf.intrinsics.height * dist / kf.intrinsics.fy))
                levels.append(cells.levels(kf_id, uv).cpu())
            seen_by.update(points=points, idx=torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long),
                           extent=torch.cat(extent) if extent else torch.zeros(0, dtype=torch.float64),
                           levels=torch.cat(levels, dim=1) if levels else None)
        return seen_by

    def fn(points: Tensor, scale_m: float) -> Tensor:
        m = points.shape[0]
        obs = observe(points)
        total = torch.zeros(m, dtype=torch.float64)
        weight = torch.zeros(m, dtype=torch.float64)
        if obs["levels"] is not None:
            frac = scale_m / obs["extent"]
            w = torch.where((frac >= lo) & (frac <= hi), 1.0, _OUT_OF_RANGE_WEIGHT).double()
            r = pyramid.blend_levels(obs["levels"], frac.float()).double().cpu()
            total.index_add_(0, obs["idx"], r * w)
            weight.index_add_(0, obs["idx"], w)
        seen = weight > 0
        out = torch.where(seen, total / weight.clamp_min(1e-12), torch.zeros_like(total))
        if bool(seen.any()) and not bool(seen.all()):
            out[~seen] = out[seen].median()
        return out.float().to(points.device)

    return fn


def refine_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
              cfg: CandidateConfig, text: Tensor, canon: Tensor, temperature: float, radius_m: float,
              step_m: float, min_views: int = 3, box: tuple[np.ndarray, np.ndarray] | None = None,
              window_m: float = 0.3):
    """``fn(location (3,), scale_m) -> (3,) | None`` for `locate`: where the keyframes' views place the
    target found at ``location`` (module docstring): `triangulate_fn` (window half-size ``window_m``; 0 =
    off) when the rays meet within the hull's search cube's reach (``radius_m`` x sqrt 3) of ``location``
    (and inside ``box``), else the views' hull (`hull_fn`)."""
    reach = radius_m * math.sqrt(3.0)
    cells = _CellRelevancy(pyramid, text, canon, temperature)
    hull = hull_fn(cset, frames, pyramid, cfg, cells, radius_m, step_m, min_views, box)
    rays = triangulate_fn(cset, frames, pyramid, cfg, cells, window_m) if window_m > 0 else None

    def fn(location: np.ndarray, scale_m: float) -> np.ndarray | None:
        where = None if rays is None else rays(location, scale_m)
        if where is not None and (np.linalg.norm(where - location) > reach
                                  or (box is not None and not np.all((where >= box[0]) & (where <= box[1])))):
            where = None
        return hull(location, scale_m) if where is None else where

    return fn


#: `triangulate_fn`: relevancy samples per window side; the least spread of ray directions (degrees)
#: that can pin a point (below it the rays are near parallel: depth along them is undetermined); rays
#: farther than max(TRI_OUTLIER_M, 2 x the median) from the solution are dropped and it is solved again.
TRI_SAMPLES, TRI_MIN_SPREAD_DEG, TRI_OUTLIER_M = 15, 5.0, 0.1


def triangulate_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                   cfg: CandidateConfig, cells: _CellRelevancy, window_m: float, min_rays: int = 2):
    """``fn(location (3,), scale_m) -> (3,) | None``: the point closest to the rays through each view's
    relevancy peak around ``location``.

    Per keyframe that reaches ``location`` (`in_view`, as in `hull_fn`): the query's relevancy at scale_m
    on a TRI_SAMPLES² pixel window spanning ±window_m there (at least half inside the image); a view whose
    window peaks at or below 0.5 (it does not favour the query) is left out; else the ray through the
    centroid of the window's pixels within 20 % of the peak above the window median, weighted by the
    peak's excess. A second pass re-centres the windows on the first pass's point. None with fewer than
    ``min_rays`` rays or rays within TRI_MIN_SPREAD_DEG of one direction."""
    by_id = dict(frames)
    ax = np.linspace(-1.0, 1.0, TRI_SAMPLES)
    offsets = np.stack(np.meshgrid(ax, ax), axis=-1).reshape(-1, 2)

    def ray(kf_id: int, kf: Frame, uv: np.ndarray, dist: float, scale_m: float):
        k = kf.intrinsics
        pix = uv + offsets * (window_m * k.fy / dist)
        inside = ((pix[:, 0] >= 0) & (pix[:, 0] <= k.width - 1) & (pix[:, 1] >= 0)
                  & (pix[:, 1] <= k.height - 1))
        if inside.mean() < 0.5:
            return None
        pix = pix[inside]
        frac = np.full(pix.shape[0], scale_m * k.fy / (k.height * dist))
        r = cells.sample(kf_id, pix, frac).double().cpu().numpy()
        peak, med = float(r.max()), float(np.median(r))
        if peak <= 0.5:
            return None
        level = med + 0.8 * (peak - med)
        top = r >= level
        w = r[top] - level + 1e-3
        u, v = (pix[top] * w[:, None]).sum(axis=0) / w.sum()
        d_cam = np.array([(u - k.cx) / k.fx, (v - k.cy) / k.fy, 1.0])
        d_world = kf.T_world_cam[:3, :3] @ d_cam
        return kf.T_world_cam[:3, 3], d_world / np.linalg.norm(d_world), peak - med

    def fn(location: np.ndarray, scale_m: float) -> np.ndarray | None:
        # Windows centred off the object cut its peak on one side and pull the rays towards the start;
        # a second pass centred on the first answer removes most of that.
        first = once(np.asarray(location, dtype=np.float64), scale_m)
        second = None if first is None else once(first, scale_m)
        return first if second is None else second

    def once(loc: np.ndarray, scale_m: float) -> np.ndarray | None:
        rays = []
        for kf_id in ([] if cset.grid_ids is None else cset.grid_ids.tolist()):
            kf = by_id.get(int(kf_id))
            grid = cset.grid_of(kf_id)
            if kf is None or grid is None or not pyramid.ready(int(kf_id)):
                continue
            measured = kf.depth_m is not None
            seen, uv, dist = in_view(loc[None], kf, grid, cfg.pixel_stride,
                                     cfg.depth_tol_rel if measured else BEHIND_REL,
                                     cfg.voxel_m if measured else BEHIND_M)
            if seen[0]:
                r = ray(int(kf_id), kf, uv[0], float(dist[0]), scale_m)
                if r is not None:
                    rays.append(r)
        return closest_point(rays, min_rays)

    return fn


def closest_point(rays: Sequence[tuple[np.ndarray, np.ndarray, float]],
                  min_rays: int = 2) -> np.ndarray | None:
    """Weighted least-squares point closest to ``rays`` ((origin (3,), unit direction (3,), weight) each),
    dropping rays farther than max(TRI_OUTLIER_M, 2 x median) from it (three rounds). None with fewer than
    ``min_rays`` rays left or their directions all within TRI_MIN_SPREAD_DEG of each other."""
    def solve(rs):
        a, b = np.zeros((3, 3)), np.zeros(3)
        for o, d, w in rs:
            p = np.eye(3) - np.outer(d, d)
            a += w * p
            b += w * p @ o
        return np.linalg.lstsq(a, b, rcond=None)[0]

    def miss(x, rs):
        return np.array([np.linalg.norm((np.eye(3) - np.outer(d, d)) @ (x - o)) for o, d, _ in rs])

    keep = list(rays)
    if len(keep) < max(2, min_rays):
        return None
    x = solve(keep)
    for _ in range(3):
        m = miss(x, keep)
        kept = [r for r, e in zip(keep, m, strict=True) if e <= max(TRI_OUTLIER_M, 2.0 * float(np.median(m)))]
        if len(kept) < max(2, min_rays) or len(kept) == len(keep):
            break
        keep = kept
        x = solve(keep)
    dirs = np.stack([d for _, d, _ in keep])
    spread = np.degrees(np.arccos(np.clip(dirs @ dirs.T, -1.0, 1.0))).max()
    if spread < TRI_MIN_SPREAD_DEG or not np.all(np.isfinite(x)):
        return None
    if any(float(np.dot(x - o, d)) <= 0 for o, d, _ in keep):  # behind a camera: not where those views look
        return None
    return x


def hull_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
            cfg: CandidateConfig, cells: _CellRelevancy, radius_m: float, step_m: float, min_views: int = 3,
            box: tuple[np.ndarray, np.ndarray] | None = None):
    """``fn(location (3,), scale_m) -> (3,) | None``: the centre of the region around ``location`` (a cube
    of half-size radius_m, grid step step_m, clipped to ``box``) where the keyframes' crops at scale_m
    agree most on the query (module docstring). Views farther than their smallest crop covers scale_m read
    that smallest crop: its cone is still narrow, and far views are what pin the depth. A grid point
    counts when at least ``max(min_views, half the best-covered point's)`` keyframes reach it
    (`in_view`); the region is the points scoring within 20 % of the best above the median, weighted by
    their excess. None when no point is reached by enough views or none scores above 0.5 (no view favours
    the query there)."""
    by_id = dict(frames)
    ax = np.arange(-radius_m, radius_m + 0.5 * step_m, step_m)
    cube = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    reach = radius_m * math.sqrt(3.0)

    def fn(location: np.ndarray, scale_m: float) -> np.ndarray | None:
        pts = cube + np.asarray(location, dtype=np.float64)
        if box is not None:
            pts = pts[np.all((pts >= box[0]) & (pts <= box[1]), axis=1)]
        total = np.zeros(pts.shape[0])
        count = np.zeros(pts.shape[0])
        for kf_id in ([] if cset.grid_ids is None else cset.grid_ids.tolist()):
            kf = by_id.get(int(kf_id))
            grid = cset.grid_of(kf_id)
            if (kf is None or grid is None or not pyramid.ready(int(kf_id))
                    or not _may_see(kf, location, reach)):
                continue
            measured = kf.depth_m is not None  # a depth sensor's surface: what lies behind it is hidden
            seen, uv, dist = in_view(pts, kf, grid, cfg.pixel_stride,
                                     cfg.depth_tol_rel if measured else BEHIND_REL,
                                     cfg.voxel_m if measured else BEHIND_M)
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = scale_m * kf.intrinsics.fy / (kf.intrinsics.height * dist)
            idx = np.nonzero(seen)[0]
            if idx.size == 0:
                continue
            r = cells.sample(int(kf_id), uv[idx], frac[idx])
            total[idx] += r.double().cpu().numpy()
            count[idx] += 1
        if count.size == 0 or count.max() < min_views:
            return None
        enough = count >= max(min_views, 0.5 * count.max())
        score = np.where(enough, total / np.maximum(count, 1), -np.inf)
        best = score.max()
        if best <= 0.5:  # the views do not favour the query anywhere here: they cannot place it
            return None
        med = float(np.median(score[enough]))
        level = med + 0.8 * (best - med)
        top = score >= level
        w = score[top] - level + 1e-3
        return (pts[top] * w[:, None]).sum(axis=0) / w.sum()

    return fn


def _may_see(kf: Frame, centre: np.ndarray, reach: float) -> bool:
    """Whether any point within ``reach`` metres of ``centre`` can project into ``kf`` (a cheap bound)."""
    R, t = kf.T_world_cam[:3, :3], kf.T_world_cam[:3, 3]
    x, y, z = (np.asarray(centre, dtype=np.float64) - t) @ R
    if z + reach <= 1e-6:
        return False
    if z <= reach:
        return True
    k = kf.intrinsics
    mu, mv = k.fx * reach / (z - reach), k.fy * reach / (z - reach)
    u, v = k.fx * x / z + k.cx, k.fy * y / z + k.cy
    return -mu <= u <= k.width + mu and -mv <= v <= k.height + mv
