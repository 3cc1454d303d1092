"""Where the fields model at full resolution: the scene box from what the cameras see.

With measured depth, the surface points bound the scene. Without depth (an RGB-only robot), the camera
positions alone do not: a camera 1.1 m up looking down at the floor sees nothing at its own height. The
box then comes from the camera frusta: rays through a grid of pixels, each cut where it meets the ground
plane of the world frame (REP-105: z = 0 is the floor in ``map`` / ``odom``) or at ``max_range_m``.
A frustum bounds what a camera could see, not what is there: a camera 1.5 m up, looking nearly level,
reaches ``max_range_m`` in every direction, and a 4 x 5 m room got a 14 x 15 m box (hash-grid cells
three times coarser than needed). Once the model renders depth, the engine tightens a frustum box to the
rendered surfaces (`tightened_box`) and judges "outside" from them (``seen`` of `inside_fraction`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..fields.scene_box import SceneBox
from ..language.candidates import depth_bounds, lift_depth
from .frame import Frame

#: Pixel grid (columns, rows) of the rays that sample a frustum.
RAY_GRID = (9, 7)
#: Below the ground plane the box keeps only this much room (the floor's own thickness and noise), metres.
BELOW_GROUND_M = 0.25


def frustum_rays(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Origin (3,) and unit directions (R, 3) world frame of rays through a grid of ``frame``'s pixels."""
    i = frame.intrinsics
    u, v = np.meshgrid(np.linspace(0, i.width - 1, RAY_GRID[0]), np.linspace(0, i.height - 1, RAY_GRID[1]))
    d_cam = np.stack([(u.ravel() - i.cx) / i.fx, (v.ravel() - i.cy) / i.fy, np.ones(u.size)], axis=1)
    d = d_cam @ frame.T_world_cam[:3, :3].T
    return frame.T_world_cam[:3, 3], d / np.linalg.norm(d, axis=1, keepdims=True)


def frustum_ends(frame: Frame, max_range_m: float, ground_z: float | None) -> np.ndarray:
    """(R, 3) world points where the frustum rays end: at the ground plane or at max_range_m."""
    o, d = frustum_rays(frame)
    t = np.full(d.shape[0], float(max_range_m))
    if ground_z is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            t_ground = (ground_z - o[2]) / d[:, 2]
        hit = (d[:, 2] < -1e-9) & (t_ground > 0)
        t = np.where(hit, np.minimum(t_ground, t), t)
    return o + t[:, None] * d


def derive_box(frames: Sequence[Frame], margin_m: float, max_range_m: float,
               ground_z: float | None) -> SceneBox:
    """Bounds of the camera positions and what they see, grown by margin_m: measured depth where any
    keyframe has it (1st-99th percentile), else the frusta (`frustum_ends`); when a ground plane is given,
    never more than BELOW_GROUND_M under it (or under the lowest point seen, if that is lower)."""
    if not frames:
        raise ValueError("no keyframes to derive a scene box from")
    pts = [np.stack([f.T_world_cam[:3, 3] for f in frames])]
    bounds = depth_bounds(frames)
    if bounds is not None:
        pts.extend(bounds)
    else:
        pts.extend(frustum_ends(f, max_range_m, ground_z) for f in frames)
    p = np.vstack([np.atleast_2d(x) for x in pts])
    lo, hi = p.min(0) - margin_m, p.max(0) + margin_m
    if ground_z is not None:  # measured floor points too: the margin below the floor is wasted resolution
        lo[2] = max(lo[2], min(ground_z, p[:, 2].min()) - BELOW_GROUND_M)
        hi[2] = max(hi[2], lo[2] + 0.5)
    return SceneBox(tuple(lo), tuple(hi))


def tightened_box(box: SceneBox, camera_positions: np.ndarray, rendered: Sequence[np.ndarray],
                  margin_m: float) -> SceneBox | None:
    """``box`` cut down to the rendered surface points (1st-99th percentile) and the camera positions,
    grown by margin_m; None when no rendered point lies inside ``box`` (what lies outside it is modelled
    in contracted space and too coarse to bound anything)."""
    lo, hi = np.asarray(box.min_xyz), np.asarray(box.max_xyz)
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in rendered]
                         or [np.zeros((0, 3))])
    pts = pts[np.all(np.isfinite(pts) & (pts >= lo) & (pts <= hi), axis=1)]
    if pts.shape[0] == 0:
        return None
    p = np.vstack([np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0),
                   np.asarray(camera_positions, dtype=np.float64).reshape(-1, 3)])
    new_lo = np.maximum(p.min(0) - margin_m, lo)
    new_hi = np.minimum(p.max(0) + margin_m, hi)
    return SceneBox(tuple(new_lo), tuple(new_hi), box.contract)


#: What a scene box came from (`LERFEngine.box_source`), in words for the node's log and the CLI.
BOX_SOURCES = {
    "given": "given by scene_box_min / scene_box_max",
    "depth": "derived from the measured depth",
    "frusta": "derived from the camera frusta",
    "frusta, checked": "derived from the camera frusta (the rendered surfaces fill it)",
    "rendered": "fitted to the surfaces the model renders",
}


def describe_source(source: str) -> str:
    return BOX_SOURCES.get(source, "as saved in the map")


def box_volume(box: SceneBox) -> float:
    return float(np.prod(np.asarray(box.max_xyz) - np.asarray(box.min_xyz)))


def inside_fraction(frame: Frame, box: SceneBox, max_range_m: float, ground_z: float | None,
                    samples: int = 8, seen: np.ndarray | None = None) -> float:
    """Fraction of what ``frame`` sees that lies inside ``box``: ``seen`` (N, 3) world points (its
    rendered surface) when given, else its measured surface points (every 8th pixel) when it has depth,
    else points sampled along its frustum rays up to their ends."""
    lo, hi = np.asarray(box.min_xyz), np.asarray(box.max_xyz)
    if seen is not None and len(seen):
        return float(np.all((seen >= lo) & (seen <= hi), axis=1).mean())
    if frame.depth_m is not None:
        pts = lift_depth(frame, 8)
        if pts.shape[0]:
            return float(np.all((pts >= lo) & (pts <= hi), axis=1).mean())
    o, d = frustum_rays(frame)
    ends = frustum_ends(frame, max_range_m, ground_z)
    t_end = np.linalg.norm(ends - o, axis=1)
    s = (np.arange(samples) + 0.5) / samples
    p = o + (s[None, :, None] * t_end[:, None, None]) * d[:, None, :]
    return float(np.all((p >= lo) & (p <= hi), axis=-1).mean())
