"""3D query over candidate surface points, without rendering full images.

The caller (the engine) supplies surface points in the world frame (lifted from keyframe depth, measured
or rendered), how many keyframes saw each, the range of language scales each point was supervised at,
and ``embed_fn(points, scale_m)`` (the language field, or the keyframes' own crop embeddings before the
field has trained). ``locate``:

1. scores every point at every searched scale (LERF relevancy against the canonical and the caller's
   negatives), but reads a point only at scales it was actually trained at: a point seen from ray
   distances d_min..d_max by a camera whose image height spans H / fy metres per metre was supervised
   between ``tile_frac_min * H * d_min / fy`` and ``tile_frac_max * H * d_max / fy`` (``scale_range``);
2. picks the best scale (LERF scale search, robust top-k score);
3. grows clusters from the strongest peaks: points connected to the peak, above half-way between the
   scene's median relevancy and the peak, and within a radius tied to the chosen scale;
4. judges each cluster with evidence that does not rest on one absolute threshold (``confidence``):
   does the query beat every negative there (relevancy > 0.5), how far does the peak stand out of the
   scene's own relevancy distribution at that scale (robust z-score), does a competing phrase (a small
   vocabulary of common object / attribute words, and the caller's negatives) explain the peak better,
   and do the keyframes that saw the place agree (their stored crop embeddings, ``view_fn``);
5. returns up to ``max_results`` targets whose confidence reaches the threshold, best first, each with
   its surface centre, axis-aligned extent, relevancy, confidence and point count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from .relevancy import relevancy, scale_search

#: Common object and attribute words whose relevancy competes with the query's (``ExistenceConfig``).
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta", "pink", "brown", "white",
    "grey", "black", "wood", "metal", "plastic", "glass", "fabric", "paper", "floor", "wall", "ceiling",
    "table", "chair", "door", "window", "shelf", "cabinet", "sofa", "bed", "lamp", "screen", "box",
    "bottle", "cup", "mug", "bowl", "plate", "book", "bag", "toy", "ball", "can", "jar", "shoe", "plant",
    "cable", "towel", "tool", "pillow",
)
MAX_RESULTS_LIMIT = 100
#: Points sampled for each phrase's scene median (competitor test).
_MEDIAN_SAMPLE = 4096
#: A cluster's score (a float32 mean of its top relevancies) exceeds none of them by more than this.
_SCORE_SLACK = 1e-6


def _default_scales() -> tuple[float, ...]:
    # LERF searches 30 scales; geometric spacing gives small objects (5-30 cm) as many steps as large ones.
    return tuple(float(x) for x in np.geomspace(0.05, 2.0, 30).round(4))


@dataclass(frozen=True)
class ExistenceConfig:
    """How a cluster's evidence becomes a confidence in [0, 1]; the product of four soft factors.

    beat_negatives: relevancy above 0.5 (closer to the query than to every negative) by ``min_excess``,
                    softened over ``excess_width``
    stand_out:      the cluster score's robust z-score against the scene's relevancy at that scale
                    (median, 1.4826 MAD floored at ``min_spread``) passes ``z0``, softened over ``z_width``
    no_competitor:  no vocabulary phrase / caller negative stands out on the cluster (its relevancy there
                    above its own scene median) more than the query does, by more than
                    ``competitor_margin`` (softened over ``competitor_width``); phrases made only of the
                    query's own words ("mug" for "red mug") do not compete
    views:          the fraction of keyframes seeing the cluster whose own crop embedding scores the query
                    above the scene's median (and 0.5) by min_excess; confidence is scaled by
                    ``1 - view_weight * (1 - support)``

    Calibrated on the randomised synthetic rooms (``bench/quality.py``) with the demo colour encoder and
    the CLIP-like test encoder (target ~0.66, look-alike ~0.58, background ~0.5); see README
    "Calibrating existence" for how to recalibrate with real CLIP weights.
    """

    min_excess: float = 0.01
    excess_width: float = 0.01
    z0: float = 4.0
    z_width: float = 1.0
    min_spread: float = 0.003
    competitor_margin: float = 0.015
    competitor_width: float = 0.01
    view_weight: float = 0.5

    def validate(self) -> ExistenceConfig:
        vals = (self.min_excess, self.excess_width, self.z0, self.z_width, self.min_spread,
                self.competitor_margin, self.competitor_width, self.view_weight)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"existence parameters must be finite, got {self}")
        if min(self.excess_width, self.z_width, self.min_spread, self.competitor_width) <= 0:
            raise ValueError(f"existence widths and min_spread must be > 0, got {self}")
        if not 0.0 <= self.view_weight <= 1.0:
            raise ValueError(f"view_weight must be in [0, 1], got {self.view_weight}")
        return self


@dataclass(frozen=True)
class QueryConfig:
    """threshold:          confidence (0..1) a target needs to count as found
    min_views:          points seen by fewer keyframes are dropped (floaters, single-view guesses)
    voxel_m:            candidate points are merged per voxel of this size first (0 = off), metres
    cluster_radius_m:   link distance when growing a cluster from its peak (> the candidate spacing), metres
    grow_scale_factor:  a cluster extends at most this many chosen-scale lengths from its peak
    top_k:              a cluster's score is the mean of its top_k relevancies, counting missing ones as 0,
                        so a cluster of fewer than top_k points (an isolated noisy voxel) scores low
    scales_m:           language scales searched, metres
    scale_slack:        a point is read at scales within [lo / slack, hi * slack] of its trained range
    refine_radius_m:    a found target is moved to where the keyframes' views agree
                        (`view_evidence.refine_fn`; 0 = off): the rays' meeting point must lie within this
                        distance x sqrt 3 of its cluster's centre; with triangulation off, the views' hull is
                        searched this far around it, metres
    refine_step_m:      grid step of the hull's search and of the sweep along loosely pinned rays, metres
    triangulate_window_m: the target is triangulated from the rays through each view's relevancy peak
                        within this distance of it (`view_evidence.triangulate_fn`); where the rays give
                        nothing it stays where it was found. 0 = no triangulation: the views' hull places
                        it, metres
    views_fallback:     when the language field finds nothing, the engine searches the keyframes' own crop
                        embeddings (`view_evidence`) with the same existence tests (answer source "views")
    max_cloud_points:   the returned cloud keeps at most this many points (the most relevant)
    temperature:        relevancy temperature τ
    vocabulary:         competing phrases (see `ExistenceConfig`)
    existence:          `ExistenceConfig`
    """

    threshold: float = 0.5
    min_views: int = 2
    voxel_m: float = 0.02
    cluster_radius_m: float = 0.06
    grow_scale_factor: float = 1.5
    top_k: int = 5
    scales_m: tuple[float, ...] = field(default_factory=_default_scales)
    scale_slack: float = 1.25
    refine_radius_m: float = 0.4
    refine_step_m: float = 0.03
    triangulate_window_m: float = 0.3
    views_fallback: bool = True
    max_cloud_points: int = 20000
    temperature: float = 10.0
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY
    existence: ExistenceConfig = field(default_factory=ExistenceConfig)

    def validate(self) -> QueryConfig:
        if not (0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.min_views < 0 or self.top_k < 1 or self.max_cloud_points < 0:
            raise ValueError(
                f"min_views >= 0, top_k >= 1, max_cloud_points >= 0 required, got {self.min_views}, "
                f"{self.top_k}, {self.max_cloud_points}"
            )
        if not (self.voxel_m >= 0 and self.cluster_radius_m > 0 and self.temperature > 0):
            raise ValueError(
                f"voxel_m >= 0, cluster_radius_m > 0, temperature > 0 required, got {self.voxel_m}, "
                f"{self.cluster_radius_m}, {self.temperature}"
            )
        if not (self.grow_scale_factor > 0 and self.scale_slack >= 1.0):
            raise ValueError(f"grow_scale_factor > 0 and scale_slack >= 1 required, got "
                             f"{self.grow_scale_factor}, {self.scale_slack}")
        if not (math.isfinite(self.refine_radius_m) and self.refine_radius_m >= 0
                and math.isfinite(self.refine_step_m) and self.refine_step_m > 0):
            raise ValueError(f"refine_radius_m >= 0 and refine_step_m > 0 required, got "
                             f"{self.refine_radius_m}, {self.refine_step_m}")
        if not (math.isfinite(self.triangulate_window_m) and self.triangulate_window_m >= 0):
            raise ValueError(f"triangulate_window_m >= 0 required, got {self.triangulate_window_m}")
        if self.refine_radius_m / self.refine_step_m > 40:
            raise ValueError(f"refine_radius_m / refine_step_m must be <= 40 (at most 81^3 grid points), "
                             f"got {self.refine_radius_m} / {self.refine_step_m}")
        if len(self.scales_m) < 1 or any(not (np.isfinite(s) and s > 0) for s in self.scales_m):
            raise ValueError(f"scales_m must be non-empty, finite and > 0, got {self.scales_m}")
        if any(not isinstance(v, str) or not v.strip() for v in self.vocabulary):
            raise ValueError(f"vocabulary entries must be non-empty strings, got {self.vocabulary}")
        self.existence.validate()
        return self


@dataclass(frozen=True, eq=False)
class Target:
    """One located instance. location_world (3,) float64 world metres: relevancy-weighted centre of its
    surface points, or where the keyframes' views agree around it when `locate` has a ``refine_fn``;
    box_min / box_max (3,) its axis-aligned extent (extent_m = box_max - box_min);
    relevancy: cluster score (top-k mean); confidence in [0, 1]; point_count: surface points in the
    cluster; view_support: fraction of keyframes seeing it whose crop embeddings support the query (NaN
    when no keyframe evidence was available); competitor / competitor_relevancy: the phrase that competes
    best there and its score ("" / 0 when none)."""

    location_world: np.ndarray
    box_min: np.ndarray
    box_max: np.ndarray
    relevancy: float
    confidence: float
    point_count: int
    scale_m: float
    view_support: float
    competitor: str
    competitor_relevancy: float
    z_score: float

    @property
    def extent_m(self) -> np.ndarray:
        return self.box_max - self.box_min


@dataclass(frozen=True, eq=False)  # arrays inside: element-wise == would make equality ambiguous
class QueryResult:
    """Answer to one query. found: at least one target reached the confidence threshold; targets: those,
    best first (at most max_results); location_world (3,) float64 world metres of the best one (None when
    not found); relevancy / confidence: of the best target, or of the best rejected candidate when none
    was found; scale_m the searched scale chosen; cloud_* the relevant points at that scale: xyz (N, 3)
    float32 world metres, relevancy (N,) float32, rgb (N, 3) uint8. model_step and source are set by the
    engine (source "field": the trained language field, "views": keyframe crop embeddings only)."""

    found: bool
    message: str
    location_world: np.ndarray | None
    relevancy: float
    scale_m: float
    cloud_xyz: np.ndarray
    cloud_relevancy: np.ndarray
    cloud_rgb: np.ndarray
    model_step: int = 0
    confidence: float = 0.0
    targets: tuple[Target, ...] = ()
    competitor: str = ""
    source: str = "field"


def cluster_labels(points: Tensor, radius_m: float) -> Tensor:
    """Connected components of points on a grid of cells of size radius_m (26-neighbourhood).

    points (M, 3) metres -> labels (M,) long in 0 .. C-1. Points in the same or touching cells share
    a label, so points closer than radius_m are always together (and never farther than 2√3 radius_m
    apart per step).
    """
    if points.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    cells = torch.floor(points.double() / radius_m).long()
    cells = cells - cells.min(dim=0).values + 1  # >= 1 so neighbour offsets stay inside the extent
    ext = cells.max(dim=0).values + 2

    def key(c):  # one integer per cell, linear in the cell: key(c + o) = key(c) + key(o)
        return (c[..., 0] * ext[1] + c[..., 1]) * ext[2] + c[..., 2]

    keys, inverse = torch.unique(key(cells), return_inverse=True)  # sorted
    n = keys.shape[0]
    r = torch.arange(-1, 2, device=points.device)
    offsets = torch.cartesian_prod(r, r, r)
    # half of the 26 neighbours (key(o) > 0; every extent is >= 3, so that is o > 0 lexicographically):
    # each touching pair of cells is found once, from its lower cell, then linked both ways
    offsets = offsets[key(offsets) > 0]  # (13, 3)
    nb_keys = keys.unsqueeze(1) + key(offsets).unsqueeze(0)  # (V, 13)
    pos = torch.searchsorted(keys, nb_keys).clamp(max=n - 1)
    hit = keys[pos] == nb_keys
    lower = torch.arange(n, device=points.device).unsqueeze(1).expand_as(pos)[hit]
    src, dst = torch.cat([lower, pos[hit]]), torch.cat([pos[hit], lower])
    labels = torch.arange(n, device=points.device)
    while True:  # min-label propagation with pointer jumping; converges in O(log diameter) rounds
        new = labels.scatter_reduce(0, src, labels[dst], reduce="amin")
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    return torch.unique(labels, return_inverse=True)[1][inverse]


def _as_tensor(x, dtype, device, what: str, shape_tail: tuple[int, ...]) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(device)
    if t.ndim != 1 + len(shape_tail) or tuple(t.shape[1:]) != shape_tail:
        raise ValueError(f"{what} must be (N, {', '.join(map(str, shape_tail))}), got {tuple(t.shape)}")
    return t.to(dtype)


def _voxel_merge(points: Tensor, rgb: Tensor, voxel_m: float) -> tuple[Tensor, Tensor]:
    """Mean point and colour per occupied voxel: (N, 3) -> (M, 3), (M, 3) float."""
    _, inv = torch.unique(torch.floor(points.double() / voxel_m).long(), dim=0, return_inverse=True)
    m = int(inv.max()) + 1
    count = torch.zeros(m, device=points.device).index_add_(0, inv, torch.ones_like(inv, dtype=torch.float32))
    p = torch.zeros(m, 3, device=points.device).index_add_(0, inv, points) / count.unsqueeze(1)
    c = torch.zeros(m, 3, device=points.device).index_add_(0, inv, rgb) / count.unsqueeze(1)
    return p, c



def _merge_ranges(points: Tensor, ranges: Tensor, voxel_m: float) -> Tensor:
    """Per occupied voxel (same order as `_voxel_merge`): min of the lows, max of the highs (M, 2)."""
    _, inv = torch.unique(torch.floor(points.double() / voxel_m).long(), dim=0, return_inverse=True)
    m = int(inv.max()) + 1
    lo = torch.full((m,), float("inf"), device=points.device).scatter_reduce(0, inv, ranges[:, 0], "amin")
    hi = torch.full((m,), 0.0, device=points.device).scatter_reduce(0, inv, ranges[:, 1], "amax")
    return torch.stack([lo, hi], dim=1)


def _all_finite(t: Tensor) -> bool:
    """No NaN or inf in ``t``: one reduction (a NaN or inf entry makes the sum NaN or inf), several times
    cheaper than ``isfinite(t).all()`` on the (N, D) embeddings of every searched scale."""
    return t.numel() == 0 or bool(torch.isfinite(t.float().sum()))


def _padded_top_k_mean(values: Tensor, k: int) -> float:
    if values.numel() == 0:
        return 0.0
    top = values.topk(min(k, values.numel())).values
    return float(top.sum()) / k


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))


def _sub_phrase(phrase: str, query: str) -> bool:
    """True when every word of ``phrase`` occurs in ``query`` ("mug" / "red" for "the red mug")."""
    words = set(query.lower().split())
    return all(w in words for w in phrase.lower().split())


@dataclass
class _Candidate:
    members: Tensor  # (M,) long indices into the points
    score: float
    peak: int
    level: float = 0.0  # the relevancy its members were grown above
    blobs: tuple[Tensor, Tensor] | None = None  # points above ``level`` and their blob labels, once needed


def _allowed_scales(scales: Tensor, scale_range: Tensor | None, slack: float, n: int) -> Tensor:
    """(S, N) bool: scale s may be read at point n (inside its trained range, with slack)."""
    if scale_range is None:
        return torch.ones(scales.shape[0], n, dtype=torch.bool, device=scales.device)
    lo, hi = scale_range[:, 0] / slack, scale_range[:, 1] * slack
    ok = (scales[:, None] >= lo[None]) & (scales[:, None] <= hi[None])
    return ok | ~torch.isfinite(scale_range).all(dim=1)[None]  # unknown range: every scale


def _read_index(scales: Tensor, allowed: Tensor, best: int) -> Tensor:
    """(N,) per point the allowed scale index closest (in log scale) to ``best``; ``best`` if none is."""
    dist = (scales.log() - scales[best].log()).abs()[:, None].expand_as(allowed).clone()
    dist[~allowed] = float("inf")
    idx = dist.min(dim=0).indices
    return torch.where(allowed.any(dim=0), idx, torch.full_like(idx, best))


def _grow(pts: Tensor, rel: Tensor, seed: int, level: float, radius_m: float, link_m: float,
          free: Tensor) -> Tensor:
    """Indices of the points connected to ``seed`` (link distance ``link_m``) among the free points with
    relevancy >= level within radius_m of the seed (the seed itself always included)."""
    near = free & ((pts - pts[seed]).norm(dim=1) <= radius_m) & (rel >= level)
    near[seed] = True
    idx = near.nonzero().squeeze(1)
    labels = cluster_labels(pts[idx], link_m)
    own = labels[(idx == seed).nonzero()[0, 0]]
    return idx[labels == own]


def locate(
    points_world,
    rgb,
    view_counts,
    embed_fn: Callable[[Tensor, float], Tensor],
    text_embed: Tensor,
    negative_embeds: Tensor,
    config: QueryConfig | None = None,
    threshold: float | None = None,
    with_cloud: bool = True,
    *,
    scale_range=None,
    query_text: str = "",
    competitor_embeds: Tensor | None = None,
    competitor_names: Sequence[str] = (),
    canonical_count: int | None = None,
    view_fn: Callable[[Tensor, float], tuple[Tensor, Tensor]] | None = None,
    refine_fn: Callable[[np.ndarray, float, np.ndarray], np.ndarray | None] | None = None,
    relevancy_fn: Callable[[Tensor, float], Tensor] | None = None,
    max_results: int = 1,
    report_rejected: bool = True,
) -> QueryResult:
    """Locate a query among candidate surface points (module docstring).

    points_world: (N, 3) float32 world metres; rgb: (N, 3) uint8; view_counts: (N,) int keyframes that
    saw each point (numpy or torch); embed_fn(points (M, 3), scale_m) -> (M, D) unit language
    embeddings (an embed_fn with a true ``per_point_scale`` attribute also takes scale_m as an (M,) tensor,
    one scale per point, which saves a call per scale; one with a ``rows(points, idx, scale_m, keep)``
    attribute reads a subset's embeddings from what it computed for the scale search, or returns None
    (``keep``: a subset every query over these points asks for, which it may keep); one with a
    ``closest(points, scale_m, negatives)`` attribute gives the scale search's `closest_negative` of
    those points at that scale when it keeps them, or None; one with a ``verified(points, scale_m)``
    attribute says True for embeddings it checked finite when it made them, and they are not checked again);
    text_embed (D,) unit; negative_embeds (K, D) unit,
    the first ``canonical_count`` of them the canonical ones (default: all); threshold (confidence, [0, 1])
    overrides config.threshold.
    scale_range: (N, 2) metres, the language scales each point was supervised at (NaN = unknown).
    competitor_embeds (C, D) with competitor_names (C,): phrases that may explain a peak better.
    view_fn(points (M, 3), scale_m) -> (embeds (O, D), view (O,) long): the keyframes' own crop embeddings
    of those points at that scale, one row per observation (keyframe that sees a point).
    refine_fn(location (3,), scale_m, points (M, 3)) -> (3,) or None: where the views place a found target
    near its cluster's centre (points: the cluster's own, `view_evidence.refine_fn`); the target (and its
    box) moves there.
    relevancy_fn(points (M, 3), scale_m) -> (M,): the query's relevancy (against all negatives) at every
    point, for the scale search, when that is cheaper than embedding every point (`embed_fn` is then asked
    only for cluster members and a sample); called with the same points tensor for every scale.
    max_results: 1..100 targets at most.
    report_rejected: False for a caller that uses the answer only when something is found (the engine's
    search over the views after the field found nothing): clusters that cannot reach the threshold are
    not scored, so a not-found answer names no best rejected candidate (its confidence is 0).
    """
    cfg = (config or QueryConfig()).validate()
    ex = cfg.existence
    thr = cfg.threshold if threshold is None else float(threshold)
    if not (math.isfinite(thr) and 0.0 <= thr <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if isinstance(max_results, bool) or not isinstance(max_results, (int, np.integer)) or \
            not 1 <= int(max_results) <= MAX_RESULTS_LIMIT:
        raise ValueError(f"max_results must be an integer in [1, {MAX_RESULTS_LIMIT}], got {max_results!r}")
    dev = text_embed.device
    d = text_embed.shape[-1]
    if text_embed.ndim != 1 or negative_embeds.ndim != 2 or negative_embeds.shape[1] != d:
        raise ValueError(
            f"text_embed must be (D,) and negative_embeds (K, D), got {tuple(text_embed.shape)}, "
            f"{tuple(negative_embeds.shape)}"
        )
    n_canon = negative_embeds.shape[0] if canonical_count is None else int(canonical_count)
    canon = negative_embeds[: max(1, n_canon)]
    comp_emb, comp_names = _competitors(competitor_embeds, competitor_names, query_text, d, dev)
    pts = _as_tensor(points_world, torch.float32, dev, "points_world", (3,))
    col = _as_tensor(rgb, torch.float32, dev, "rgb", (3,))
    views = torch.as_tensor(np.asarray(view_counts) if not isinstance(view_counts, Tensor) else view_counts)
    views = views.to(dev).reshape(-1)
    rng = None if scale_range is None else _as_tensor(scale_range, torch.float32, dev, "scale_range", (2,))
    n_in = pts.shape[0]
    if not (col.shape[0] == views.shape[0] == n_in) or (rng is not None and rng.shape[0] != n_in):
        raise ValueError(
            f"points ({pts.shape[0]}), rgb ({col.shape[0]}), view_counts ({views.shape[0]})"
            + ("" if rng is None else f", scale_range ({rng.shape[0]})") + " differ"
        )
    if not torch.isfinite(pts).all():
        raise ValueError("points_world contains non-finite values")

    keep = views >= cfg.min_views
    pts, col = pts[keep], col[keep]
    rng = None if rng is None else rng[keep]
    if pts.shape[0] == 0:
        return _not_found(
            f"no surface point seen by >= {cfg.min_views} keyframes ({views.numel()} candidates)"
        )
    if cfg.voxel_m > 0:
        if rng is not None:
            rng = _merge_ranges(pts, rng, cfg.voxel_m)
        pts, col = _voxel_merge(pts, col, cfg.voxel_m)

    per_point = bool(getattr(embed_fn, "per_point_scale", False))

    cached_rows = getattr(embed_fn, "rows", None)
    verified = getattr(embed_fn, "verified", None)

    def embed_at(points: Tensor, scale_m: float | Tensor, rows: Tensor | None = None,
                 keep: bool = False) -> Tensor:
        # points = pts[rows]: an embed_fn that keeps the scale search's embeddings reads them there
        # (keep: these rows are asked again by later queries over the same points)
        e = None if rows is None or cached_rows is None else \
            cached_rows(pts, rows, scale_m, **({"keep": True} if keep else {}))
        if e is None:
            e = embed_fn(points, scale_m)
        known = (verified is not None and rows is None and not isinstance(scale_m, Tensor)
                 and verified(points, scale_m))  # kept embeddings, checked finite when they were made
        if not isinstance(e, Tensor) or tuple(e.shape) != (points.shape[0], d) or \
                not (known or _all_finite(e)):
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(
                f"embed_fn returned {shape} (or non-finite values), expected ({points.shape[0]}, {d})"
            )
        return e

    # 1-2. relevancy at every scale, read only where trained; best scale by its robust top-k score.
    scales = torch.tensor(cfg.scales_m, dtype=torch.float32, device=dev)
    if relevancy_fn is None:
        kept = getattr(embed_fn, "closest", None)
        closest_fn = None if kept is None else lambda s: kept(pts, s, negative_embeds)
        _, _, table = scale_search(lambda s: embed_at(pts, s), text_embed, negative_embeds, scales,
                                   cfg.temperature, cfg.top_k, closest_fn)
    else:
        table = torch.stack([_checked_relevancy(relevancy_fn(pts, float(s)), pts.shape[0])
                             for s in cfg.scales_m]).to(dev)
    allowed = _allowed_scales(scales, rng, cfg.scale_slack, pts.shape[0])
    masked = torch.where(allowed, table, torch.zeros_like(table))
    k = max(1, min(cfg.top_k, pts.shape[0]))
    best = int(masked.topk(k, dim=1).values.mean(dim=1).argmax())
    scale_m = float(cfg.scales_m[best])
    # Each point at its own best trained scale (small objects peak at small scales, large ones at large
    # ones); a point with no trained scale in the searched range at the one nearest the best overall.
    # (ties go to the larger scale: a field flat across scales says nothing against the object's size)
    tie = torch.arange(scales.shape[0], device=dev, dtype=table.dtype)[:, None] * 1e-6
    # (max(dim=0).indices: the same first-maximum index as argmax(dim=0), several times faster on the CPU)
    own = torch.where(allowed, table + tie, torch.full_like(table, -1.0)).max(dim=0).indices
    read = torch.where(allowed.any(dim=0), own, _read_index(scales, allowed, best))
    rel = table.gather(0, read[None]).squeeze(0)  # (N,)

    # 3. the scene's own statistics at that scale, then clusters grown from the strongest peaks.
    med = float(rel.median())
    spread = max(1.4826 * float((rel - med).abs().median()), ex.min_spread)
    link = max(cfg.cluster_radius_m, 1.5 * cfg.voxel_m)
    cloud_mask = rel >= max(0.5, med + 2.0 * spread)
    cap = cfg.max_cloud_points if with_cloud else 0
    cloud = _cloud(pts[cloud_mask], rel[cloud_mask], col[cloud_mask], cap)
    # A seed's relevancy bounds the score of its cluster and of every later one (`_clusters`): for a caller
    # that uses only a found answer, seeding stops below the relevancy whose bound reaches the threshold.
    floor = None if report_rejected else _score_for(thr, med, spread, ex)
    cands = _clusters(pts, rel, med, spread, scales[read], link, cfg, max_results, floor)
    if not cands:
        score = _padded_top_k_mean(rel, cfg.top_k)
        return _not_found(f"nothing stands out: best relevancy {score:.3f}, scene median {med:.3f} "
                          f"(scale {scale_m:.3f} m, {pts.shape[0]} points)", score, scale_m, cloud)

    # 4. evidence per cluster. Phrases are compared by how much each stands out of its OWN scene median
    # there: "grey" scores high on every wall, so a wall-heavy crop does not make it a better explanation.
    comp_median, q_median = None, med
    if comp_emb is not None:
        g = torch.Generator(device="cpu").manual_seed(0)
        sample = torch.randperm(pts.shape[0], generator=g)[:_MEDIAN_SAMPLE].to(dev)
        emb_s = _embed_members(embed_at, pts, sample, read, scales, per_point, keep=True)  # the same rows
        comp_median = _phrase_relevancy(emb_s, comp_emb, canon, cfg.temperature).median(dim=1).values
        q_median = float(relevancy(emb_s, text_embed, canon, cfg.temperature).median())
    def evidence(c: _Candidate, conf: float, z: float) -> Target:
        members = c.members
        comp, comp_score, gap = "", 0.0, 0.0
        if comp_emb is not None:
            emb = _embed_members(embed_at, pts, members, read, scales, per_point)
            q_score = _padded_top_k_mean(relevancy(emb, text_embed, canon, cfg.temperature), cfg.top_k)
            scores = _phrase_relevancy(emb, comp_emb, canon, cfg.temperature)  # (C, M)
            top = scores.topk(min(cfg.top_k, scores.shape[1]), dim=1).values.sum(dim=1) / cfg.top_k
            excess = top - comp_median
            j = int(excess.argmax())
            comp, comp_score = comp_names[j], float(top[j])
            gap = float(excess[j]) - (q_score - q_median)
            conf *= _sigmoid((ex.competitor_margin - gap) / ex.competitor_width)
        support = float("nan")
        if view_fn is not None:
            support = _view_support(view_fn, pts, members, rel[members], float(scales[read[c.peak]]),
                                    text_embed, canon,
                                    max(0.5, q_median), cfg)
            if math.isfinite(support):
                conf *= 1.0 - ex.view_weight * (1.0 - support)
        w = (rel[members] - rel[members].min() + 1e-3).double()
        p = pts[members].double()
        return Target(
            location_world=((p * w[:, None]).sum(0) / w.sum()).cpu().numpy(),
            box_min=p.min(0).values.cpu().numpy(), box_max=p.max(0).values.cpu().numpy(),
            relevancy=c.score, confidence=float(conf), point_count=int(members.numel()),
            scale_m=float(cfg.scales_m[int(read[c.peak])]),
            view_support=support, competitor=comp, competitor_relevancy=comp_score, z_score=float(z))

    # The competing-phrase and view factors only lower a confidence (each <= 1), so the clusters are weighed
    # in order of their confidence without them, and the rest are skipped once none can change the answer.
    bounds = sorted(((*_bound(c.score, med, spread, ex), c) for c in cands), key=lambda b: b[0],
                    reverse=True)
    targets: list[Target] = []
    cluster_points: dict[Target, Tensor] = {}  # its cluster's points, for refine_fn (hashed by identity)
    for bound, z, c in bounds:
        if (targets or not report_rejected) and not _may_matter(bound, targets, thr, int(max_results),
                                                                report_rejected):
            break
        targets.append(evidence(c, bound, z))
        if refine_fn is not None:
            cluster_points[targets[-1]] = pts[c.members]
    if not targets:
        return _not_found(f"no candidate can reach confidence {thr:.2f}: best bound {bounds[0][0]:.2f}",
                          0.0, scale_m, cloud)

    # 5. best first; the found ones up to max_results.
    targets.sort(key=rank, reverse=True)
    found = tuple(t for t in targets if t.confidence >= thr)[: int(max_results)]
    if refine_fn is not None:
        found = tuple(_refined(t, refine_fn, cluster_points[t]) for t in found)
    top = found[0] if found else targets[0]
    why = _explain(top, med, ex)
    if not found:
        return QueryResult(False, f"not found: best candidate confidence {top.confidence:.2f} < {thr:.2f} "
                           f"({why})", None, top.relevancy, top.scale_m, *cloud, confidence=top.confidence,
                           competitor=top.competitor)
    msg = (f"found {len(found)} target(s): confidence {top.confidence:.2f} >= {thr:.2f}, relevancy "
           f"{top.relevancy:.3f} at scale {top.scale_m:.3f} m, {top.point_count} points ({why})")
    return QueryResult(True, msg, top.location_world, top.relevancy, top.scale_m, *cloud,
                       confidence=top.confidence, targets=found, competitor=top.competitor)


def _phrase_relevancy(emb: Tensor, phrases: Tensor, canon: Tensor, temperature: float) -> Tensor:
    """(C, M) relevancy of each of C phrase embeddings at M embeddings, against the canonical negatives
    (`relevancy` for every phrase in one product: sigmoid of the gap to the closest negative)."""
    e = emb.float()
    closest = (e @ canon.to(e).T).max(dim=1).values  # (M,)
    return torch.sigmoid(temperature * ((e @ phrases.to(e).T) - closest[:, None])).T


def _competitors(embeds, names, query_text: str, d: int, dev) -> tuple[Tensor | None, list[str]]:
    """Competing phrases minus those made only of the query's own words; (C', D) or None."""
    if embeds is None or len(names) == 0:
        return None, []
    if embeds.ndim != 2 or embeds.shape != (len(names), d):
        raise ValueError(f"competitor_embeds must be ({len(names)}, {d}), got {tuple(embeds.shape)}")
    keep = [i for i, n in enumerate(names) if not _sub_phrase(n, query_text)]
    if not keep:
        return None, []
    return embeds[keep].to(dev), [names[i] for i in keep]


def _clusters(pts: Tensor, rel: Tensor, med: float, spread: float, point_scale_m: Tensor, link: float,
              cfg: QueryConfig, max_results: int, floor: float | None = None) -> list[_Candidate]:
    """Clusters grown from the strongest peaks that stand out of the scene (> median + 3 spread), each
    within grow_scale_factor times its peak's scale (point_scale_m (N,) metres) of the peak.

    One object, one target: a weaker peak connected to an earlier cluster's peak through points above that
    cluster's growth level (an object larger than the growth radius, reached from another peak) or within
    half its own scale of it (a halo: its crop held the earlier object) is spent without a target of its
    own; the earlier cluster keeps its own members, so its location is not pulled off the object.

    Every seed lies above median + 3 spread and every growth level above median + 1.5 spread, so only
    the points above that take part (the same clusters, from a few per cent of the points).

    ``floor``: no seed below this relevancy (the clusters before it are the same). Every point still free
    when a seed is reached has at most the seed's relevancy (a higher one was a seed or spent before), so
    no later cluster scores above its seed."""
    sub = (rel >= med + 1.5 * spread).nonzero().squeeze(1)
    out = _clusters_among(pts[sub], rel[sub], med, spread, point_scale_m[sub], link, cfg, max_results, floor)
    return [_Candidate(sub[c.members], c.score, int(sub[c.peak]), c.level) for c in out]


def _clusters_among(pts: Tensor, rel: Tensor, med: float, spread: float, point_scale_m: Tensor, link: float,
                    cfg: QueryConfig, max_results: int, floor: float | None = None) -> list[_Candidate]:
    """`_clusters` over the points that can take part; indices into these points."""
    free = torch.ones_like(rel, dtype=torch.bool)
    out: list[_Candidate] = []
    budget = max_results + 11  # extra: look-alikes and noisy peaks may come before the real target
    lowest = max(med + 3.0 * spread, -math.inf if floor is None else floor - _SCORE_SLACK)
    for seed in rel.argsort(descending=True).tolist():
        if len(out) >= budget or float(rel[seed]) <= lowest:
            break
        if not bool(free[seed]):
            continue
        radius = max(cfg.grow_scale_factor * float(point_scale_m[seed]), 2.0 * link)
        level = med + 0.5 * (float(rel[seed]) - med)
        members = _grow(pts, rel, seed, level, radius, link, free)
        # the object's fringe (near its members, above the scene's noise) is spent too, so the same object
        # is not seeded twice; other objects in the radius stay free
        near = (free & ((pts - pts[seed]).norm(dim=1) <= radius + 2.0 * link)).nonzero().squeeze(1)
        if near.numel():
            fringe = torch.cdist(pts[near], pts[members]).min(dim=1).values <= 2.0 * link
            free[near[fringe]] = False
        free[members] = False
        if not any(_same_object(pts, rel, c, seed, link) or _halo(pts, c, seed, float(point_scale_m[seed]))
                   for c in out):
            out.append(_Candidate(members, _padded_top_k_mean(rel[members], cfg.top_k), seed, level))
    return out


def _same_object(pts: Tensor, rel: Tensor, c: _Candidate, seed: int, link: float) -> bool:
    """``seed`` lies in the blob of points above ``c``'s own growth level that holds c's peak: the same
    object reached from another peak (it is larger than c's growth radius)."""
    if float(rel[seed]) < c.level:
        return False
    if c.blobs is None:  # the same for every later seed: labelled once per cluster
        above = (rel >= c.level).nonzero().squeeze(1)
        c.blobs = (above, cluster_labels(pts[above], link))
    above, labels = c.blobs
    # ``above`` is sorted (nonzero) and holds both: their positions by binary search, not a Python scan
    pos = torch.searchsorted(above, torch.tensor([seed, c.peak], device=above.device))
    return bool(labels[pos[0]] == labels[pos[1]])


def _halo(pts: Tensor, c: _Candidate, seed: int, seed_scale_m: float) -> bool:
    """A weaker peak within half its own scale of ``c``: its crop held c's object."""
    return float((pts[c.members] - pts[seed]).norm(dim=1).min()) <= 0.5 * seed_scale_m


def _embed_members(embed_at, pts: Tensor, members: Tensor, read: Tensor, scales: Tensor,
                   per_point: bool = False, keep: bool = False) -> Tensor:
    """(M, D) embeddings of the members, each at its read scale: one call with a (M,) scale tensor when the
    embed_fn takes one (``per_point``), else one call per scale. ``keep``: the same rows every query."""
    idx = read[members]
    if per_point:
        return embed_at(pts[members], scales[idx], rows=members, keep=keep)
    out = None
    for s in torch.unique(idx).tolist():
        m = idx == s
        e = embed_at(pts[members[m]], float(scales[s]))
        if out is None:
            out = e.new_empty(members.shape[0], e.shape[1])
        out[m] = e
    return out


def _view_support(view_fn, pts: Tensor, members: Tensor, member_rel: Tensor, scale_m: float, text: Tensor,
                  canon: Tensor, floor: float, cfg: QueryConfig) -> float:
    """Fraction of the keyframes seeing the cluster's strongest points whose own crop embeddings there
    score the query above ``floor`` (max of 0.5 and the scene's median) + min_excess; NaN if none.
    A view_fn with a ``rows(pts, idx, scale_m)`` attribute reads them by index when it can (None: not)."""
    top = members[member_rel.topk(min(8, member_rel.numel())).indices]
    by_rows = getattr(view_fn, "rows", None)
    got = None if by_rows is None else by_rows(pts, top, scale_m)
    emb, view = got if got is not None else view_fn(pts[top], scale_m)
    if emb.shape[0] == 0:
        return float("nan")
    q = relevancy(emb, text, canon, cfg.temperature)
    votes = [float(q[view == v].mean()) > floor + cfg.existence.min_excess
             for v in torch.unique(view).tolist()]
    return float(np.mean(votes))


def _bound(score: float, med: float, spread: float, ex: ExistenceConfig) -> tuple[float, float]:
    """(confidence bound, z score) of a cluster of relevancy ``score`` in a scene of median ``med`` and
    spread ``spread``: its confidence before the competing-phrase and view factors (each <= 1), increasing
    in the score."""
    z = (score - med) / spread
    return _sigmoid((score - 0.5 - ex.min_excess) / ex.excess_width) * _sigmoid((z - ex.z0) / ex.z_width), z


def _score_for(thr: float, med: float, spread: float, ex: ExistenceConfig) -> float:
    """The lowest relevancy score whose `_bound` reaches ``thr`` (within 1e-9; above 1 when none does):
    the bound is increasing in the score, so this is a bisection."""
    lo, hi = 0.0, 1.0
    if _bound(hi, med, spread, ex)[0] < thr:
        return 1.0 + 1e-6
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _bound(mid, med, spread, ex)[0] < thr else (lo, mid)
    return lo


def _may_matter(bound: float, targets: list[Target], thr: float, k: int,
                report_rejected: bool = True) -> bool:
    """Whether a cluster whose confidence is at most ``bound`` could still be among the k found targets or,
    when nothing is found and ``report_rejected``, be the best rejected one (ties count: relevancy breaks
    them)."""
    found = sorted((_published(t.confidence) for t in targets if t.confidence >= thr), reverse=True)
    if bound >= thr:
        return len(found) < k or _published(bound) >= found[k - 1]
    if not report_rejected or found:
        return False
    return _published(bound) >= max(_published(t.confidence) for t in targets)


def _checked_relevancy(r, n: int) -> Tensor:
    if not isinstance(r, Tensor) or tuple(r.shape) != (n,) or not torch.isfinite(r).all():
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"relevancy_fn returned {shape} (or non-finite values), expected ({n},)")
    return r.float()


def rank(t: Target) -> tuple[float, float]:
    """The order of targets, best first when sorted in reverse: confidence, then relevancy, both as the
    float32 that messages carry, so that a caller reading the numbers sees them in this order (a
    confidence of 1 - 1e-9 is published as 1.0 and ties with 1.0: relevancy decides)."""
    return _published(t.confidence), _published(t.relevancy)


def _published(x: float) -> float:
    return float(np.float32(x))


def _refined(t: Target, refine_fn, points: Tensor) -> Target:
    """The target moved to where the views place it (box shifted with it, size kept); ``points``: its
    cluster's."""
    where = refine_fn(np.asarray(t.location_world, dtype=np.float64), t.scale_m,
                      points.detach().double().cpu().numpy())
    if where is None or not np.all(np.isfinite(where)):
        return t
    shift = np.asarray(where, dtype=np.float64) - t.location_world
    return replace(t, location_world=t.location_world + shift, box_min=t.box_min + shift,
                               box_max=t.box_max + shift)


def _explain(t: Target, med: float, ex: ExistenceConfig) -> str:
    parts = [f"relevancy {t.relevancy:.3f} vs scene median {med:.3f} (z {t.z_score:.1f})"]
    if t.competitor:
        parts.append(f"best competing phrase '{t.competitor}' {t.competitor_relevancy:.3f}")
    if math.isfinite(t.view_support):
        parts.append(f"view support {t.view_support:.2f}")
    return ", ".join(parts)


def _cloud(xyz: Tensor, rel: Tensor, rgb: Tensor, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if xyz.shape[0] > cap:
        idx = rel.topk(cap).indices
        xyz, rel, rgb = xyz[idx], rel[idx], rgb[idx]
    return (
        xyz.float().cpu().numpy().astype(np.float32),
        rel.float().cpu().numpy().astype(np.float32),
        rgb.round().clamp(0, 255).to(torch.uint8).cpu().numpy(),
    )


def _not_found(message: str, relevancy: float = 0.0, scale_m: float = 0.0, cloud=None) -> QueryResult:
    if cloud is None:
        cloud = (np.zeros((0, 3), np.float32), np.zeros(0, np.float32), np.zeros((0, 3), np.uint8))
    return QueryResult(False, message, None, float(relevancy), float(scale_m), *cloud)
