"""Candidate surface points for 3D queries: keyframe depth lifted to the world, voxel-merged, with the
number of keyframes that see each point.

Depth comes from the keyframe (measured, z-depth in metres, NaN where invalid) or, for keyframes without
it, is rendered from the model (`render_depth_grid`, the expensive part: one model pass per sampled
pixel). A `CandidateSet` carries the `candidate_key` it is valid for so it can be cached, saved with a
map and reused after load without re-rendering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..frames.camera import pixel_rays, z_to_ray_distance
from ..frames.frame import Frame
from ..presets import CandidateConfig

_render_calls = 0


def render_calls() -> int:
    """How many keyframe depth grids `render_depth_grid` has rendered in this process (for tests)."""
    return _render_calls


#: Grid step of measured depth whose holes are not filled yet (no model when it was made).
_UNFILLED = -2
#: Part of every candidate key: sets computed by older code (without footprints / grids) are stale.
FORMAT = "candidates/2"


@dataclass(frozen=True)
class CandidateSet:
    """points (P, 3) float64 world metres; rgb (P, 3) uint8; views (P,) int64 keyframes seeing each point;
    footprint (P, 2) float64 metres: the smallest and largest extent of a keyframe's full image height at
    the point over the keyframes that see it (``H * ray distance / fy``; a crop of tile fraction f there
    covers f times that), NaN where unknown; grids (K, h, w) float32: the depth grid (z, metres, every
    pixel_stride-th pixel) each keyframe was lifted from, in the order of grid_ids (K,) int64;
    key: the `candidate_key` of the keyframes / model step they were computed from."""

    points: np.ndarray
    rgb: np.ndarray
    views: np.ndarray
    key: str
    footprint: np.ndarray | None = None
    grid_ids: np.ndarray | None = None
    grids: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"points": self.points, "rgb": self.rgb, "views": self.views, "key": np.array(self.key)}
        for name in ("footprint", "grid_ids", "grids"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def grid_of(self, kf_id: int) -> np.ndarray | None:
        if self.grid_ids is None:
            return None
        hit = np.nonzero(self.grid_ids == int(kf_id))[0]
        return None if hit.size == 0 else self.grids[hit[0]]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CandidateSet:
        """Inverse of `to_arrays`; ValueError naming the array that does not fit."""
        missing = [k for k in ("points", "rgb", "views", "key") if k not in arrays]
        if missing:
            raise ValueError(f"candidate arrays {missing} missing")
        pts, rgb, views = (np.asarray(arrays[k]) for k in ("points", "rgb", "views"))
        p = pts.shape[0] if pts.ndim == 2 and pts.shape[1] == 3 else -1
        if p < 0 or rgb.shape != (p, 3) or rgb.dtype != np.uint8 or views.shape != (p,):
            raise ValueError(f"candidate arrays do not fit: points {pts.shape}, rgb {rgb.dtype} {rgb.shape}, "
                             f"views {views.shape}")
        if not np.all(np.isfinite(pts)):
            raise ValueError("candidate points contain non-finite values")
        fp = np.asarray(arrays["footprint"], np.float64) if "footprint" in arrays else None
        if fp is not None and fp.shape != (p, 2):
            raise ValueError(f"candidate footprint is {fp.shape}, expected ({p}, 2)")
        gids = np.asarray(arrays["grid_ids"], np.int64) if "grid_ids" in arrays else None
        grids = np.asarray(arrays["grids"], np.float32) if "grids" in arrays else None
        if (gids is None) != (grids is None) or (grids is not None and (grids.ndim != 3
                                                                        or grids.shape[0] != gids.shape[0])):
            raise ValueError("candidate grids do not fit their ids")
        return cls(pts.astype(np.float64), rgb, views.astype(np.int64), str(arrays["key"]), fp, gids, grids)


def needs_rendered_depth(frames: Sequence[Frame]) -> bool:
    return any(f.depth_m is None for f in frames)


def has_holes(kf: Frame, stride: int) -> bool:
    """Measured depth without a valid value at some lifted pixel (filled from rendered depth)."""
    grid = kf.depth_m[::stride, ::stride]
    return not bool(np.all(np.isfinite(grid) & (grid > 0)))


def depends_on_model(frames: Sequence[Frame], stride: int) -> bool:
    """Whether the candidates of ``frames`` use rendered depth (no depth, or depth with holes)."""
    return any(f.depth_m is None or has_holes(f, stride) for f in frames)


def candidate_key(ids: Sequence[int], frames: Sequence[Frame], step: int, cfg: CandidateConfig) -> str:
    """``"<sha1 of the keyframe set>@<step>"``: ids, image + depth content, poses, intrinsics, config;
    step is the model's training step when some keyframe needs rendered depth, else -1 (the
    candidates then do not depend on the model)."""
    h = hashlib.sha1((FORMAT + repr(cfg)).encode())
    for kf_id, f in zip(ids, frames, strict=True):
        h.update(f"{int(kf_id)}|{f.intrinsics!r}|{f.image.shape}".encode())
        h.update(np.ascontiguousarray(f.image).tobytes())
        h.update(np.ascontiguousarray(f.T_world_cam, dtype=np.float64).tobytes())
        if f.depth_m is not None:
            h.update(np.ascontiguousarray(f.depth_m, dtype=np.float32).tobytes())
    return f"{h.hexdigest()}@{int(step) if depends_on_model(frames, cfg.pixel_stride) else -1}"


def key_step(key: str) -> int:
    """The model step a key was made at (-1: measured depth only)."""
    return int(key.rsplit("@", 1)[1])


def lift_depth(kf: Frame, stride: int, grid: np.ndarray | None = None, with_rgb: bool = False):
    """World points (N, 3) of every stride-th pixel with finite z-depth > 0 (``grid`` (h, w) at those
    pixels, or kf.depth_m); with_rgb: also their colours (N, 3) uint8."""
    h, w = kf.image.shape[:2]
    v, u = np.mgrid[0:h:stride, 0:w:stride]
    z = kf.depth_m[::stride, ::stride] if grid is None else grid
    ok = np.isfinite(z) & (z > 0)
    i = kf.intrinsics
    p_cam = np.stack([(u[ok] - i.cx) / i.fx * z[ok], (v[ok] - i.cy) / i.fy * z[ok], z[ok]], axis=-1)
    pts = p_cam @ kf.T_world_cam[:3, :3].T + kf.T_world_cam[:3, 3]
    if with_rgb:
        return pts, kf.image[v[ok], u[ok]]
    return pts


def depth_bounds(frames: Sequence[Frame], stride: int = 4) -> tuple[np.ndarray, np.ndarray] | None:
    """1st / 99th percentile corners (3,), (3,) world metres of the measured depth of ``frames``, None
    without depth; percentiles keep stray pixels (reflections, far windows) from inflating a box."""
    surf = [lift_depth(f, stride) for f in frames if f.depth_m is not None]
    pts = np.concatenate(surf) if surf else np.zeros((0, 3))
    if pts.shape[0] == 0:
        return None
    return np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)


def render_depth_grid(model, kf: Frame, stride: int, device: torch.device, chunk: int = 4096) -> np.ndarray:
    """Rendered z-depth (h, w) float32 metres at every stride-th pixel of ``kf``: the MEDIAN depth along
    each ray (where half of its opacity is reached; NaN when the ray is less than half opaque), converted
    from distance along the unit ray to z. Candidates are surface points: the expected depth of a
    half-formed RGB-only surface lies behind it (below a floor, inside a wall), the median does not.
    A model that returns only "depth" is read as is."""
    global _render_calls
    _render_calls += 1
    h, w = kf.image.shape[:2]
    v, u = np.mgrid[0:h:stride, 0:w:stride]
    T = torch.tensor(kf.T_world_cam, dtype=torch.float32, device=device)
    o, d = pixel_rays(kf.intrinsics, T, u.reshape(-1), v.reshape(-1))
    ray_per_z = z_to_ray_distance(kf.intrinsics, u.reshape(-1), v.reshape(-1)).to(device)
    model.eval()
    with torch.no_grad():
        t = torch.cat([_median_depth(model(o[a:a + chunk], d[a:a + chunk]))
                       for a in range(0, o.shape[0], chunk)])
    return (t / ray_per_z).reshape(v.shape).cpu().numpy().astype(np.float32)


def _median_depth(out: dict) -> torch.Tensor:
    """(R,) distance where each ray's accumulated weight reaches half (NaN below half opacity)."""
    if "weights" not in out or "samples" not in out:
        return out["depth"].reshape(-1)
    w = out["weights"]
    cum = w.cumsum(dim=-1)
    idx = (cum < 0.5).sum(dim=-1).clamp(max=w.shape[-1] - 1)
    t = out["samples"].t_mid.gather(-1, idx[:, None]).squeeze(-1)
    return torch.where(cum[:, -1] >= 0.5, t, torch.full_like(t, float("nan")))


def voxel_merge(pts: np.ndarray, rgb: np.ndarray, voxel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """One point per occupied voxel: (V, 3) float64 mean position, (V, 3) uint8 mean colour."""
    vox = np.floor(pts / voxel_m).astype(np.int64)
    _, inverse, counts = np.unique(vox, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    centres = np.zeros((counts.shape[0], 3))
    colours = np.zeros((counts.shape[0], 3))
    np.add.at(centres, inverse, pts)
    np.add.at(colours, inverse, rgb.astype(np.float64))
    centres /= counts[:, None]
    return centres, np.clip(np.rint(colours / counts[:, None]), 0, 255).astype(np.uint8)


def _project(points: np.ndarray, kf: Frame, grid: np.ndarray, stride: int):
    """Camera z (P,), pixel coordinates (P, 2) (u, v), ray distances (P,) and the depth grid there (P,)
    (NaN outside the image or behind the camera)."""
    R, t = kf.T_world_cam[:3, :3], kf.T_world_cam[:3, 3]
    p_cam = (points - t) @ R  # R^T (p - t) for row vectors
    z = p_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = kf.intrinsics.fx * p_cam[:, 0] / z + kf.intrinsics.cx
        v = kf.intrinsics.fy * p_cam[:, 1] / z + kf.intrinsics.cy
        gi, gj = np.rint(v / stride), np.rint(u / stride)
    ok = (z > 1e-6) & (gi >= 0) & (gi < grid.shape[0]) & (gj >= 0) & (gj < grid.shape[1])
    d = np.full_like(z, np.nan)
    d[ok] = grid[gi[ok].astype(np.int64), gj[ok].astype(np.int64)]
    return z, np.stack([u, v], axis=1), np.linalg.norm(p_cam, axis=1), d


def visible(points: np.ndarray, kf: Frame, grid: np.ndarray, stride: int, cfg: CandidateConfig):
    """Which points (P,) bool keyframe ``kf`` sees: they project inside it and their camera z agrees with
    its depth grid there within ``depth_tol_rel * depth + voxel_m`` (occlusion); also their pixel
    coordinates (P, 2) (u, v) and ray distances (P,) metres."""
    z, uv, dist, d = _project(points, kf, grid, stride)
    with np.errstate(invalid="ignore"):
        seen = visible_test(cfg)(z, d)
    return seen, uv, dist


def in_view(points: np.ndarray, kf: Frame, grid: np.ndarray, stride: int, behind_rel: float, behind_m: float):
    """Like `visible`, for points anywhere along the rays up to the surface: they project inside ``kf``
    and lie in front of its depth grid d there, or behind it by at most ``behind_rel * d + behind_m``
    (free space and surfaces, not what a surface clearly hides)."""
    z, uv, dist, d = _project(points, kf, grid, stride)
    with np.errstate(invalid="ignore"):
        seen = in_view_test(behind_rel, behind_m)(z, d)
    return seen, uv, dist


#: `seen_pairs` projects at most this many (keyframe, point) pairs at once (~100 bytes each while projected).
PAIR_CHUNK = 1 << 19


def seen_pairs(points: np.ndarray, kfs: Sequence[Frame], grids: np.ndarray, stride: int,
               accept: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """Every (keyframe, point) pair where the point projects inside the keyframe and ``accept(z, d)``
    holds (z its camera z, d the keyframe's depth grid there, both (k, P) metres): `visible` or
    `in_view` for all keyframes at once, vectorised over chunks of keyframes.

    points (P, 3) world metres; kfs (K,); grids (K, h, w) their depth grids. Returns keyframe positions
    (O,) int64 into kfs, point indices (O,) int64, pixel coordinates (O, 2) (u, v) and ray distances (O,),
    keyframe by keyframe, points ascending within each (the order of a loop over `visible`)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    n, k_all = points.shape[0], len(kfs)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0))
    if n == 0 or k_all == 0:
        return empty
    R = np.stack([kf.T_world_cam[:3, :3] for kf in kfs])
    t = np.stack([kf.T_world_cam[:3, 3] for kf in kfs])
    intr = np.array([[kf.intrinsics.fx, kf.intrinsics.fy, kf.intrinsics.cx, kf.intrinsics.cy] for kf in kfs])
    gh, gw = grids.shape[1], grids.shape[2]
    flat = grids.reshape(-1)
    step = max(1, PAIR_CHUNK // n)
    out = []
    for k0 in range(0, k_all, step):
        sl = slice(k0, min(k_all, k0 + step))
        p_cam = (points[None] - t[sl, None, :]) @ R[sl]  # (k, P, 3): R^T (p - t) per keyframe
        z = p_cam[..., 2]
        fx, fy, cx, cy = (intr[sl, i, None] for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            u = fx * p_cam[..., 0] / z + cx
            v = fy * p_cam[..., 1] / z + cy
            gi, gj = np.rint(v / stride), np.rint(u / stride)
        ok = (z > 1e-6) & (gi >= 0) & (gi < gh) & (gj >= 0) & (gj < gw)
        kk, pp = np.nonzero(ok)
        cell = ((kk + k0) * gh + gi[kk, pp].astype(np.int64)) * gw + gj[kk, pp].astype(np.int64)
        with np.errstate(invalid="ignore"):
            hit = accept(z[kk, pp], flat[cell])
        kk, pp = kk[hit], pp[hit]
        out.append((kk + k0, pp, np.stack([u[kk, pp], v[kk, pp]], axis=1),
                    np.linalg.norm(p_cam[kk, pp], axis=1)))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(4))


def visible_test(cfg: CandidateConfig) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`visible`'s occlusion test as an ``accept(z, d)`` for `seen_pairs`."""
    return lambda z, d: np.abs(z - d) <= cfg.depth_tol_rel * d + cfg.voxel_m


def in_view_test(behind_rel: float, behind_m: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`in_view`'s test as an ``accept(z, d)`` for `seen_pairs`."""
    return lambda z, d: z <= d * (1.0 + behind_rel) + behind_m


def view_stats(points: np.ndarray, kfs: Sequence[Frame], grids: Sequence[np.ndarray], stride: int,
               cfg: CandidateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per point: how many keyframes see it (P,) int64 (`visible`), and the smallest / largest metric
    extent of a seeing keyframe's image height there (P, 2) float64 (``H * ray distance / fy``, NaN when
    no keyframe sees it): the language scales a point was supervised at are tile fractions of that."""
    counts = np.zeros(points.shape[0], np.int64)
    lo = np.full(points.shape[0], np.inf)
    hi = np.zeros(points.shape[0])
    for kf, grid in zip(kfs, grids, strict=True):
        seen, _, dist = visible(points, kf, grid, stride, cfg)
        extent = kf.intrinsics.height * dist / kf.intrinsics.fy
        counts += seen
        lo = np.where(seen, np.minimum(lo, extent), lo)
        hi = np.where(seen, np.maximum(hi, extent), hi)
    footprint = np.stack([lo, hi], axis=1)
    footprint[counts == 0] = np.nan
    return counts, footprint


def view_counts(points: np.ndarray, kfs: Sequence[Frame], grids: Sequence[np.ndarray], stride: int,
                cfg: CandidateConfig) -> np.ndarray:
    """How many keyframes see each point (P,) int64 (see `visible`)."""
    return view_stats(points, kfs, grids, stride, cfg)[0]


def compute_candidates(frames: Sequence[Frame], cfg: CandidateConfig, key: str,
                       render: Callable[[Frame, int], np.ndarray],
                       ids: Sequence[int] | None = None) -> CandidateSet:
    """The candidate set of ``frames`` (keyframe ids ``ids``, default 0..K-1); ``render(kf, stride)``
    supplies the depth grid of a keyframe without measured depth (e.g. `render_depth_grid` bound to the
    model)."""
    s = cfg.pixel_stride
    grids = [kf.depth_m[::s, ::s].copy() if kf.depth_m is not None else render(kf, s) for kf in frames]
    return merge_candidates(frames, grids, cfg, key, ids)


def _stack_grids(grids: Sequence[np.ndarray]) -> np.ndarray:
    """(K, h, w) float32 of the keyframes' depth grids; keyframes of smaller images (another camera) padded
    with NaN at the bottom and right: `_project` reads NaN there, as outside the image, so nothing is seen."""
    h, w = max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)
    out = np.full((len(grids), h, w), np.nan, np.float32)
    for k, g in enumerate(grids):
        out[k, :g.shape[0], :g.shape[1]] = g
    return out


def merge_candidates(frames: Sequence[Frame], grids: Sequence[np.ndarray], cfg: CandidateConfig, key: str,
                     ids: Sequence[int] | None = None) -> CandidateSet:
    """The candidate set of ``frames`` from their depth grids (every pixel_stride-th pixel, z metres)."""
    s = cfg.pixel_stride
    pts_all, rgb_all = [], []
    for kf, grid in zip(frames, grids, strict=True):
        pts, rgb = lift_depth(kf, s, grid, with_rgb=True)
        pts_all.append(pts)
        rgb_all.append(rgb)
    ids = np.arange(len(frames)) if ids is None else np.asarray(ids, np.int64)
    stacked = (ids, _stack_grids(grids)) if grids else (None, None)
    if not pts_all or sum(p.shape[0] for p in pts_all) == 0:
        empty = np.zeros((0, 3))
        return CandidateSet(empty, np.zeros((0, 3), np.uint8), np.zeros(0, np.int64), key, np.zeros((0, 2)),
                            *stacked)
    centres, colours = voxel_merge(np.concatenate(pts_all), np.concatenate(rgb_all), cfg.voxel_m)
    counts, footprint = view_stats(centres, frames, grids, s, cfg)
    return CandidateSet(centres, colours, counts, key, footprint, *stacked)


def spread_order(have: np.ndarray) -> list[int]:
    """Indices of the False entries of ``have`` (keyframes in the order of the drive, True = has a grid),
    each next one the farthest, in places along the drive, from the True entries and those before it (ties:
    the earlier); with no True entry the first pick is the middle of the drive. Greedy farthest-point
    order in one dimension: the first k picks split the route into gaps of about n / k keyframes."""
    have = np.asarray(have, dtype=bool)
    n = have.shape[0]
    pos = np.arange(n)
    if have.any():
        dist = np.min(np.abs(pos[:, None] - pos[have][None, :]), axis=1).astype(np.float64)
    else:  # the drive's two ends as virtual neighbours: the first pick is its middle
        dist = np.minimum(pos + 1, n - pos).astype(np.float64)
    dist[have] = -1.0
    out = []
    for _ in range(n - int(have.sum())):
        k = int(np.argmax(dist))
        out.append(k)
        dist = np.minimum(dist, np.abs(pos - k))
        dist[k] = -1.0
    return out


class CandidateCache:
    """The engine's current `CandidateSet`, kept up to date incrementally, and its device tensors.

    One depth grid per keyframe: measured depth as is; rendered depth once when the keyframe first needs
    it, then re-rendered by `refresh` (the training worker calls it, a keyframe at a time, the stalest
    first) as the model changes. A query (`get`) never re-renders a keyframe that has a grid: it merges
    the latest grids, and only when the keyframe set or a grid changed (``(version, grids_version)``).
    The content `candidate_key` is what a saved set is matched against after a load.
    """

    def __init__(self, cfg: CandidateConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.current: CandidateSet | None = None
        self._key: tuple[int, int] | None = None
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # kf id -> (grid, step rendered; -1 measured; _UNFILLED measured with holes not filled yet)
        self._grids: dict[int, tuple[np.ndarray, int]] = {}
        self._grids_version = 0

    def _sync(self, ids: Sequence[int], frames: Sequence[Frame], step: int, model,
              render_missing: bool = True) -> None:
        """Forget evicted keyframes' grids; make the missing ones (`_grid`): measured depth always,
        rendered depth only with ``render_missing``."""
        alive = {int(i) for i in ids}
        for gone in [i for i in self._grids if i not in alive]:
            del self._grids[gone]
            self._grids_version += 1
        for kf_id, kf in zip(ids, frames, strict=True):
            if int(kf_id) in self._grids or (not render_missing and kf.depth_m is None):
                continue
            self._grids[int(kf_id)] = self.depth_grid(kf, step, model if render_missing else None)
            self._grids_version += 1

    def depth_grid(self, kf: Frame, step: int, model) -> tuple[np.ndarray, int]:
        """Measured depth (step -1); where it has holes (black, shiny, glass surfaces, out of range) and a
        model exists, the holes filled from rendered depth (step = the model's); else rendered depth.
        Touches no state of the cache, so it may run outside the engine lock on a copy of the model
        (`model.geometry_snapshot`); `put_grid` stores the result."""
        s = self.cfg.pixel_stride
        if kf.depth_m is None:
            return render_depth_grid(model, kf, s, self.device), int(step)
        grid = kf.depth_m[::s, ::s].astype(np.float32)
        holes = ~(np.isfinite(grid) & (grid > 0))
        if not holes.any():
            return grid, -1
        if model is None:
            return grid, _UNFILLED
        grid = np.where(holes, render_depth_grid(model, kf, s, self.device), grid)
        return grid, int(step)

    @property
    def grids_version(self) -> int:
        return self._grids_version

    def rendered_grids(self, min_step: int = 0) -> dict[int, np.ndarray]:
        """Keyframe id -> depth grid, for the grids rendered (wholly or in part) at ``min_step`` or later."""
        return {i: g for i, (g, st) in self._grids.items() if st >= max(min_step, 0)}

    def get(self, version: int, ids: Sequence[int], frames: Sequence[Frame], step: int, model,
            render_missing: bool = True, merge: bool = True):
        """points (P, 3) float32 world, rgb (P, 3) uint8, views (P,) int64 tensors on the device.

        render_missing=False (a query during training): keyframes without a grid yet are left out rather
        than rendered here; `refresh` makes their grids first. merge=False (the same): the last merged set
        is returned as it is when there is one (the training worker merges the new grids, `merge_job`);
        merging costs O(points x keyframes), seconds on a CPU with many large keyframes."""
        self._sync(ids, frames, step, model, render_missing)
        if self._key != (int(version), self._grids_version) and (merge or self._tensors is None):
            job = self.merge_job(version, ids, frames, step)
            self.install(job(), job.key)
        return self._tensors

    def merge_job(self, version: int, ids: Sequence[int], frames: Sequence[Frame], step: int):
        """None when the merged set is current; else a callable -> `CandidateSet` over the grids held now,
        with the cache key it is for (``.key``), that touches no shared state: the engine runs it outside
        its lock and hands the result to `install` (keyframes without a grid yet are left out)."""
        self._sync(ids, frames, step, None, render_missing=False)  # measured grids of new keyframes
        key = (int(version), self._grids_version)
        if self._key == key:
            return None
        have = [(int(i), f) for i, f in zip(ids, frames, strict=True) if int(i) in self._grids]
        ids_h, frames_h = [i for i, _ in have], [f for _, f in have]
        grids, cfg = [self._grids[i][0] for i in ids_h], self.cfg

        def job() -> CandidateSet:
            return merge_candidates(frames_h, grids, cfg, candidate_key(ids_h, frames_h, step, cfg), ids_h)

        job.key = key
        return job

    def refresh(self, ids: Sequence[int], frames: Sequence[Frame], step: int, model, max_renders: int = 1,
                min_age_steps: int = 1) -> int:
        """Render up to ``max_renders`` grids: keyframes without one first, then rendered grids older than
        ``min_age_steps`` (stalest first); returns how many. The next `get` merges them in."""
        by_id = {int(i): f for i, f in zip(ids, frames, strict=True)}
        stale = self.stale(ids, step, min_age_steps)
        for kf_id in stale[:max_renders]:
            self.put_grid(kf_id, self.depth_grid(by_id[kf_id], step, model))
        return min(len(stale), max_renders)

    def stale(self, ids: Sequence[int], step: int, min_age_steps: int = 1) -> list[int]:
        """Keyframes whose grid `refresh` would render next, in its order: those without one, then rendered
        grids older than ``min_age_steps`` and measured ones with holes not filled yet, stalest first."""
        order = [int(i) for i in ids]
        present = set(order)
        have = np.array([i in self._grids for i in order], dtype=bool)
        # Keyframes with no grid come first, spread along the drive (`spread_order`): after a restart the
        # first few grids already cover the whole route instead of its beginning.
        missing = [order[k] for k in spread_order(have)]
        old = sorted((st, i) for i, (_, st) in self._grids.items() if i in present and (
            (st >= 0 and step - st >= min_age_steps) or st == _UNFILLED))
        return missing + [i for _, i in old]

    def urgent(self, ids: Sequence[int], step: int, age_ratio: float) -> bool:
        """Whether a keyframe of ``ids`` has no grid, or a rendered grid from a model trained for fewer than
        ``age_ratio`` x ``step`` steps (the model has changed much since: a young model's geometry)."""
        for i in ids:
            grid = self._grids.get(int(i))
            if grid is None or 0 <= grid[1] < age_ratio * step:
                return True
        return False

    def put_grid(self, kf_id: int, grid: tuple[np.ndarray, int]) -> None:
        """Store a grid from `depth_grid`; the next merge takes it in."""
        self._grids[int(kf_id)] = grid
        self._grids_version += 1

    def adopt(self, cset: CandidateSet, version: int, ids: Sequence[int], frames: Sequence[Frame],
              step: int) -> bool:
        """Use a saved set if its key matches these keyframes at this step; False (ignored) if stale."""
        if cset.key != candidate_key(ids, frames, step, self.cfg):
            return False
        if cset.grid_ids is not None:
            measured = {int(i) for i, f in zip(ids, frames, strict=True)
                        if f.depth_m is not None and not has_holes(f, self.cfg.pixel_stride)}
            self._grids = {int(i): (g, -1 if int(i) in measured else int(step))
                           for i, g in zip(cset.grid_ids, cset.grids, strict=True)}
            self._grids_version += 1
        self.install(cset, (int(version), self._grids_version))
        return True

    def install(self, cset: CandidateSet, key: tuple[int, int]) -> None:
        """Make ``cset`` (a merge for cache ``key``: `merge_job`'s, or an adopted saved set) current."""
        self.current, self._key = cset, key
        self._tensors = (torch.tensor(cset.points, dtype=torch.float32, device=self.device),
                         torch.from_numpy(cset.rgb).to(self.device),
                         torch.from_numpy(cset.views).to(self.device))
