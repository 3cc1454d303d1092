"""Pictures of a query answer for people: PNG panels drawn with Pillow, deterministic.

Two panels of ``PANEL_SIZE`` (640 x 480 px) side by side, so a query picture is 1280 x 480:
  (a) the keyframe that sees the target best, relevancy of the cloud splatted over it in heat colours,
      target marked with a cross;
  (b) a top-down view (world x right, world y up, metres) of the scene cloud in its own colours,
      relevancy on top in heat colours, camera path, optional ground-truth boxes and the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.frames.camera import CameraIntrinsics

PANEL_SIZE = (640, 480)  # width, height in pixels
#: Heat-colour stops (dark purple -> red -> orange -> yellow -> white) for relevancy 0..1.
_HEAT_STOPS = np.array(
    [[20, 10, 40], [120, 20, 110], [220, 40, 40], [250, 140, 20], [255, 230, 60], [255, 255, 255]],
    dtype=np.float64,
)
_MARK = (0, 255, 255)  # cyan: readable over heat colours


@dataclass(frozen=True)
class KeyframeView:
    """One keyframe to draw: image (H, W, 3) uint8 RGB, pinhole intrinsics, T_world_cam (4, 4) optical,
    optional depth_m (H, W) metres along the optical axis (0 / NaN = none) for the scene layer."""

    image: np.ndarray
    intrinsics: CameraIntrinsics
    T_world_cam: np.ndarray
    depth_m: np.ndarray | None = None


def scene_points(views: Sequence[KeyframeView], stride: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The views' depth lifted to world points (N, 3) float64 with their colours (N, 3) uint8."""
    pts, cols = [np.zeros((0, 3))], [np.zeros((0, 3), np.uint8)]
    for v in views:
        if v.depth_m is None:
            continue
        z = np.asarray(v.depth_m, dtype=np.float64)[::stride, ::stride]
        rows, cols_ = np.mgrid[0:v.depth_m.shape[0]:stride, 0:v.depth_m.shape[1]:stride]
        ok = np.isfinite(z) & (z > 0)
        i = v.intrinsics
        p_cam = np.stack([(cols_[ok] - i.cx) / i.fx * z[ok], (rows[ok] - i.cy) / i.fy * z[ok], z[ok]], axis=1)
        T = np.asarray(v.T_world_cam, dtype=np.float64)
        pts.append(p_cam @ T[:3, :3].T + T[:3, 3])
        cols.append(np.asarray(v.image)[rows[ok], cols_[ok]])
    return np.concatenate(pts), np.concatenate(cols).astype(np.uint8)


def heat_colours(values) -> np.ndarray:
    """(N,) values in [0, 1] (clipped) -> (N, 3) uint8 heat colours."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64).reshape(-1)), 0.0, 1.0)
    pos = v * (len(_HEAT_STOPS) - 1)
    i0 = np.minimum(pos.astype(np.int64), len(_HEAT_STOPS) - 2)
    t = (pos - i0)[:, None]
    return np.round(_HEAT_STOPS[i0] * (1 - t) + _HEAT_STOPS[i0 + 1] * t).astype(np.uint8)


def project(points_world, intrinsics: CameraIntrinsics, T_world_cam) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) world points -> pixel coords (N, 2) float64 and depth along the optical axis (N,) metres."""
    T_cam_world = np.linalg.inv(np.asarray(T_world_cam, dtype=np.float64))
    p = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    pc = p @ T_cam_world[:3, :3].T + T_cam_world[:3, 3]
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsics.fx * pc[:, 0] / z + intrinsics.cx
        v = intrinsics.fy * pc[:, 1] / z + intrinsics.cy
    return np.stack([u, v], axis=1), z


def best_keyframe(views: Sequence[KeyframeView], target_world) -> int | None:
    """Index of the view that sees ``target_world`` (3,) best, or None if no view sees it.

    Best = in front of the camera and inside the image, scored by closeness to the image centre
    (normalised) plus distance in metres, so a near, centred view wins.
    """
    best, best_score = None, np.inf
    for i, view in enumerate(views):
        uv, z = project(np.asarray(target_world)[None], view.intrinsics, view.T_world_cam)
        if not (z[0] > 0.05):
            continue
        w, h = view.intrinsics.width, view.intrinsics.height
        u, v = uv[0]
        if not (0 <= u < w and 0 <= v < h):
            continue
        off_centre = np.hypot((u - w / 2) / w, (v - h / 2) / h)
        score = 2.0 * off_centre + 0.25 * z[0]
        if score < best_score:
            best, best_score = i, score
    return best


def _font():
    return ImageFont.load_default()


def _fit(image: Image.Image, size) -> tuple[Image.Image, float, tuple[int, int]]:
    """Letterbox ``image`` into ``size``: returns the panel, the scale and the paste offset."""
    panel = Image.new("RGB", size, (0, 0, 0))
    scale = min(size[0] / image.width, size[1] / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    off = ((size[0] - w) // 2, (size[1] - h) // 2)
    panel.paste(image.resize((w, h), Image.Resampling.BILINEAR), off)
    return panel, scale, off


def _cross(draw: ImageDraw.ImageDraw, x: float, y: float, r: int = 9) -> None:
    draw.line([(x - r, y - r), (x + r, y + r)], fill=_MARK, width=3)
    draw.line([(x - r, y + r), (x + r, y - r)], fill=_MARK, width=3)
    draw.ellipse([(x - r - 3, y - r - 3), (x + r + 3, y + r + 3)], outline=_MARK, width=2)


def keyframe_panel(
    view: KeyframeView | None, cloud_xyz, cloud_relevancy, target_world=None, title: str = "",
    size=PANEL_SIZE,
) -> Image.Image:
    """Panel (a): the keyframe image dimmed, cloud relevancy splatted in heat colours (nearest point wins)."""
    if view is None:
        panel = Image.new("RGB", size, (30, 30, 30))
        ImageDraw.Draw(panel).text((10, 10), (title + "\n" if title else "") + "no keyframe sees the target",
                                   fill=(255, 255, 255), font=_font())
        return panel
    img = np.asarray(view.image, dtype=np.uint8)
    h, w = img.shape[:2]
    out = (img.astype(np.float64) * 0.55).copy()
    xyz = np.asarray(cloud_xyz, dtype=np.float64).reshape(-1, 3)
    rel = np.asarray(cloud_relevancy, dtype=np.float64).reshape(-1)
    if xyz.shape[0]:
        uv, z = project(xyz, view.intrinsics, view.T_world_cam)
        ok = (z > 0.05) & np.all(np.isfinite(uv), axis=1)
        ui, vi = np.round(uv[ok, 0]).astype(np.int64), np.round(uv[ok, 1]).astype(np.int64)
        zz, rr = z[ok], rel[ok]
        # z-buffer with a small splat so sparse clouds read as surfaces; far points drawn first.
        order = np.argsort(-zz, kind="stable")
        zbuf = np.full((h, w), np.inf)
        rbuf = np.full((h, w), np.nan)
        radius = max(1, round(min(w, h) / 160))
        for du in range(-radius, radius + 1):
            for dv in range(-radius, radius + 1):
                uu, vv = ui[order] + du, vi[order] + dv
                inside = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
                uu, vv, zo, ro = uu[inside], vv[inside], zz[order][inside], rr[order][inside]
                nearer = zo < zbuf[vv, uu]
                zbuf[vv[nearer], uu[nearer]] = zo[nearer]
                rbuf[vv[nearer], uu[nearer]] = ro[nearer]
        has = np.isfinite(rbuf)
        alpha = np.clip(np.nan_to_num(rbuf), 0.0, 1.0)[has][:, None] * 0.7 + 0.3
        out[has] = out[has] * (1 - alpha) + heat_colours(rbuf[has]).astype(np.float64) * alpha
    panel, scale, off = _fit(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)), size)
    draw = ImageDraw.Draw(panel)
    if target_world is not None:
        uv, z = project(np.asarray(target_world)[None], view.intrinsics, view.T_world_cam)
        if z[0] > 0:
            _cross(draw, off[0] + uv[0, 0] * scale, off[1] + uv[0, 1] * scale)
    if title:
        draw.text((8, 6), title, fill=(255, 255, 255), font=_font())
    return panel


def _nice_step(span: float) -> float:
    raw = span / 6.0
    mag = 10 ** np.floor(np.log10(max(raw, 1e-9)))
    return float(min((s * mag for s in (1, 2, 5, 10) if s * mag >= raw), default=raw))


def top_down_panel(
    cloud_xyz, cloud_relevancy, cloud_rgb, target_world=None, camera_positions=None,
    boxes: Sequence[tuple[str, np.ndarray, np.ndarray]] = (), bounds=None, title: str = "",
    size=PANEL_SIZE, max_height_m: float = 2.0, scene_xyz=None, scene_rgb=None,
) -> Image.Image:
    """Panel (b): world x/y top-down in metres with labelled axes.

    cloud_xyz (N, 3), cloud_relevancy (N,), cloud_rgb (N, 3) uint8: the answer's cloud, points with
    relevancy > 0.5 in heat colours, the rest in their own colours; scene_xyz (S, 3) / scene_rgb
    (S, 3) uint8: the scene underneath in its own colours; camera_positions (M, 3): the camera path;
    boxes: (name, min (3,), max (3,)) outlines; bounds ((xmin, ymin), (xmax, ymax)) or None to fit
    the content. Points above ``max_height_m`` (world z) are left out, as in an occupancy-map
    slice, so a ceiling does not hide the floor.
    """
    xyz = np.asarray(cloud_xyz, dtype=np.float64).reshape(-1, 3)
    rel = np.asarray(cloud_relevancy, dtype=np.float64).reshape(-1)
    rgb = np.asarray(cloud_rgb, dtype=np.uint8).reshape(-1, 3)
    below = xyz[:, 2] <= max_height_m
    xyz, rel, rgb = xyz[below], rel[below], rgb[below]
    sxyz = np.zeros((0, 3)) if scene_xyz is None else np.asarray(scene_xyz, dtype=np.float64).reshape(-1, 3)
    srgb = np.zeros((0, 3), np.uint8) if scene_rgb is None else np.asarray(scene_rgb, np.uint8).reshape(-1, 3)
    keep = sxyz[:, 2] <= max_height_m
    sxyz, srgb = np.concatenate([sxyz[keep], xyz]), np.concatenate([srgb[keep], rgb])
    cams = np.zeros((0, 3)) if camera_positions is None else np.asarray(camera_positions).reshape(-1, 3)
    if bounds is None:
        pts = [sxyz[:, :2], cams[:, :2]] + [np.stack([b[1][:2], b[2][:2]]) for b in boxes]
        if target_world is not None:
            pts.append(np.asarray(target_world, dtype=np.float64)[None, :2])
        allp = np.concatenate(pts) if sum(len(p) for p in pts) else np.array([[-1.0, -1.0], [1.0, 1.0]])
        lo, hi = allp.min(0) - 0.2, allp.max(0) + 0.2
    else:
        lo, hi = np.asarray(bounds[0], dtype=np.float64), np.asarray(bounds[1], dtype=np.float64)
    margin_l, margin_b, margin_t, margin_r = 56, 40, 24, 12
    pw, ph = size[0] - margin_l - margin_r, size[1] - margin_t - margin_b
    span = np.maximum(hi - lo, 1e-3)
    s = min(pw / span[0], ph / span[1])  # px per metre, same on both axes
    cx0 = margin_l + (pw - span[0] * s) / 2
    cy0 = margin_t + ph - (ph - span[1] * s) / 2

    def to_px(p):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        return np.stack([cx0 + (p[:, 0] - lo[0]) * s, cy0 - (p[:, 1] - lo[1]) * s], axis=1)

    panel = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(panel)
    font = _font()
    # Scene in its own colours, lowest first so the tops of objects stay visible (numpy assignment
    # with repeated indices keeps the last write).
    order = np.argsort(sxyz[:, 2], kind="stable")
    canvas = np.asarray(panel).copy()
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2 x 2 px dots: a sparse cloud still reads as floor
        px = np.round(to_px(sxyz[order, :2])).astype(np.int64) + np.array([dx, dy])
        ok = (px[:, 0] >= 0) & (px[:, 0] < size[0]) & (px[:, 1] >= 0) & (px[:, 1] < size[1])
        canvas[px[ok, 1], px[ok, 0]] = srgb[order][ok]
    panel = Image.fromarray(canvas)
    draw = ImageDraw.Draw(panel)
    # Relevancy on top: only the relevant part, most relevant last.
    hot = np.nonzero(rel > 0.5)[0] if rel.size else np.zeros(0, np.int64)
    hot = hot[np.argsort(rel[hot], kind="stable")]
    for (x, y), c in zip(to_px(xyz[hot, :2]), heat_colours(rel[hot]), strict=True):
        draw.ellipse([(x - 2, y - 2), (x + 2, y + 2)], fill=tuple(int(v) for v in c))
    for name, bmin, bmax in boxes:
        (x0, y0), (x1, y1) = to_px([np.asarray(bmin)[:2], np.asarray(bmax)[:2]])
        draw.rectangle([(x0, y1), (x1, y0)], outline=(40, 120, 40), width=1)
        draw.text((x0 + 2, y1 + 1), name, fill=(40, 120, 40), font=font)
    if len(cams):
        draw.line([tuple(p) for p in to_px(cams[:, :2])], fill=(60, 60, 200), width=1)
    if target_world is not None:
        x, y = to_px(np.asarray(target_world)[:2])[0]
        _cross(draw, x, y)
    # Axes with ticks in metres over the visible world range.
    x_vis = (lo[0] + (margin_l - cx0) / s, lo[0] + (size[0] - margin_r - cx0) / s)
    y_vis = (lo[1] + (cy0 - (size[1] - margin_b)) / s, lo[1] + (cy0 - margin_t) / s)
    draw.line([(margin_l, size[1] - margin_b), (size[0] - margin_r, size[1] - margin_b)], fill=(0, 0, 0))
    draw.line([(margin_l, margin_t), (margin_l, size[1] - margin_b)], fill=(0, 0, 0))
    step = _nice_step(max(x_vis[1] - x_vis[0], y_vis[1] - y_vis[0]))
    for t in np.arange(np.ceil(x_vis[0] / step) * step, x_vis[1] + 1e-9, step):
        px = cx0 + (t - lo[0]) * s
        draw.line([(px, size[1] - margin_b), (px, size[1] - margin_b + 4)], fill=(0, 0, 0))
        draw.text((px - 10, size[1] - margin_b + 6), f"{t:.1f}", fill=(0, 0, 0), font=font)
    for t in np.arange(np.ceil(y_vis[0] / step) * step, y_vis[1] + 1e-9, step):
        py = cy0 - (t - lo[1]) * s
        draw.line([(margin_l - 4, py), (margin_l, py)], fill=(0, 0, 0))
        draw.text((6, py - 6), f"{t:.1f}", fill=(0, 0, 0), font=font)
    draw.text((size[0] // 2 - 30, size[1] - 16), "world x [m]", fill=(0, 0, 0), font=font)
    draw.text((4, 4), "world y [m]", fill=(0, 0, 0), font=font)
    if title:
        draw.text((margin_l + 80, 4), title, fill=(0, 0, 0), font=font)
    return panel


def query_picture(
    views: Sequence[KeyframeView], cloud_xyz, cloud_relevancy, cloud_rgb, target_world=None,
    title: str = "", boxes: Sequence[tuple[str, np.ndarray, np.ndarray]] = (), size=PANEL_SIZE,
) -> Image.Image:
    """Both panels side by side: (2 * width) x height RGB image."""
    idx = best_keyframe(views, target_world) if target_world is not None else None
    if idx is None and views and len(cloud_xyz):
        # No target (not found): show the view that sees the most relevant point.
        rel = np.asarray(cloud_relevancy).reshape(-1)
        idx = best_keyframe(views, np.asarray(cloud_xyz).reshape(-1, 3)[int(np.argmax(rel))])
    view = views[idx] if idx is not None else None
    cams = np.stack([np.asarray(v.T_world_cam)[:3, 3] for v in views]) if views else None
    left = keyframe_panel(view, cloud_xyz, cloud_relevancy, target_world,
                          f"{title}  (keyframe {idx})" if idx is not None else title, size)
    sxyz, srgb = scene_points(views)
    right = top_down_panel(cloud_xyz, cloud_relevancy, cloud_rgb, target_world, cams, boxes, None,
                           "top-down, relevancy > 0.5 in heat colours", size, scene_xyz=sxyz, scene_rgb=srgb)
    out = Image.new("RGB", (size[0] * 2, size[1]))
    out.paste(left, (0, 0))
    out.paste(right, (size[0], 0))
    return out


def save_png(image: Image.Image, path) -> Path:
    """Save deterministically (no timestamps or text chunks in the PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)
    return path
