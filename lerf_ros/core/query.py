"""3D language query over candidate surface points, without rendering full images.

The caller (the engine) supplies surface points in the world frame (e.g. lifted from keyframe
depth, measured or rendered), how many keyframes saw each, and ``embed_fn(points, scale_m)``
evaluating the language field. ``locate`` keeps well-observed points, scores them at every scale
(LERF scale search), keeps the points above the threshold at the best scale, groups them into
clusters and answers with the best cluster: its relevancy-weighted centroid (not one noisy voxel),
a robust score and whether that score clears the threshold (existence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .relevancy import scale_search


def _default_scales() -> tuple[float, ...]:
    # LERF searches 30 scales; geometric spacing gives small objects (5-30 cm) as many steps as large ones.
    return tuple(float(x) for x in np.geomspace(0.05, 2.0, 30).round(4))


@dataclass(frozen=True)
class QueryConfig:
    """threshold:          relevancy a cluster's score must reach for "found" (0.5 = as close as a negative)
    min_views:          points seen by fewer keyframes are dropped (floaters, single-view guesses)
    voxel_m:            candidate points are merged per voxel of this size first (0 = off), metres
    cluster_radius_m:   above-threshold points closer than about this are one cluster, metres
    top_k:              a cluster's score is the mean of its top_k relevancies, counting missing ones as 0,
                        so a cluster of fewer than top_k points (an isolated noisy voxel) scores low
    scales_m:           language scales searched, metres
    max_cloud_points:   the returned cloud keeps at most this many points (the most relevant)
    temperature:        relevancy temperature τ
    """

    threshold: float = 0.55
    min_views: int = 2
    voxel_m: float = 0.02
    cluster_radius_m: float = 0.06
    top_k: int = 5
    scales_m: tuple[float, ...] = _default_scales()
    max_cloud_points: int = 20000
    temperature: float = 10.0

    def validate(self) -> QueryConfig:
        if not (0.0 < self.threshold < 1.0):
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
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
        if len(self.scales_m) < 1 or any(not (np.isfinite(s) and s > 0) for s in self.scales_m):
            raise ValueError(f"scales_m must be non-empty, finite and > 0, got {self.scales_m}")
        return self


@dataclass(frozen=True, eq=False)  # arrays inside: element-wise == would make equality ambiguous
class QueryResult:
    """Answer to one query. location_world (3,) float64 world metres (None when not found); relevancy
    is the best cluster's score (or the best robust score when there is no cluster); scale_m the
    searched scale it was found at; cloud_* the points above threshold at that scale: xyz (N, 3)
    float32 world metres, relevancy (N,) float32, rgb (N, 3) uint8. model_step is set by the engine."""

    found: bool
    message: str
    location_world: np.ndarray | None
    relevancy: float
    scale_m: float
    cloud_xyz: np.ndarray
    cloud_relevancy: np.ndarray
    cloud_rgb: np.ndarray
    model_step: int = 0


def cluster_labels(points: Tensor, radius_m: float) -> Tensor:
    """Connected components of points on a grid of cells of size radius_m (26-neighbourhood).

    points (M, 3) metres -> labels (M,) long in 0 .. C-1. Points in the same or touching cells share
    a label, so points closer than radius_m are always together (and never farther than 2√3 radius_m
    apart per step).
    """
    if points.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    cells = torch.floor(points.double() / radius_m).long()
    cells = cells - cells.min(dim=0).values + 1  # >= 1 so neighbour offsets stay non-negative
    ext = cells.max(dim=0).values + 2
    uniq, inverse = torch.unique(cells, dim=0, return_inverse=True)  # lexicographic = key order below

    def key(c):
        return (c[..., 0] * ext[1] + c[..., 1]) * ext[2] + c[..., 2]

    keys = key(uniq)
    n = keys.shape[0]
    r = torch.arange(-1, 2, device=points.device)
    offsets = torch.cartesian_prod(r, r, r)
    offsets = offsets[(offsets != 0).any(dim=1)]  # (26, 3)
    nb_keys = key(uniq.unsqueeze(1) + offsets.unsqueeze(0))  # (V, 26)
    pos = torch.searchsorted(keys, nb_keys).clamp(max=n - 1)
    hit = keys[pos] == nb_keys
    src = torch.arange(n, device=points.device).unsqueeze(1).expand_as(pos)[hit]
    dst = pos[hit]
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


def _padded_top_k_mean(values: Tensor, k: int) -> float:
    top = values.topk(min(k, values.numel())).values
    return float(top.sum()) / k


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
) -> QueryResult:
    """Locate a query among candidate surface points.

    points_world: (N, 3) float32 world metres; rgb: (N, 3) uint8; view_counts: (N,) int keyframes that
    saw each point (numpy or torch); embed_fn(points (M, 3), scale_m) -> (M, D) unit language
    embeddings; text_embed (D,) unit; negative_embeds (K, D) unit; threshold overrides config.threshold.
    """
    cfg = (config or QueryConfig()).validate()
    thr = cfg.threshold if threshold is None else float(threshold)
    if not (0.0 < thr < 1.0):
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    dev = text_embed.device
    d = text_embed.shape[-1]
    if text_embed.ndim != 1 or negative_embeds.ndim != 2 or negative_embeds.shape[1] != d:
        raise ValueError(
            f"text_embed must be (D,) and negative_embeds (K, D), got {tuple(text_embed.shape)}, "
            f"{tuple(negative_embeds.shape)}"
        )
    pts = _as_tensor(points_world, torch.float32, dev, "points_world", (3,))
    col = _as_tensor(rgb, torch.float32, dev, "rgb", (3,))
    views = torch.as_tensor(np.asarray(view_counts) if not isinstance(view_counts, Tensor) else view_counts)
    views = views.to(dev).reshape(-1)
    if not (col.shape[0] == views.shape[0] == pts.shape[0]):
        raise ValueError(
            f"points ({pts.shape[0]}), rgb ({col.shape[0]}), view_counts ({views.shape[0]}) differ"
        )
    if not torch.isfinite(pts).all():
        raise ValueError("points_world contains non-finite values")

    keep = views >= cfg.min_views
    pts, col = pts[keep], col[keep]
    if pts.shape[0] == 0:
        return _not_found(
            f"no surface point seen by >= {cfg.min_views} keyframes ({views.numel()} candidates)"
        )
    if cfg.voxel_m > 0:
        pts, col = _voxel_merge(pts, col, cfg.voxel_m)

    def embed_at(scale_m: float) -> Tensor:
        e = embed_fn(pts, scale_m)
        if not isinstance(e, Tensor) or tuple(e.shape) != (pts.shape[0], d) or not torch.isfinite(e).all():
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(
                f"embed_fn returned {shape} (or non-finite values), expected ({pts.shape[0]}, {d})"
            )
        return e

    best, rel, _ = scale_search(
        embed_at, text_embed, negative_embeds, cfg.scales_m, cfg.temperature, cfg.top_k
    )
    scale_m = float(cfg.scales_m[best])
    above = rel >= thr
    cloud = _cloud(pts[above], rel[above], col[above], cfg.max_cloud_points if with_cloud else 0)
    if not bool(above.any()):
        score = _padded_top_k_mean(rel, cfg.top_k)
        return _not_found(
            f"best relevancy {score:.3f} < threshold {thr:.3f} "
            f"(scale {scale_m:.3f} m, {pts.shape[0]} points)",
            score,
            scale_m,
        )
    p_above, r_above = pts[above], rel[above]
    labels = cluster_labels(p_above, cfg.cluster_radius_m)
    n_clusters = int(labels.max()) + 1
    scores = [_padded_top_k_mean(r_above[labels == c], cfg.top_k) for c in range(n_clusters)]
    c_best = int(np.argmax(scores))
    score = scores[c_best]
    members = labels == c_best
    if score < thr:
        return _not_found(
            f"{int(above.sum())} points above threshold {thr:.3f} but no cluster of at least ~{cfg.top_k} "
            f"(best cluster score {score:.3f}, scale {scale_m:.3f} m)",
            score,
            scale_m,
            cloud,
        )
    # Weight the confident core most; every member keeps a little weight so the centroid stays inside.
    w = (r_above[members] - thr + 0.01).double()
    location = (p_above[members].double() * w.unsqueeze(1)).sum(dim=0) / w.sum()
    msg = (
        f"found: cluster of {int(members.sum())} points (of {n_clusters} clusters), relevancy {score:.3f} >= "
        f"{thr:.3f} at scale {scale_m:.3f} m"
    )
    return QueryResult(True, msg, location.cpu().numpy(), score, scale_m, *cloud)


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
