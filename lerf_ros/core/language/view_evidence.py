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
rays from a few tens of degrees apart pin it to centimetres. With a depth sensor, rays that pin the depth
poorly (a few degrees apart) give way to where they meet the measured surface. Without one (or where those
surface points disagree), such rays are followed instead: along the line they pin least, the place the
other keyframes' views agree on (`sweep_fn`) is triangulated again, and stands when its rays pin it (an
RGB-only cluster on floaters behind an object, or under the floor, gets rays only from the views along that
line). With triangulation switched off the hull places the answer; with it on, where the rays give nothing
(fewer than two views, or all from nearly one direction, without depth) the answer stays where it was found:
over the quality benchmark's 138 maps the hull never moved such an answer into its object's box.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..frames.frame import Frame
from ..presets import CandidateConfig
from .candidates import CandidateSet, in_view_test, seen_pairs, visible_test
from .pyramid import ClipPyramid
from .query_embed import points_digest
from .relevancy import relevancy

#: Observations whose tile fraction falls outside the pyramid's range by more than this factor are
#: out of the scales that view supervised; `views_embed_fn` still uses them with a tiny weight.
FRAC_SLACK = 1.25
_OUT_OF_RANGE_WEIGHT = 1e-3
#: `ViewIndex.kept_rows` keeps at most this many bytes of embeddings (the sample of 4096 points at the tiny
#: preset's 12 scales and CLIP-like 64 dims: 12.6 MB; at CLIP's 512 dims the first 8 scales asked for).
KEEP_BYTES = 64 * 2**20
#: A `ViewIndex` keeps its keyframes' crops, unit, up to this many bytes (96 keyframes of the tiny preset at
#: the CLIP-like 64 dims: 22 MB); larger ones (CLIP's 512 dims: ~170 MB) are read from the pyramid per call.
UNIT_GRIDS_BYTES = 64 * 2**20
#: `refine_fn` counts a view for grid points up to this far behind its rendered depth there (relative,
#: metres): rendered depth without a depth sensor is often short by a few centimetres to a decimetre.
#: Behind measured depth, the candidates' own tolerance applies.
BEHIND_REL, BEHIND_M = 0.1, 0.1


def _tile_range(pyramid: ClipPyramid) -> tuple[float, float]:
    """Tile fractions a view reads within its supervised range: the pyramid's, widened by FRAC_SLACK."""
    return pyramid.config.tile_fracs[0] / FRAC_SLACK, pyramid.config.tile_fracs[-1] * FRAC_SLACK


@dataclass(frozen=True)
class Sightings:
    """Every (keyframe, point) pair where a keyframe with a depth grid and features sees a point
    (`candidates.visible`): kf_ids (K,) those keyframes; pos (O,) int64 index into kf_ids; idx (O,)
    int64 point index; uv (O, 2) pixels; dist (O,) ray distances (metres); extent (O,) metres the
    keyframe's full image height spans at the point (``H * dist / fy``: a crop of tile fraction f covers
    f times that). From a `ViewIndex` (`ViewIndex.subset`): ``index`` that index and ``rows`` (O,) where
    each sighting lies in it, so that its crops are read from the index's tables (`ViewIndex.sample`)."""

    kf_ids: tuple[int, ...]
    pos: np.ndarray
    idx: np.ndarray
    uv: np.ndarray
    dist: np.ndarray
    extent: np.ndarray
    index: ViewIndex | None = None
    rows: np.ndarray | None = None


def _usable(cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid):
    """(grid rows, keyframe ids, keyframes) of the candidate set's grids whose keyframe has features."""
    rows, ids, kfs = [], [], []
    for row, kf_id in enumerate([] if cset.grid_ids is None else cset.grid_ids.tolist()):
        kf = frames.get(int(kf_id))
        if kf is not None and pyramid.ready(int(kf_id)):
            rows.append(row)
            ids.append(int(kf_id))
            kfs.append(kf)
    return rows, ids, kfs


def sightings(pts: np.ndarray, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
              cfg: CandidateConfig) -> Sightings:
    """`Sightings` of ``pts`` (P, 3) world metres, all keyframes at once (`candidates.seen_pairs`)."""
    rows, ids, kfs = _usable(cset, frames, pyramid)
    grids = cset.grids[rows] if rows else np.zeros((0, 1, 1), np.float32)
    pos, idx, uv, dist = seen_pairs(pts, kfs, grids, cfg.pixel_stride, visible_test(cfg))
    per_kf = np.array([kf.intrinsics.height / kf.intrinsics.fy for kf in kfs]).reshape(-1)
    extent = per_kf[pos] * dist if pos.size else np.zeros(0)
    return Sightings(tuple(ids), pos, idx, uv, dist, extent)


def observations(points: Tensor, scale_m: float | Tensor, cset: CandidateSet, frames: dict[int, Frame],
                 pyramid: ClipPyramid, cfg: CandidateConfig, in_range_only: bool = True,
                 seen: Sightings | None = None):
    """Crop embeddings of ``points`` (M, 3) world metres at ``scale_m`` (metres, or (M,): one per point)
    from every keyframe that sees them (``seen``: their `Sightings` when already known, `ViewIndex.subset`).

    Returns embeds (O, D) float32 unit, point (O,) long index into points, view (O,) long keyframe id,
    in_range (O,) bool (the tile fraction lies within the pyramid's, up to FRAC_SLACK); with
    in_range_only only those rows.
    """
    dev = pyramid.device
    pts = points.detach().double().cpu().numpy()
    scale = (scale_m.detach().double().cpu().numpy().reshape(-1) if isinstance(scale_m, Tensor)
             else np.full(pts.shape[0], float(scale_m)))
    lo, hi = _tile_range(pyramid)
    seen = sightings(pts, cset, frames, pyramid, cfg) if seen is None else seen
    frac = scale[seen.idx] / seen.extent if seen.idx.size else np.zeros(0)
    ok = (frac >= lo) & (frac <= hi) if in_range_only else np.ones(frac.size, dtype=bool)
    if not ok.any():
        d = pyramid.dim
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return torch.zeros(0, d, device=dev), empty, empty, torch.zeros(0, dtype=torch.bool, device=dev)
    idx = torch.from_numpy(seen.idx[ok]).to(dev)
    uv = torch.from_numpy(seen.uv[ok]).float().to(dev)
    frac_t = torch.from_numpy(frac[ok]).float().to(dev)
    view = torch.tensor(seen.kf_ids, dtype=torch.long)[torch.from_numpy(seen.pos[ok])].to(dev)
    if dev.type == "cpu" and seen.index is not None:
        emb = seen.index.sample(torch.from_numpy(seen.rows[ok]), frac_t)
    elif dev.type == "cpu":
        emb = sample_sparse(pyramid, seen.kf_ids, seen.pos[ok], uv, frac_t)
    else:
        emb = pyramid.sample(view, uv, frac_t)
    return emb, idx, view, (frac_t >= lo) & (frac_t <= hi)


def sample_sparse(pyramid: ClipPyramid, kf_ids: Sequence[int], pos: np.ndarray, uv: Tensor,
                  tile_frac: Tensor) -> Tensor:
    """`ClipPyramid.sample` (R, D) unit for rows of keyframe kf_ids[pos[r]] at pixel uv[r] and tile fraction
    tile_frac[r], as one sparse (R x crops) by dense (crops x D) product on the CPU: each row's two levels
    x four bilinear corners are 8 weights on the stored crops of the keyframes read, so no (R, 8, D) gather
    is built (several times faster for the thousands of sightings of a cluster)."""
    r = int(pos.size)
    if r == 0:
        return torch.zeros(0, pyramid.dim)
    used, local = np.unique(pos, return_inverse=True)
    ids = [int(kf_ids[u]) for u in used]
    lo, hi, t = (x.cpu() for x in pyramid.level_pair(tile_frac.cpu()))
    # the corners of each row's two levels only (not of every level)
    cells, w = pyramid.corner_table(ids, torch.from_numpy(local.reshape(-1)), uv.cpu().float(),
                                    levels=torch.stack([lo, hi]))
    cells, w = cells.cpu(), w.cpu()
    rows = torch.arange(r)
    c = torch.cat([cells[0], cells[1]], dim=1)  # (R, 8)
    wt = torch.cat([w[0] * (1 - t)[:, None], w[1] * t[:, None]], dim=1)
    grids = pyramid.grids_of(ids).float().cpu()
    m = _csr(rows.repeat_interleave(8), c.reshape(-1), wt.reshape(-1), r, grids.shape[0])
    return F.normalize(m @ grids, dim=1)


class _Indexed:
    """The `ViewIndex` that ``index_cache`` already holds for a points tensor, looked up once per tensor
    object (a `locate` call scores one): `subset` then gives the sightings of some of its points without
    projecting them into every keyframe again. Never builds an index (None when the cache has none)."""

    def __init__(self, index_cache: ViewIndexCache | None, cset: CandidateSet, by_id: dict[int, Frame],
                 pyramid: ClipPyramid, cfg: CandidateConfig) -> None:
        self._args = (cset, by_id, pyramid, cfg)
        self._cache = index_cache
        self._looked: tuple = ()  # (points, the cache's version) of the last lookup
        self._index: ViewIndex | None = None

    def index(self, points: Tensor) -> ViewIndex | None:
        if self._cache is None:
            return None
        if (len(self._looked) != 2 or self._looked[0] is not points
                or (self._index is None and self._looked[1] != self._cache.version)):
            self._looked = (points, self._cache.version)  # a miss is looked up again once the cache changed
            self._index = self._cache.peek(points, *self._args)
        return self._index

    def subset(self, points: Tensor, rows: Tensor) -> Sightings | None:
        index = self.index(points)
        return None if index is None else index.subset(rows)


def view_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
            cfg: CandidateConfig, index_cache: ViewIndexCache | None = None):
    """``fn(points (M, 3), scale_m) -> (embeds (O, D), view (O,))`` for `locate` (in-range rows only);
    ``fn.rows(points, rows, scale_m)``: the same for ``points[rows]`` from the sightings ``index_cache``
    holds for ``points``, or None when it holds none."""
    by_id = dict(frames)
    indexed = _Indexed(index_cache, cset, by_id, pyramid, cfg)

    def fn(points: Tensor, scale_m: float, seen: Sightings | None = None) -> tuple[Tensor, Tensor]:
        emb, _, view, _ = observations(points, scale_m, cset, by_id, pyramid, cfg, seen=seen)
        return emb, view

    def rows(points: Tensor, idx: Tensor, scale_m: float) -> tuple[Tensor, Tensor] | None:
        seen = indexed.subset(points, idx)
        return None if seen is None else fn(points[idx], scale_m, seen)

    fn.rows = rows
    return fn


def views_embed_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                   cfg: CandidateConfig, index_cache: ViewIndexCache | None = None):
    """``embed_fn(points (M, 3), scale_m) -> (M, D)`` unit: per point the mean crop embedding over the
    keyframes that see it at that scale (views out of their tile range count 1e-3; a point no keyframe
    sees gets the mean over all observations, so the output is always defined). ``embed_fn.rows`` as in
    `view_fn` (the protocol `locate` reads)."""
    by_id = dict(frames)
    indexed = _Indexed(index_cache, cset, by_id, pyramid, cfg)

    def rows(points: Tensor, idx: Tensor, scale_m: float | Tensor, keep: bool = False) -> Tensor | None:
        index = indexed.index(points)
        if index is None:
            return None
        if keep and isinstance(scale_m, Tensor):  # the same rows every query: kept per scale by the index
            def compute(sub: Tensor, scale: Tensor) -> Tensor:
                return fn(points[idx[sub]], scale, index.subset(idx[sub]))

            kept = index.kept_rows(idx, scale_m, compute)
            if kept is not None:
                return kept.to(points.device)
        return fn(points[idx], scale_m, index.subset(idx))

    def fn(points: Tensor, scale_m: float | Tensor, seen: Sightings | None = None) -> Tensor:
        emb, idx, _, in_range = observations(points, scale_m, cset, by_id, pyramid, cfg, in_range_only=False,
                                             seen=seen)
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
    fn.rows = rows
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

    def prefetch(self, kf_ids: Sequence[int]) -> None:
        """Work out the keyframes' crop relevancies not known yet in one product (not one per keyframe)."""
        todo = [int(k) for k in dict.fromkeys(kf_ids) if int(k) not in self._cells]
        if len(todo) < 2:
            return
        grids = [self.pyramid.grids_of([k]) for k in todo]
        values = self._fn(torch.cat(grids))
        self._cells.update(zip(todo, values.split([g.shape[0] for g in grids]), strict=True))

    def sample(self, kf_id: int, uv: np.ndarray, frac: np.ndarray) -> Tensor:
        return self.pyramid.sample_cells(kf_id, self._values(kf_id), torch.from_numpy(uv).float(),
                                         torch.from_numpy(frac).float())

    def sample_many(self, kf_ids: Sequence[int], pos: np.ndarray, uv: np.ndarray, frac: np.ndarray) -> Tensor:
        """`sample` for rows of several keyframes in one pass: row r reads keyframe kf_ids[pos[r]] at pixel
        uv[r] and tile fraction frac[r] (`ClipPyramid.corner_table`, then the pyramid's level blend).
        Returns (R,) float32."""
        if pos.size == 0:
            return torch.zeros(0)
        used, local = np.unique(pos, return_inverse=True)  # only the keyframes read
        ids = [int(kf_ids[u]) for u in used]
        self.prefetch(ids)
        values = torch.cat([self._values(k).float().cpu() for k in ids])
        lo, hi, t = (x.cpu() for x in self.pyramid.level_pair(torch.from_numpy(frac).float()))
        cells, w = self.pyramid.corner_table(ids, torch.from_numpy(local.reshape(-1)),
                                             torch.from_numpy(uv).float(), levels=torch.stack([lo, hi]))
        both = (values[cells.cpu()] * w.cpu()).sum(dim=-1)  # (2, R): each row's two levels
        return (1 - t) * both[0] + t * both[1]


def _csr(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """A float32 CSR matrix (n_rows, n_cols) with int32 indices from (row, col, value) triples whose rows
    are sorted ascending (several per row). A matrix-vector product with it is one pass over the values,
    several times faster on the CPU than gathering, weighting and scattering the same entries."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    index = torch.int32 if max(n_cols, int(values.numel())) < 2**31 else torch.int64
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(index), cols.to(index), values.float(),
                                       size=(n_rows, n_cols), check_invariants=False)


def _csr_bytes(m: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (m.crow_indices(), m.col_indices(), m.values()))


class ViewIndex:
    """The query-independent part of `views_relevancy_fn` for one set of points, as two kinds of sparse
    matrices: ``interp`` reads every sighting (`Sightings`: a keyframe that sees a point) on every pyramid
    level from that keyframe's stored crops (bilinear, `ClipPyramid.corner_table`), and per searched scale
    a `plan` blends the two levels around each sighting's tile fraction and averages the sightings of each
    point. A query then costs one relevancy per stored crop and one sparse product per level and scale."""

    def __init__(self, points: Tensor, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
                 cfg: CandidateConfig, plan_budget_bytes: int = 256 * 2**20) -> None:
        seen = sightings(points.detach().double().cpu().numpy(), cset, frames, pyramid, cfg)
        self.n_points = int(points.shape[0])
        self.kf_ids = seen.kf_ids
        order = torch.from_numpy(np.argsort(seen.idx, kind="stable"))  # sightings grouped by point
        self.idx = torch.from_numpy(seen.idx)[order]
        self.extent = torch.from_numpy(seen.extent).float()[order]
        self.n_levels = pyramid.fracs.numel()
        o = self.idx.numel()
        # for `subset`: the sightings in that order (compact), and where each point's begin
        on = order.numpy()
        self._pos = seen.pos[on].astype(np.int32)
        self._uv, self._dist, self._extent = seen.uv[on], seen.dist[on], seen.extent[on]
        self.offsets = torch.zeros(self.n_points + 1, dtype=torch.int64)
        self.offsets[1:] = torch.bincount(self.idx, minlength=self.n_points).cumsum(0)
        cells, weights = pyramid.corner_table(seen.kf_ids, torch.from_numpy(seen.pos)[order],
                                              torch.from_numpy(seen.uv).float()[order])
        cells, weights = cells.cpu(), weights.cpu()  # (n_levels, O, 4): row l * O + o of ``interp``
        self.n_cells = int(cells.max()) + 1 if o else 0
        self.interp = _csr(torch.arange(self.n_levels * o).repeat_interleave(4), cells.reshape(-1),
                           weights.reshape(-1), self.n_levels * o, self.n_cells)
        # the crops of these keyframes, unit (stored ones are unit up to their storage precision), once, when
        # they fit UNIT_GRIDS_BYTES (else None: read from the pyramid per call, `sample_sparse`)
        self.dim = pyramid.dim
        self._pyramid = pyramid
        self.unit_grids = self._unit_crops() if self.n_cells * self.dim * 4 <= UNIT_GRIDS_BYTES else None
        self._kept_lock = threading.Lock()  # `kept_rows`, for concurrent queries
        self._kept: dict = {}
        self.lo_hi = _tile_range(pyramid)
        self._plans: dict[float, tuple[Tensor, Tensor]] = {}
        # A kept index serves concurrent queries (outside the engine lock): the plans are read and added
        # under this lock (a sum over them while another query adds one raised "dictionary changed size")
        self._plans_lock = threading.Lock()
        self.plan_budget_bytes = int(plan_budget_bytes)

    @property
    def nbytes(self) -> int:
        with self._plans_lock:
            held = sum(_csr_bytes(m) + seen.numel() * seen.element_size() for m, seen in self._plans.values())
        kept_crops = [] if self.unit_grids is None else [self.unit_grids]
        own = sum(t.numel() * t.element_size() for t in (self.idx, self.extent, self.offsets, *kept_crops))
        own += sum(a.nbytes for a in (self._pos, self._uv, self._dist, self._extent))
        with self._kept_lock:
            own += sum(t.numel() * t.element_size() for t in self._kept.get("emb", {}).values())
        return held + own + _csr_bytes(self.interp)

    def subset(self, rows: Tensor) -> Sightings:
        """`Sightings` of the points ``rows`` (M,) (indices into the indexed points; their ``idx`` then
        counts 0..M-1 in that order), from the index instead of projecting them into every keyframe."""
        rows = rows.detach().reshape(-1).cpu().long()
        start = self.offsets[rows]
        counts = self.offsets[rows + 1] - start
        first = counts.cumsum(0) - counts
        total = int(counts.sum())
        sel = (start - first).repeat_interleave(counts, output_size=total) + torch.arange(total)
        which = torch.arange(rows.numel()).repeat_interleave(counts, output_size=total)
        s = sel.numpy()
        mine = self.unit_grids is not None  # read through this index (`sample`), else from the pyramid
        return Sightings(self.kf_ids, self._pos[s].astype(np.int64), which.numpy(), self._uv[s],
                         self._dist[s], self._extent[s], index=self if mine else None,
                         rows=s if mine else None)

    def kept_rows(self, rows: Tensor, scale_m: Tensor, compute) -> Tensor | None:
        """(M, D) embeddings of the indexed points ``rows`` (M,), each at its scale ``scale_m`` (M,), for a
        set of rows asked for again and again (`locate`'s sample for the competing phrases' medians): kept
        per (row, scale) as computed, so each pair is computed once. ``compute(sub (K,) positions in rows,
        scales (K,)) -> (K, D)`` computes the missing ones; a point's embedding depends on its own
        sightings only, so computing a part of the rows gives the same values as all of them. One set of
        rows is kept (a new one replaces it); None (the caller computes them all) when a row has no
        sighting (its embedding would depend on the other rows) or the rows would exceed KEEP_BYTES."""
        rows = rows.detach().reshape(-1).cpu().long()
        scale = scale_m.detach().reshape(-1).cpu().float()
        if rows.numel() == 0 or bool((self.offsets[rows + 1] == self.offsets[rows]).any()):
            return None
        key = hashlib.sha1(rows.numpy().tobytes()).hexdigest()
        uniq, inverse = torch.unique(scale, return_inverse=True)
        with self._kept_lock:
            if self._kept.get("key") != key:
                self._kept = {"key": key, "emb": {}, "have": {}}
            kept = self._kept
            todo = []
            for j, s in enumerate(uniq.tolist()):
                if s not in kept["emb"]:
                    if (len(kept["emb"]) + 1) * rows.numel() * self.dim * 4 > KEEP_BYTES:
                        return None
                    kept["emb"][s] = torch.zeros(rows.numel(), self.dim)
                    kept["have"][s] = torch.zeros(rows.numel(), dtype=torch.bool)
                need = ((inverse == j) & ~kept["have"][s]).nonzero().squeeze(1)
                if need.numel():
                    todo.append(need)
        if todo:
            need = torch.cat(todo)
            got = compute(need, scale[need]).float().cpu()
            with self._kept_lock:
                if self._kept is kept:
                    for j, s in enumerate(uniq.tolist()):
                        mine = inverse[need] == j
                        kept["emb"][s][need[mine]] = got[mine]
                        kept["have"][s][need[mine]] = True
        out = torch.empty(rows.numel(), self.dim)
        with self._kept_lock:
            for j, s in enumerate(uniq.tolist()):
                mine = inverse == j
                out[mine] = kept["emb"][s][mine]
        if todo:  # values computed now (a concurrent query may have replaced the kept set meanwhile)
            out[need] = got
        return out

    def _unit_crops(self) -> Tensor:
        """(n_cells, D) float32: the indexed keyframes' stored crops, unit."""
        return F.normalize(self._pyramid.grids_of(self.kf_ids)[: self.n_cells].float(), dim=1)

    def sample(self, rows: Tensor, tile_frac: Tensor) -> Tensor:
        """`sample_sparse` for sightings ``rows`` (R,) of this index at tile fractions (R,): each reads the
        two levels around its fraction through the bilinear corners ``interp`` already holds (no corner
        table is built) from the kept unit crops (``unit_grids``; `sample_sparse` blends the stored ones,
        unit up to their storage precision, float16 by default: the two differ by ~1e-3 at most). Returns
        (R, D) float32 unit, on the CPU."""
        r, o = int(rows.numel()), self.idx.numel()
        if r == 0:
            return torch.zeros(0, self.dim)
        lo, hi, t = (x.cpu() for x in self._pyramid.level_pair(tile_frac.cpu()))
        rows = rows.long()
        cols = self.interp.col_indices().view(self.n_levels * o, 4)
        vals = self.interp.values().view(self.n_levels * o, 4)
        c = torch.cat([cols[lo * o + rows], cols[hi * o + rows]], dim=1)  # (R, 8)
        w = torch.cat([vals[lo * o + rows] * (1 - t)[:, None], vals[hi * o + rows] * t[:, None]], dim=1)
        m = _csr(torch.arange(r).repeat_interleave(8), c.reshape(-1), w.reshape(-1), r, self.n_cells)
        return F.normalize(m @ self.unit_grids.cpu(), dim=1)

    def levels(self, cell_fn) -> Tensor:
        """(n_levels * O,) float32: ``cell_fn`` ((cells, D) unit crop embeddings -> (cells,)) of every
        stored crop, interpolated at every sighting on every level (all keyframes at once)."""
        if self.idx.numel() == 0:
            return torch.zeros(0)
        unit = self._unit_crops() if self.unit_grids is None else self.unit_grids
        return self.interp @ cell_fn(unit).float().cpu()

    def plan(self, scale_m: float) -> tuple[Tensor, Tensor]:
        """At ``scale_m``: the (n_points, n_levels * O) sparse matrix that blends each sighting's two levels
        around its tile fraction (the pyramid's own blend) and averages a point's sightings with weight 1,
        or 1e-3 out of the tile range (as in `views_embed_fn`); and per point whether any keyframe sees it.
        Kept per scale while the plans fit ``plan_budget_bytes`` (an idle map's queries search the same
        scales)."""
        key = float(scale_m)
        with self._plans_lock:
            hit = self._plans.get(key)
        if hit is not None:
            return hit
        o = self.idx.numel()
        frac = scale_m / self.extent
        w = torch.where((frac >= self.lo_hi[0]) & (frac <= self.lo_hi[1]), 1.0, _OUT_OF_RANGE_WEIGHT)
        total = torch.zeros(self.n_points).index_add_(0, self.idx, w)
        w = w / total[self.idx]
        lo, _, t = (x.cpu() for x in self._pyramid.level_pair(frac))  # hi = lo + 1, or lo with a single level
        col = lo * o + torch.arange(o)
        step = o if self.n_levels > 1 else 0
        rows = self.idx.repeat_interleave(2)
        cols = torch.stack([col, col + step], dim=1).reshape(-1)
        vals = torch.stack([w * (1 - t), w * t], dim=1).reshape(-1)
        plan = (_csr(rows, cols, vals, self.n_points, self.n_levels * o), total > 0)
        with self._plans_lock:
            held = sum(_csr_bytes(m) + seen.numel() for m, seen in self._plans.values())
            fits = held + _csr_bytes(plan[0]) + plan[1].numel() <= self.plan_budget_bytes
            if fits and key not in self._plans:
                self._plans[key] = plan
        return plan

    def relevancy(self, levels: Tensor, scale_m: float) -> Tensor:
        """(n_points,) float32 at ``scale_m``: per point the weighted mean over its sightings of ``levels``
        (`levels`) blended at the sighting's tile fraction; NaN where no keyframe sees it."""
        blend, seen = self.plan(scale_m)
        out = blend @ levels if self.idx.numel() else torch.zeros(self.n_points)
        return torch.where(seen, out, float("nan"))


class ViewIndexCache:
    """The last `ViewIndex`, reused while its points (by content), the candidate set, the keyframes and
    their pyramids are the ones it was built from: an idle map's queries all score the same candidate
    points. Indexes over ``budget_bytes`` are built per query and not kept (RGB-D room 44 of the quality
    benchmark, 38 k points seen 716 k times: 164 MB, and 137 MB of plans for the tiny preset's 12 scales).
    Thread-safe."""

    def __init__(self, budget_bytes: int = 512 * 2**20) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._held: tuple = ()  # what the key names by id(), kept alive so no id is reused meanwhile
        self._index: ViewIndex | None = None
        self.budget_bytes = int(budget_bytes)
        self.hits = 0
        self.version = 0  # counts the indexes kept

    @staticmethod
    def _key_of(points: Tensor, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
                cfg: CandidateConfig) -> tuple:
        ids = tuple(sorted(frames))
        return (points_digest(points), id(cset), id(pyramid), ids, tuple(id(frames[i]) for i in ids),
                tuple(pyramid.key(i) for i in ids), cfg)

    def peek(self, points: Tensor, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
             cfg: CandidateConfig) -> ViewIndex | None:
        """The index kept for exactly these inputs, or None (nothing is built)."""
        key = self._key_of(points, cset, frames, pyramid, cfg)
        with self._lock:
            return self._index if self._key == key else None

    def get(self, points: Tensor, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
            cfg: CandidateConfig) -> ViewIndex:
        ids = tuple(sorted(frames))
        key = self._key_of(points, cset, frames, pyramid, cfg)
        with self._lock:
            if self._key == key and self._index is not None:
                self.hits += 1
                return self._index
        index = ViewIndex(points, cset, frames, pyramid, cfg)
        with self._lock:
            if index.nbytes <= self.budget_bytes:
                self._key, self._index = key, index
                self._held = (cset, pyramid, tuple(frames[i] for i in ids))
                self.version += 1
        return index


def views_relevancy_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                       cfg: CandidateConfig, text: Tensor, negatives: Tensor, temperature: float,
                       index_cache: ViewIndexCache | None = None):
    """``relevancy_fn(points (M, 3), scale_m) -> (M,)`` for `locate`'s scale search: per point the mean,
    over the keyframes that see it (`visible`), of the relevancy of their crops there at that scale
    (views out of their tile range count 1e-3, as in `views_embed_fn`). Which keyframe sees which point
    and where (`ViewIndex`, from ``index_cache`` when given) and every crop's relevancy are worked out once
    per points tensor, so the scales cost one scalar interpolation each. Points no keyframe sees get the
    median of the others."""
    by_id = dict(frames)

    def cell_fn(unit_grid: Tensor) -> Tensor:
        return relevancy(unit_grid, text, negatives, temperature)

    state: dict = {"points": None}

    def prepare(points: Tensor) -> dict:
        if state["points"] is not points:
            index = (index_cache.get(points, cset, by_id, pyramid, cfg) if index_cache is not None
                     else ViewIndex(points, cset, by_id, pyramid, cfg))
            state.update(points=points, index=index, levels=index.levels(cell_fn))
        return state

    def fn(points: Tensor, scale_m: float) -> Tensor:
        st = prepare(points)
        out = st["index"].relevancy(st["levels"], scale_m)
        seen = ~torch.isnan(out)
        if not bool(seen.all()):
            out[~seen] = out[seen].median() if bool(seen.any()) else 0.0
        return out.to(points.device)

    return fn


def refine_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
              cfg: CandidateConfig, text: Tensor, canon: Tensor, temperature: float, radius_m: float,
              step_m: float, min_views: int = 3, box: tuple[np.ndarray, np.ndarray] | None = None,
              window_m: float = 0.3, ground_z: float | None = None):
    """``fn(location (3,), scale_m, points=None) -> (3,) | None`` for `locate`: where the keyframes' views
    place the target found at ``location`` (module docstring): `triangulate_fn` (window half-size
    ``window_m``; 0 = off; its loose first passes followed along their rays by `sweep_fn`) when its first
    pass meets within ``radius_m`` x sqrt 3 of ``location``, or pins a
    point in front of it (and the answer lies inside ``box``), else None; with ``window_m`` 0 the views'
    hull (`hull_fn`) instead. With a ground plane (world z ``ground_z``) a placement under it is lifted onto
    it: cameras above the floor see nothing below it, and rays from a robot's camera that meet at a grazing
    angle put a floor object's answer under the floor as easily as above it.

    ``points`` (M, 3): the found cluster's own. Where most keyframes whose images hold ``location`` have a
    depth sensor, a cluster with depth in every direction is the measured surface of one object, whose
    centre lies within about the cluster's own size of it: a placement farther than `measured_reach` (the
    cluster's diagonal, at least twice ``scale_m``) came from views whose windows peaked on a look-alike
    beside a small object, and None is returned (the cluster's centre stands). A flat cluster is a patch
    of one surface (a wall behind an object, which crops at that scale still show), and no bound holds;
    nor without depth, where clusters often lie on floaters a metre off their object."""
    reach = radius_m * math.sqrt(3.0)
    cells = _CellRelevancy(pyramid, text, canon, temperature)
    if window_m > 0:
        sweep = sweep_fn(cset, frames, pyramid, cfg, cells, step_m, min_views, box, ground_z)
        place = triangulate_fn(cset, frames, pyramid, cfg, cells, window_m, reach_m=reach, sweep=sweep)
    else:
        place = hull_fn(cset, frames, pyramid, cfg, cells, radius_m, step_m, min_views, box)

    by_id = dict(frames)

    def fn(location: np.ndarray, scale_m: float, points: np.ndarray | None = None) -> np.ndarray | None:
        where = place(location, scale_m)
        if where is not None and box is not None and not np.all((where >= box[0]) & (where <= box[1])):
            where = None
        if where is not None and ground_z is not None and where[2] < ground_z:
            where = np.array([where[0], where[1], ground_z])
        if where is not None and points is not None and \
                np.linalg.norm(where - location) > measured_reach(points, scale_m) and \
                _measured_at(location, cset, by_id, pyramid, cfg):
            return None
        return where

    return fn


def measured_reach(points: np.ndarray, scale_m: float) -> float:
    """How far `refine_fn` may move a cluster of measured surface points ``points`` (M, 3) found at
    language scale ``scale_m``, metres: the diagonal of its extent along its principal axes, and at least
    twice the scale (a cluster of a few points on a larger object's edge); no bound (inf) for a flat cluster
    of at least four points, thinner across its thinnest axis than FLAT_RATIO of its length (a patch of a
    wall, floor or table top around an object in front of or on it: the object may stand anywhere in front
    of the patch). Fewer points (any three lie in a plane) or none apart say nothing of flatness."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if p.shape[0] == 0:
        return 2.0 * float(scale_m)
    c = p - p.mean(axis=0)
    along = c @ np.linalg.svd(c, full_matrices=True)[2].T
    span = along.max(axis=0) - along.min(axis=0)  # longest axis first
    if p.shape[0] >= 4 and span[0] > 1e-9 and span[-1] < FLAT_RATIO * span[0]:
        return math.inf
    return max(float(np.linalg.norm(span)), 2.0 * float(scale_m))


def _measured_at(location: np.ndarray, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
                 cfg: CandidateConfig) -> bool:
    """Whether most keyframes whose images hold ``location`` (in front of the camera) have a depth
    sensor."""
    _, kfs, pos, _, _, _ = _reaching(np.asarray(location, dtype=np.float64)[None], cset, frames, pyramid, cfg,
                                     occlusion=False)
    measured = sum(kfs[p].depth_m is not None for p in pos.tolist())
    return pos.size > 0 and 2 * measured > pos.size


#: `triangulate_fn`: relevancy samples per window side; the least spread of ray directions (degrees)
#: that can pin a point (below it the rays are near parallel: depth along them is undetermined); rays
#: farther than max(TRI_OUTLIER_M, 2 x the median) from the solution are dropped and it is solved again.
TRI_SAMPLES, TRI_MIN_SPREAD_DEG, TRI_OUTLIER_M = 15, 5.0, 0.1
#: `triangulate_fn` with measured depth: a triangulated point whose `depth_uncertainty` exceeds this gives
#: way to where its rays meet the measured surface (`surface_cut`), metres.
TRI_PIN_M = 0.06
#: `measured_reach`: a cluster thinner than this fraction of its length (across its principal axes) is a
#: patch of one surface, not an object's surface in depth (synthetic rooms: wall patches < 0.01, clusters
#: on objects 0.4-0.9; a depth sensor's centimetre of noise on a 20 cm wall patch gives ~0.1).
FLAT_RATIO = 0.25
#: `triangulate_fn`'s sweep along loose rays starts this far (metres) past the camera farthest back along
#: their line (`loosest_line`'s ``near``).
SWEEP_NEAR_M = 0.2


def triangulate_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                   cfg: CandidateConfig, cells: _CellRelevancy, window_m: float, min_rays: int = 2,
                   reach_m: float = math.inf, sweep=None):
    """``fn(location (3,), scale_m) -> (3,) | None``: the point closest to the rays through each view's
    relevancy peak around ``location``.

    Per keyframe whose image holds ``location`` (in front of the camera, whatever its depth there: an
    RGB-only answer often lies behind the object, where the model rendered it, and a view whose rendered
    surface lies in front of that spot still shows the object at that pixel): the query's relevancy at
    scale_m on a TRI_SAMPLES² pixel window spanning ±window_m there (at least half inside the image); a view
    whose window peaks at or below 0.5 (it does not favour the query, e.g. the object is hidden there) is
    left out, a ray far from the others is dropped as an outlier (`closest_point`); else the ray through
    the centroid of the window's pixels within 20 % of the peak above the window median, weighted by the
    peak's excess. A second pass re-centres the windows on the first pass's point; its answer stands when
    it lies within ``window_m`` of the first (farther, the re-centred windows caught something else: the
    first stands). Keyframes with measured depth also give each ray's point on their surface: where those
    agree (`surface_cut`), they place the answer when the rays cannot (within TRI_MIN_SPREAD_DEG of one
    direction, or meeting behind a camera) or pin its depth more loosely than TRI_PIN_M
    (`depth_uncertainty`: a small object seen from one pass). Without an agreeing surface, a first pass
    that pins the depth that loosely, or rays within TRI_MIN_SPREAD_DEG of one direction (no point at all;
    their line through `nearest_on_rays` of ``location``), is checked along its rays (``sweep``,
    `sweep_fn`): on the line they pin least (`loosest_line`), from SWEEP_NEAR_M past the camera farthest
    back along it to ``window_m`` past the meeting point, the place the other views agree on most is
    triangulated again; that answer stands when it pins its depth within TRI_PIN_M and lies within
    ``window_m`` of the line (it is not held to ``reach_m``: the rays came from windows around
    ``location``). Rays from one pass through an object and on to a floater behind it, or under the floor,
    meet anywhere along that stretch, and the windows around their far end hold only the views along it.
    The swept place alone is not trusted (with ambiguous relevancy the best-scored point of a line can lie
    on something else); its triangulation is. None, unless the sweep confirms a place: with fewer than
    ``min_rays`` rays, rays within TRI_MIN_SPREAD_DEG of one direction or meeting behind a camera (and no
    measured surface), or a first answer farther than ``reach_m`` from ``location`` (the rays met on
    something else), unless it pins its depth within TRI_PIN_M and ``location`` lies behind it as the
    cameras look (an RGB-only cluster on floaters behind its object, which the rays met on)."""
    by_id = dict(frames)
    ax = np.linspace(-1.0, 1.0, TRI_SAMPLES)
    offsets = np.stack(np.meshgrid(ax, ax), axis=-1).reshape(-1, 2)

    def window(kf: Frame, uv: np.ndarray, dist: float) -> np.ndarray | None:
        """The window's pixels inside the image; None when fewer than half are."""
        k = kf.intrinsics
        pix = uv + offsets * (window_m * k.fy / dist)
        inside = ((pix[:, 0] >= 0) & (pix[:, 0] <= k.width - 1) & (pix[:, 1] >= 0)
                  & (pix[:, 1] <= k.height - 1))
        return pix[inside] if inside.mean() >= 0.5 else None

    def ray(kf: Frame, pix: np.ndarray, r: np.ndarray):
        """The ray through the window's relevancy peak ``r`` at ``pix``; None if the view does not favour
        the query there."""
        k = kf.intrinsics
        if not np.isfinite(r).all():
            return None
        peak, med = float(r.max()), float(np.median(r))
        if peak <= 0.5:
            return None
        level = med + 0.8 * (peak - med)
        top = r >= level
        w = r[top] - level + 1e-3
        u, v = (pix[top] * w[:, None]).sum(axis=0) / w.sum()
        d_cam = np.array([(u - k.cx) / k.fx, (v - k.cy) / k.fy, 1.0])
        d_world = kf.T_world_cam[:3, :3] @ d_cam
        origin = kf.T_world_cam[:3, 3]
        return origin, d_world / np.linalg.norm(d_world), peak - med, surface(kf, u, v, origin, d_world)

    def surface(kf: Frame, u: float, v: float, origin: np.ndarray, d_world: np.ndarray) -> np.ndarray | None:
        """Where the ray from ``origin`` through pixel (u, v) (world direction ``d_world``, unit optical z)
        meets the keyframe's measured depth there; None without a valid measurement."""
        if kf.depth_m is None or not (math.isfinite(u) and math.isfinite(v)):
            return None
        z = float(kf.depth_m[round(v), round(u)])
        return origin + z * d_world if math.isfinite(z) and z > 0 else None

    def fn(location: np.ndarray, scale_m: float) -> np.ndarray | None:
        # Windows centred off the object cut its peak on one side and pull the rays towards the start;
        # a second pass centred on the first answer removes most of that.
        start = np.asarray(location, dtype=np.float64)
        first, line, loose = once(start, scale_m)
        if loose and sweep is not None and line is not None:
            # From the nearest camera to just past where the loose rays met: the object lies in front of
            # the floaters its rays ended on, not behind them.
            o, d, near = line
            near += SWEEP_NEAR_M
            swept = sweep(o + near * d, d, window_m - near, scale_m) if window_m > near else None
            there, _, still_loose = (None, None, True) if swept is None else once(swept, scale_m)
            if there is not None and not still_loose and _line_miss(there, (o, d)) <= window_m:
                return there
        if first is None:
            return None
        if np.linalg.norm(first - start) > reach_m and (loose or line is None or not _behind(start, line)):
            return None
        second, _, _ = once(first, scale_m)
        # A second answer beyond the windows' reach of the first came from rays the re-centred windows
        # caught on something else (their peaks at the windows' edges): the first stands.
        if second is None or np.linalg.norm(second - first) > window_m:
            return first
        return second

    def once(loc: np.ndarray, scale_m: float) -> tuple[np.ndarray | None, tuple | None, bool]:
        """The views' point around ``loc`` (None: none); the line the rays pin least (`loosest_line`, through
        their meeting point, or for rays within TRI_MIN_SPREAD_DEG of one direction through their point
        nearest ``loc``; else None); whether the rays leave the depth along it open (pinned more loosely
        than TRI_PIN_M, or not at all) with no measured surface to stand for them."""
        ids, kfs, pos, _, uv, dist = _reaching(loc[None], cset, by_id, pyramid, cfg, occlusion=False)
        wins = [(p, window(kfs[p], uv[j], float(dist[j]))) for j, p in enumerate(pos.tolist())]
        wins = [(p, pix, scale_m * kfs[p].intrinsics.fy / (kfs[p].intrinsics.height * float(dist[j])))
                for j, (p, pix) in enumerate(wins) if pix is not None]
        if not wins:
            return None, None, False
        sizes = [pix.shape[0] for _, pix, _ in wins]
        # every window of every keyframe in one interpolation (not one call per keyframe)
        r_all = cells.sample_many(ids, np.repeat([p for p, _, _ in wins], sizes),
                                  np.concatenate([pix for _, pix, _ in wins]),
                                  np.repeat([f for _, _, f in wins], sizes)).double().numpy()
        rays = [ray(kfs[p], pix, r) for (p, pix, _), r in zip(wins, np.split(r_all, np.cumsum(sizes)[:-1]),
                                                               strict=True)]
        rays = [r for r in rays if r is not None]
        lines = [r[:3] for r in rays]
        met = closest_point(lines, min_rays)
        on_surface = surface_cut([r[3] for r in rays], min_rays)
        # With a depth sensor, where the rays meet the measured surface stands for a triangulation that
        # pins the depth along them more loosely than TRI_PIN_M (rays from one pass, a few degrees apart).
        if met is None:
            if on_surface is not None or len(lines) < max(2, min_rays):
                return on_surface, None, False
            near = nearest_on_rays(lines, loc)
            kept = _kept(near, lines)
            if len(kept) < max(2, min_rays) or _spread_deg(kept) >= TRI_MIN_SPREAD_DEG:
                return None, None, False
            return None, loosest_line(kept, near), True  # near-parallel rays: their line, not the depth
        loose = depth_uncertainty(met, lines) > TRI_PIN_M
        if loose and on_surface is not None:
            return on_surface, None, False
        return met, loosest_line(_kept(met, lines), met), loose

    return fn


def _reaching(pts: np.ndarray, cset: CandidateSet, frames: dict[int, Frame], pyramid: ClipPyramid,
              cfg: CandidateConfig, keep=None, occlusion: bool = True):
    """Every (keyframe, point) pair where the point lies in the keyframe's view up to its surface
    (`candidates.in_view`: behind measured depth by the candidates' tolerance, behind rendered depth by
    BEHIND_REL / BEHIND_M), all keyframes at once; occlusion=False: anywhere in front of the camera inside
    the image, whatever the depth there. ``keep(kf)``: only keyframes it accepts.
    Returns (keyframe ids, keyframes, positions (O,) into them, point indices (O,), uv (O, 2), ray distances
    (O,)), keyframe by keyframe in the candidate set's order."""
    rows, ids, kfs = _usable(cset, frames, pyramid)
    if keep is not None:
        chosen = [i for i, kf in enumerate(kfs) if keep(kf)]
        rows, ids, kfs = [rows[i] for i in chosen], [ids[i] for i in chosen], [kfs[i] for i in chosen]
    parts = []
    for measured in (False, True):  # a depth sensor's surface hides what lies behind it
        sel = [i for i, kf in enumerate(kfs) if (kf.depth_m is not None) == measured]
        if not sel:
            continue
        test = (in_view_test(cfg.depth_tol_rel, cfg.voxel_m) if measured
                else in_view_test(BEHIND_REL, BEHIND_M))
        if not occlusion:
            test = _in_front
        p, idx, uv, dist = seen_pairs(pts, [kfs[i] for i in sel], cset.grids[[rows[i] for i in sel]],
                                      cfg.pixel_stride, test)
        parts.append((np.asarray(sel, dtype=np.int64)[p], idx, uv, dist))
    if not parts:
        return ids, kfs, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0)
    pos, idx, uv, dist = (np.concatenate([q[i] for q in parts]) for i in range(4))
    order = np.argsort(pos, kind="stable")
    return ids, kfs, pos[order], idx[order], uv[order], dist[order]


def _in_front(z: np.ndarray, d: np.ndarray) -> np.ndarray:
    """`seen_pairs`'s accept test without occlusion: every point in front of the camera."""
    return z > 0


def closest_point(rays: Sequence[tuple[np.ndarray, np.ndarray, float]],
                  min_rays: int = 2) -> np.ndarray | None:
    """Weighted least-squares point closest to ``rays`` ((origin (3,), unit direction (3,), weight) each),
    dropping rays farther than max(TRI_OUTLIER_M, 2 x median) from it (three rounds). None with fewer than
    ``min_rays`` rays left or their directions all within TRI_MIN_SPREAD_DEG of each other."""
    def solve(rs):
        a, b = _normal_equations(rs)
        return np.linalg.lstsq(a, b, rcond=None)[0]

    keep = list(rays)
    if len(keep) < max(2, min_rays):
        return None
    x = solve(keep)
    for _ in range(3):
        kept = _inliers(x, keep)
        if len(kept) < max(2, min_rays) or len(kept) == len(keep):
            break
        keep = kept
        x = solve(keep)
    if _spread_deg(keep) < TRI_MIN_SPREAD_DEG or not np.all(np.isfinite(x)):
        return None
    if any(float(np.dot(x - o, d)) <= 0 for o, d, _ in keep):  # behind a camera: not where those views look
        return None
    return x


def _normal_equations(rays) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of the weighted least-squares point closest to ``rays``: A = sum w (I - d d^T),
    b = sum w (I - d d^T) o; A's eigenvectors say how firmly the rays pin a point along each direction."""
    a, b = np.zeros((3, 3)), np.zeros(3)
    for o, d, w in rays:
        p = np.eye(3) - np.outer(d, d)
        a += w * p
        b += w * p @ o
    return a, b


def _spread_deg(rays) -> float:
    """The largest angle between two of ``rays``' directions, degrees."""
    dirs = np.stack([d for _, d, _ in rays])
    return float(np.degrees(np.arccos(np.clip(dirs @ dirs.T, -1.0, 1.0))).max())


def nearest_on_rays(rays: Sequence[tuple[np.ndarray, np.ndarray, float]], x: np.ndarray) -> np.ndarray:
    """The point closest to ``rays`` (weighted least squares) with a small pull towards ``x`` (1e-3 of the
    rays' weight) that settles what they leave open: for rays that pin a point, about that point; for
    exactly parallel ones, the point of their bundle beside ``x``; for rays a few degrees apart, a blend of
    their meeting point and that (the pull is then comparable to how weakly they pin their depth)."""
    x = np.asarray(x, dtype=np.float64)
    a, b = _normal_equations(rays)
    eps = 1e-3 * sum(w for _, _, w in rays)
    return np.linalg.lstsq(a + eps * np.eye(3), b + eps * x, rcond=None)[0]  # zero weights: no error


def _line_miss(x: np.ndarray, line: tuple) -> float:
    """How far ``x`` lies from ``line`` (origin, unit direction, ...), metres."""
    o, d = line[0], line[1]
    return float(np.linalg.norm((np.eye(3) - np.outer(d, d)) @ (np.asarray(x, dtype=np.float64) - o)))


def _behind(x: np.ndarray, line: tuple) -> bool:
    """Whether ``x`` lies past ``line``'s origin as its cameras look (`loosest_line`): farther from them
    than where their rays met, as a cluster on floaters behind the object the rays met on."""
    return float(np.dot(np.asarray(x, dtype=np.float64) - line[0], line[1])) > 0.0


def _kept(x: np.ndarray, rays) -> list:
    """The rays `closest_point` keeps at its answer ``x`` (its outlier rule, up to three rounds)."""
    keep = list(rays)
    for _ in range(3):
        kept = _inliers(x, keep)
        if len(kept) < 2 or len(kept) == len(keep):
            break
        keep = kept
    return keep


def loosest_line(rays: Sequence[tuple[np.ndarray, np.ndarray, float]], through: np.ndarray) -> tuple | None:
    """The line through ``through`` (the rays' meeting point) along which the rays pin it least: the
    eigenvector of the least-squares normal matrix sum w (I - d d^T) with the smallest eigenvalue (for rays
    from one side, about their mean direction; for rays from two opposite sides, the axis they share),
    pointed away from the cameras. Returns (origin = ``through``, unit direction, near: the signed distance
    along it of the camera farthest back, negative for cameras behind ``through`` as the line points);
    None without rays."""
    if not rays:
        return None
    x = np.asarray(through, dtype=np.float64)
    d = np.linalg.eigh(_normal_equations(rays)[0])[1][:, 0]
    if sum(w * float(np.dot(d, r)) for _, r, w in rays) < 0:
        d = -d
    near = min(float(np.dot(o - x, d)) for o, _, _ in rays)
    return x, d, near


def sweep_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
             cfg: CandidateConfig, cells: _CellRelevancy, step_m: float, min_views: int = 3,
             box: tuple[np.ndarray, np.ndarray] | None = None, ground_z: float | None = None):
    """``fn(origin (3,), direction (3,) unit, length, scale_m) -> (3,) | None``: where along the segment
    from ``origin`` (``length`` metres long) the keyframes' views agree most on the query (`view_scores` of
    points every ``step_m``, inside ``box`` and not under the ground plane at world z ``ground_z``). Rays
    from one pass that cross an object and end on a floater behind it, or under the floor, leave the depth
    along them open; views from elsewhere see the object only where it is, and a point under a surface is
    reached by few of them. None when no point scores (`view_scores`)."""
    score = view_scores(cset, frames, pyramid, cfg, cells, min_views)

    def fn(origin: np.ndarray, direction: np.ndarray, length: float, scale_m: float) -> np.ndarray | None:
        t = np.arange(0.0, float(length) + 0.5 * step_m, step_m)
        pts = np.asarray(origin, dtype=np.float64) + t[:, None] * np.asarray(direction, dtype=np.float64)
        ok = np.ones(pts.shape[0], dtype=bool)
        if box is not None:
            ok &= np.all((pts >= box[0]) & (pts <= box[1]), axis=1)
        if ground_z is not None:
            ok &= pts[:, 2] >= ground_z
        pts = pts[ok]
        if pts.shape[0] == 0:
            return None
        mid = 0.5 * (pts[0] + pts[-1])  # every point within half the kept stretch of it
        half = 0.5 * float(np.linalg.norm(pts[-1] - pts[0])) + 1e-6
        s = score(pts, scale_m, keep=lambda kf: _may_see(kf, mid, half))
        return None if s is None else pts[int(np.argmax(s))]

    return fn


def _misses(x: np.ndarray, rays) -> np.ndarray:
    """Each ray's distance from ``x``."""
    return np.array([np.linalg.norm((np.eye(3) - np.outer(d, d)) @ (x - o)) for o, d, _ in rays])


def _inliers(x: np.ndarray, rays) -> list:
    """The rays that count at ``x``: within max(TRI_OUTLIER_M, 2 x the median) of it."""
    m = _misses(x, rays)
    return [r for r, e in zip(rays, m, strict=True) if e <= max(TRI_OUTLIER_M, 2.0 * float(np.median(m)))]


def depth_uncertainty(x: np.ndarray, rays: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> float:
    """How loosely rays pin the depth of their meeting point ``x`` (`closest_point`'s answer) along them:
    the median distance from ``x`` of the rays that count there (`closest_point`'s outlier rule, applied at
    ``x``) divided by the largest sine of the angle between two of them (the pair closest to 90 degrees:
    rays from opposite sides pin a point as well as rays from one side); metres, inf when they are
    parallel. Rays a few degrees apart that miss ``x`` by centimetres leave it decimetres loose along them."""
    keep = _kept(x, rays)
    dirs = np.stack([d for _, d, _ in keep])
    sine = float(np.sqrt(np.clip(1.0 - (dirs @ dirs.T) ** 2, 0.0, 1.0)).max())
    return float(np.median(_misses(x, keep))) / sine if sine > 1e-6 else math.inf


def surface_cut(points: Sequence[np.ndarray | None], min_rays: int = 2) -> np.ndarray | None:
    """Where the views' rays meet the measured surface: ``points`` are each ray's point on its keyframe's
    measured depth (None: no measurement). The per-axis median of the points within TRI_OUTLIER_M of their
    median; None unless at least ``min_rays`` (and 2) points, and at least half of the measured ones, lie
    that close (RGB-only views have none; rays through the edge of a small object that hit what lies behind
    it scatter)."""
    pts = np.array([p for p in points if p is not None]).reshape(-1, 3)
    if pts.shape[0] < max(2, min_rays):
        return None
    near = pts[np.linalg.norm(pts - np.median(pts, axis=0), axis=1) <= TRI_OUTLIER_M]
    enough = near.shape[0] >= max(2, min_rays) and 2 * near.shape[0] >= pts.shape[0]
    return np.median(near, axis=0) if enough else None


def hull_fn(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
            cfg: CandidateConfig, cells: _CellRelevancy, radius_m: float, step_m: float, min_views: int = 3,
            box: tuple[np.ndarray, np.ndarray] | None = None):
    """``fn(location (3,), scale_m) -> (3,) | None``: the centre of the region around ``location`` (a cube
    of half-size radius_m, grid step step_m, clipped to ``box``) where the keyframes' crops at scale_m
    agree most on the query (module docstring; each grid point scored by `view_scores`): the centre of the
    points scoring within 20 % of the best above the median, weighted by their excess. None when
    `view_scores` gives None (too few views reach the cube, or none favours the query there)."""
    ax = np.arange(-radius_m, radius_m + 0.5 * step_m, step_m)
    cube = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    reach = radius_m * math.sqrt(3.0)
    score = view_scores(cset, frames, pyramid, cfg, cells, min_views)

    def fn(location: np.ndarray, scale_m: float) -> np.ndarray | None:
        pts = cube + np.asarray(location, dtype=np.float64)
        if box is not None:
            pts = pts[np.all((pts >= box[0]) & (pts <= box[1]), axis=1)]
        s = score(pts, scale_m, keep=lambda kf: _may_see(kf, location, reach))
        if s is None:
            return None
        good = np.isfinite(s)
        med = float(np.median(s[good]))
        level = med + 0.8 * (s.max() - med)
        top = s >= level
        w = s[top] - level + 1e-3
        return (pts[top] * w[:, None]).sum(axis=0) / w.sum()

    return fn


def view_scores(cset: CandidateSet, frames: Sequence[tuple[int, Frame]], pyramid: ClipPyramid,
                cfg: CandidateConfig, cells: _CellRelevancy, min_views: int = 3):
    """``fn(points (P, 3), scale_m, keep=None) -> (P,) | None``: each point's relevancy at scale_m averaged
    over the keyframes that reach it (`_reaching`: in view up to their surface; ``keep(kf)`` narrows the
    keyframes looked at). Where at least ``min_views`` of them resolve scale_m (its tile fraction there lies
    in the range their crops were supervised at), the mean is weighted as in `views_embed_fn`: those weigh
    1, the others 1e-3 (a view too far for its smallest crop to cover scale_m reads mostly background around
    a small object, and its low relevancy would drown the nearer views that resolve it: a 10 cm table sphere
    seen by 27 views from 1 to 6 m, mean 0.29, near views 0.9; a view too near for its largest crop, a part
    of the object). Where fewer resolve it, all count alike (one close view's cone alone does not pin a
    place). A point scores only when at least
    ``max(min_views, half the best-covered point's)`` keyframes reach it (else -inf: a point under a surface
    that few views reach, or at the edge of what they saw). None when no point is reached by enough views
    or none scores above 0.5 (no view favours the query there)."""
    by_id = dict(frames)
    lo, hi = _tile_range(pyramid)

    def fn(pts: np.ndarray, scale_m: float, keep=None) -> np.ndarray | None:
        # per point: relevancy summed over the views that resolve scale_m and over the others; their counts
        sum_in, sum_out = np.zeros(pts.shape[0]), np.zeros(pts.shape[0])
        resolved, count = np.zeros(pts.shape[0]), np.zeros(pts.shape[0])
        ids, kfs, pos, idx, uv, dist = _reaching(pts, cset, by_id, pyramid, cfg, keep=keep)
        cells.prefetch([ids[p] for p in np.unique(pos)])
        for p in np.unique(pos).tolist():
            rows = np.nonzero(pos == p)[0]
            k = kfs[p].intrinsics
            frac = scale_m * k.fy / (k.height * dist[rows])
            r = cells.sample(ids[p], uv[rows], frac).double().cpu().numpy()
            inside = (frac >= lo) & (frac <= hi)
            sum_in[idx[rows]] += np.where(inside, r, 0.0)
            sum_out[idx[rows]] += np.where(inside, 0.0, r)
            resolved[idx[rows]] += inside
            count[idx[rows]] += 1
        if count.size == 0 or count.max() < min_views:
            return None
        enough = count >= max(min_views, 0.5 * count.max())
        w = _OUT_OF_RANGE_WEIGHT  # the others' weight where enough views resolve scale_m; else all alike
        weighted = (sum_in + w * sum_out) / np.maximum(resolved + w * (count - resolved), 1e-12)
        mean = np.where(resolved >= min_views, weighted, (sum_in + sum_out) / np.maximum(count, 1))
        score = np.where(enough, mean, -np.inf)
        return score if score.max() > 0.5 else None

    return fn


def _may_see(kf: Frame, centre: np.ndarray, reach: float) -> bool:
    """Whether any point within ``reach`` metres of ``centre`` can project into ``kf`` (a cheap bound: the
    ball's bounding box in the camera frame, whose image spans x / z from its corners; never False for a
    ball that shows in the image)."""
    R, t = kf.T_world_cam[:3, :3], kf.T_world_cam[:3, 3]
    x, y, z = (np.asarray(centre, dtype=np.float64) - t) @ R
    if z + reach <= 1e-6:
        return False
    if z - reach <= 1e-6:
        return True
    k = kf.intrinsics

    def span(a: float) -> tuple[float, float]:  # the range of a' / z' over a' in a +- reach, z' in z +- reach
        lo, hi = a - reach, a + reach
        return (lo / (z - reach) if lo < 0 else lo / (z + reach),
                hi / (z - reach) if hi > 0 else hi / (z + reach))

    (xl, xh), (yl, yh) = span(x), span(y)
    return (k.fx * xh + k.cx >= 0 and k.fx * xl + k.cx <= k.width
            and k.fy * yh + k.cy >= 0 and k.fy * yl + k.cy <= k.height)
