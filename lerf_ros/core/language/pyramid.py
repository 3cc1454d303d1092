"""Multi-scale CLIP crop pyramid per keyframe (LERF §3.2), built one keyframe at a time.

For each tile size (a fraction of the image height), square crops on a regular grid are resized to
the encoder's input size, encoded in batches (fp16, channels-last on CUDA: `crop_batch_format`) and stored
(fp16) as a (gh, gw, D) grid per level.
A ray's target embedding is bilinear between the four neighbouring crop centres of a level and
linear between the two levels nearest in tile size, renormalised. The language scale in metres
of a tile is ``tile_frac * image_height * depth_m / fy`` (its extent at the ray's depth).

Pixel convention as ``core/frames/camera.py``: (u, v) = (column, row), pixel centres at integers; a crop
covering pixels a .. a + k − 1 is centred at a + (k − 1) / 2.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders.base import VisionLanguageEncoder, checked_encode_images
from .dense_features import (
    KeyframeFeatureStore,
    bilinear_corners,
    canonical_image_bytes,
    check_cancel,
    image_to_tensor,
    per_layout,
)

STATE_FORMAT = "lerf_ros.clip_pyramid/1"


@dataclass(frozen=True)
class PyramidConfig:
    """Crop pyramid settings (all part of the cache key).

    tile_fracs:     tile sizes as fractions of image height, strictly increasing (LERF: 7, 0.05 to 0.5)
    stride_ratios:  stride / tile size at the two ends of ``stride_ramp``; in between linear. LERF's
                    crops do not overlap at the smallest size and overlap by half from 0.15 up.
    stride_ramp:    tile fractions where the stride ratio goes from stride_ratios[0] to [1]
    batch_size:     crops per encode call
    dtype:          storage dtype of the embeddings ("float16", "bfloat16" or "float32")
    """

    tile_fracs: tuple[float, ...] = (0.05, 0.125, 0.2, 0.275, 0.35, 0.425, 0.5)
    stride_ratios: tuple[float, float] = (1.0, 0.5)
    stride_ramp: tuple[float, float] = (0.05, 0.15)
    batch_size: int = 64
    dtype: str = "float16"

    def validate(self) -> PyramidConfig:
        f = self.tile_fracs
        if len(f) < 1 or any(not (0 < x <= 1) for x in f) or any(b <= a for a, b in itertools.pairwise(f)):
            raise ValueError(f"tile_fracs must be strictly increasing in (0, 1], got {f}")
        if len(self.stride_ratios) != 2 or any(not (0 < r <= 1) for r in self.stride_ratios):
            raise ValueError(f"stride_ratios must be two values in (0, 1], got {self.stride_ratios}")
        if len(self.stride_ramp) != 2 or not (self.stride_ramp[0] < self.stride_ramp[1]):
            raise ValueError(f"stride_ramp must be (lo, hi) with lo < hi, got {self.stride_ramp}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype!r}")
        return self


@dataclass(frozen=True)
class Level:
    """Crop grid of one tile size on an H x W image: crop (i, j) starts at (y_start + i s, x_start + j s)."""

    tile_px: int
    stride_px: int
    x_start: int
    y_start: int
    nx: int
    ny: int

    @property
    def centre0(self) -> tuple[float, float]:
        """(u, v) of crop (0, 0)'s centre."""
        half = (self.tile_px - 1) / 2.0
        return self.x_start + half, self.y_start + half


def level_grid(tile_frac: float, height: int, width: int, config: PyramidConfig) -> Level:
    """Crop grid of one tile size: integer tile and stride, crops inside the image, grid centred."""
    k = max(1, min(round(tile_frac * height), height, width))
    ratio = float(np.interp(tile_frac, config.stride_ramp, config.stride_ratios))
    s = max(1, round(k * ratio))
    nx, ny = (width - k) // s + 1, (height - k) // s + 1
    return Level(k, s, (width - k - (nx - 1) * s) // 2, (height - k - (ny - 1) * s) // 2, nx, ny)


def metric_scale(tile_frac, image_height: int, fy: float, depth_m):
    """Language scale in metres of a tile: its extent ``tile_frac * image_height`` pixels at depth_m."""
    return tile_frac * image_height * depth_m / fy


def crop_batch_format(device: torch.device) -> tuple[torch.dtype, torch.memory_format]:
    """dtype and memory layout of the crop batches handed to the encoder on ``device``: fp16 and
    channels-last on CUDA (half the bytes, and the layout the GPU's fp16 convolution kernels read fastest,
    e.g. a ViT's patch embedding), fp32 in its layout as cut elsewhere (fp16 is slow on a CPU)."""
    if torch.device(device).type == "cuda":
        return torch.float16, torch.channels_last
    return torch.float32, torch.preserve_format


def encoder_batch(crops: Tensor, device: torch.device) -> Tensor:
    """(B, 3, S, S) float crops -> clamped to [0, 1] in `crop_batch_format` for ``device``."""
    dtype, layout = crop_batch_format(device)
    return crops.clamp(0.0, 1.0).to(dtype=dtype, memory_format=layout)


def _source_crops(src: Tensor, size: tuple[int, int], lv: Level, out_px: int, batch_size: int):
    """Crops of level ``lv`` (laid out on an image of ``size`` (H, W)) cut from the larger view ``src``
    (3, Hs, Ws) and resampled to out_px x out_px, in batches (B, 3, out_px, out_px), row-major order."""
    H, W = size
    k = lv.tile_px
    # Area-downsample first where a crop spans many source pixels per output pixel (no aliasing).
    shrink = max(1, int((k * src.shape[2] / W) / out_px))
    if shrink > 1:
        src = F.interpolate(src[None], size=(max(1, src.shape[1] // shrink), max(1, src.shape[2] // shrink)),
                            mode="area")[0]
    hs, ws = src.shape[1:]
    sx, sy = ws / W, hs / H
    m = (torch.arange(out_px, device=src.device, dtype=torch.float32) + 0.5) / out_px  # (S,) in the crop
    jj, ii = torch.meshgrid(torch.arange(lv.nx, device=src.device), torch.arange(lv.ny, device=src.device),
                            indexing="xy")
    x0 = (lv.x_start + jj.reshape(-1) * lv.stride_px).float()  # the crop's left pixel in the image
    y0 = (lv.y_start + ii.reshape(-1) * lv.stride_px).float()
    for b in range(0, x0.shape[0], batch_size):
        # source pixel-centre coordinates of the samples: edge a - 0.5 of the image maps to a * s - 0.5
        xs = x0[b:b + batch_size, None] * sx + m[None] * k * sx - 0.5  # (B, S)
        ys = y0[b:b + batch_size, None] * sy + m[None] * k * sy - 0.5
        n = xs.shape[0]
        gx = ((xs + 0.5) / ws * 2 - 1)[:, None, :].expand(n, out_px, out_px)
        gy = ((ys + 0.5) / hs * 2 - 1)[:, :, None].expand(n, out_px, out_px)
        grid = torch.stack([gx, gy], dim=-1).reshape(1, n * out_px, out_px, 2)
        crops = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        yield crops.reshape(3, n, out_px, out_px).permute(1, 0, 2, 3)


class ClipPyramid:
    """Per-keyframe multi-scale CLIP embeddings, added incrementally and sampled per ray."""

    def __init__(self, encoder: VisionLanguageEncoder, config: PyramidConfig | None = None, device="cpu"):
        self.encoder = encoder
        self.config = (config or PyramidConfig()).validate()
        self.device = torch.device(device)
        self.dim = int(encoder.dim)
        self.fracs = torch.tensor(self.config.tile_fracs, dtype=torch.float32, device=self.device)
        self.store = KeyframeFeatureStore(self.dim, getattr(torch, self.config.dtype), self.device)
        self._keys: dict[int, str] = {}
        self._geometry: dict[tuple[int, int], tuple[list[Level], dict[str, Tensor]]] = {}

    # ---- layout ---------------------------------------------------------------------------------

    def levels(self, height: int, width: int) -> list[Level]:
        """Crop grids of all tile sizes for an image size."""
        return self._layout(height, width)[0]

    def _layout(self, height: int, width: int) -> tuple[list[Level], dict[str, Tensor]]:
        key = (int(height), int(width))
        if key not in self._geometry:
            levels = [level_grid(f, key[0], key[1], self.config) for f in self.config.tile_fracs]
            cells = [lv.nx * lv.ny for lv in levels]

            def col(values, dtype=torch.float32):
                return torch.tensor(values, dtype=dtype, device=self.device)

            geo = {
                "u0": col([lv.centre0[0] for lv in levels]),
                "v0": col([lv.centre0[1] for lv in levels]),
                "stride": col([float(lv.stride_px) for lv in levels]),
                "nx": col([lv.nx for lv in levels], torch.long),
                "ny": col([lv.ny for lv in levels], torch.long),
                "offset": col(np.concatenate([[0], np.cumsum(cells)[:-1]]).tolist(), torch.long),
            }
            self._geometry[key] = (levels, geo)
        return self._geometry[key]

    # ---- building -------------------------------------------------------------------------------

    def cache_key(self, image, source=None) -> str:
        """sha256 of encoder name + crop settings + frame content (+ the full-resolution source the crops
        were cut from, when given): a cached pyramid is valid iff equal."""
        (h, w), data = canonical_image_bytes(image)
        settings = json.dumps({"encoder": self.encoder.name, "config": asdict(self.config)}, sort_keys=True)
        digest = hashlib.sha256(settings.encode())
        digest.update(f"{h}x{w}".encode())
        digest.update(data)
        if source is not None:
            (hs, ws), src = canonical_image_bytes(source)
            digest.update(f"source {hs}x{ws}".encode())
            digest.update(src)
        return digest.hexdigest()

    def compute(self, image, cancel: threading.Event | None = None,
                source=None) -> tuple[tuple[int, int], Tensor]:
        """Encode all crops of one image -> ((H, W), (cells, D) unit embeddings, levels concatenated).

        source: the same view at a higher resolution (the keyframe before ingest downsized it): the crop
        grid is laid out on ``image`` (so sampling is unchanged) but every crop is cut from ``source``,
        as LERF crops from full-resolution frames (a 5 % tile of a downsized frame is ~24 pixels
        upsampled to the encoder's 224). None = crop ``image`` itself.

        Heavy (the encoder runs here); touches no shared state, so a worker may call it without locks.
        cancel: checked before every encoder batch; when set, raises `dense_features.Cancelled` (so a
        stop waits for at most the batch in flight) and nothing is returned or stored.
        """
        img = image_to_tensor(image, self.device)
        _, H, W = img.shape
        levels, _ = self._layout(H, W)
        src = None if source is None else image_to_tensor(source, self.device)
        if src is not None and (src.shape[1] < H or src.shape[2] < W
                                or abs(src.shape[2] / src.shape[1] - W / H) > 0.02 * W / H):
            raise ValueError(f"pyramid source {tuple(src.shape[1:])} must be a larger view of the same "
                             f"aspect as the image {(H, W)}")
        if src is not None and tuple(src.shape[1:]) == (H, W):
            src = None
        s = self.encoder.input_size
        out = []
        with torch.no_grad():
            for lv in levels:
                if src is not None:
                    for batch in _source_crops(src, (H, W), lv, s, self.config.batch_size):
                        check_cancel(cancel, "CLIP pyramid")
                        out.append(self._encode(batch))
                    continue
                k, st = lv.tile_px, lv.stride_px
                region = img[
                    :,
                    lv.y_start : lv.y_start + (lv.ny - 1) * st + k,
                    lv.x_start : lv.x_start + (lv.nx - 1) * st + k,
                ]
                crops = region.unfold(1, k, st).unfold(2, k, st)  # (3, ny, nx, k, k), a view
                crops = crops.permute(1, 2, 0, 3, 4).reshape(lv.ny * lv.nx, 3, k, k)
                for b in range(0, crops.shape[0], self.config.batch_size):
                    check_cancel(cancel, "CLIP pyramid")
                    batch = crops[b : b + self.config.batch_size]
                    if k != s:
                        batch = F.interpolate(
                            batch, size=(s, s), mode="bilinear", align_corners=False, antialias=k > s
                        )
                    out.append(self._encode(batch))
        return (int(H), int(W)), torch.cat(out)

    def _encode(self, crops: Tensor) -> Tensor:
        """One batch of crops (B, 3, S, S) -> (B, D) float32 unit embeddings (`encoder_batch`)."""
        return checked_encode_images(self.encoder, encoder_batch(crops, self.device)).float()

    def insert(self, kf_id: int, size: tuple[int, int], grid: Tensor, key: str = "") -> None:
        """Store a computed grid (from ``compute``) for kf_id; cheap, takes the store lock."""
        levels, _ = self._layout(*size)
        cells = sum(lv.nx * lv.ny for lv in levels)
        if tuple(grid.shape) != (cells, self.dim):
            raise ValueError(
                f"pyramid grid for {size} must be ({cells}, {self.dim}), got {tuple(grid.shape)}"
            )
        with self.store.lock:
            self.store.put(kf_id, tuple(size), grid)
            self._keys[int(kf_id)] = key

    def add(self, kf_id: int, image, cancel: threading.Event | None = None) -> str:
        """Encode and store one keyframe ((H, W, 3) uint8 or (3, H, W) tensor); returns its cache key.
        A set ``cancel`` raises `Cancelled` and stores nothing (see `compute`)."""
        key = self.cache_key(image)
        size, grid = self.compute(image, cancel)
        self.insert(kf_id, size, grid, key)
        return key

    def ready(self, kf_id: int) -> bool:
        return self.store.contains(kf_id)

    def remove(self, kf_id: int) -> bool:
        with self.store.lock:
            self._keys.pop(int(kf_id), None)
            return self.store.remove(kf_id)

    def keyframe_ids(self) -> list[int]:
        return self.store.ids()

    def level_embeddings(self, kf_id: int, level: int) -> Tensor:
        """(gh, gw, D) float32 stored embeddings of one level of one keyframe (a copy)."""
        with self.store.lock:
            size = self.store.layout(kf_id)
            grid = self.store.grid(kf_id)
        levels = self._layout(*size)[0]
        start = sum(lv.nx * lv.ny for lv in levels[:level])
        lv = levels[level]
        return grid[start : start + lv.nx * lv.ny].float().reshape(lv.ny, lv.nx, self.dim)

    def key(self, kf_id: int) -> str | None:
        """Cache key the keyframe's pyramid was built with (None if absent)."""
        return self._keys.get(int(kf_id))

    # ---- sampling -------------------------------------------------------------------------------

    def random_tile_frac(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n,) tile fractions between the smallest and largest tile size, uniform in log scale, on
        self.device. LERF draws them uniformly; log-uniform gives the small tiles, the only ones that
        name a small object, as many rays as the large ones (0.05-0.1 gets 30 % instead of 11 %), the
        same spacing as the query's geometric scale search."""
        dev = generator.device if generator is not None else self.device
        t = torch.rand(n, generator=generator, device=dev).to(self.device)
        lo, hi = self.config.tile_fracs[0], self.config.tile_fracs[-1]
        return lo * (hi / lo) ** t

    def _corners(self, geo, level: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
        """Flat cell indices (R, 4) into a keyframe's grid (all levels) and bilinear weights (R, 4)."""
        stride = geo["stride"][level]
        gx = (uv[:, 0] - geo["u0"][level]) / stride
        gy = (uv[:, 1] - geo["v0"][level]) / stride
        idx, w = bilinear_corners(gx, gy, geo["nx"][level], geo["ny"][level])
        return idx + geo["offset"][level].unsqueeze(1), w

    def level_pair(self, tile_frac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The two pyramid levels around each tile fraction (clamped to the range) and the blend t (R,)."""
        f = tile_frac.to(self.device, torch.float32).reshape(-1).clamp(self.config.tile_fracs[0],
                                                                        self.config.tile_fracs[-1])
        n_lv = self.fracs.numel()
        lo = (torch.searchsorted(self.fracs, f, right=True) - 1).clamp(0, max(n_lv - 2, 0))
        hi = (lo + 1).clamp(max=n_lv - 1)
        span = self.fracs[hi] - self.fracs[lo]
        t = torch.where(span > 0, (f - self.fracs[lo]) / torch.where(span > 0, span, 1.0), 0.0)
        return lo, hi, t

    def _check_rows(self, kf_ids: Tensor, uv: Tensor, tile_frac: Tensor) -> int:
        r = kf_ids.reshape(-1).shape[0]
        if uv.shape != (r, 2) or tile_frac.reshape(-1).shape[0] != r:
            raise ValueError(
                f"uv must be ({r}, 2) and tile_frac ({r},), got {tuple(uv.shape)}, {tuple(tile_frac.shape)}"
            )
        return r

    def sample(self, kf_ids: Tensor, uv: Tensor, tile_frac: Tensor, check_ids: bool = True) -> Tensor:
        """Target embeddings for rays.

        kf_ids (R,) long; uv (R, 2) pixels (column, row); tile_frac (R,) (clamped to the config range)
        Returns (R, D) float32 unit vectors. check_ids=False: no check that every id has a pyramid, and no
        host sync at all (a training batch; `KeyframeFeatureStore.lookup`, `dense_features.per_layout`).
        """
        r = self._check_rows(kf_ids, uv, tile_frac)
        uv = uv.to(self.device, torch.float32)
        lo, hi, t = self.level_pair(tile_frac)
        levels, uv2, tm = torch.cat([lo, hi]), uv.repeat(2, 1), t.unsqueeze(1)

        def interpolate(li: int, slots: Tensor) -> Tensor:
            lay = layouts[li]
            _, geo = self._layout(*lay)
            # both levels in one gather: rows [0, r) at level lo, [r, 2r) at level hi
            cells, w = self._corners(geo, levels, uv2)
            both = (self.store.gather(lay, slots.repeat(2), cells) * w.unsqueeze(2)).sum(dim=1)
            return (1 - tm) * both[:r] + tm * both[r:]

        with self.store.lock:
            lay_idx, slots, layouts = self.store.lookup(kf_ids, check_ids)
            if not layouts:
                return torch.zeros(r, self.dim, device=self.device)
            out = per_layout(lay_idx, slots, len(layouts), interpolate)
        return F.normalize(out, dim=1)

    def cell_values(self, kf_id: int, cell_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """A scalar per stored crop of one keyframe (all levels): ``cell_fn`` maps its crop embeddings
        (cells, D) float32 to (cells,) values (e.g. their relevancy to a query)."""
        with self.store.lock:
            grid = self.store.grid(int(kf_id))
        return cell_fn(grid.float())

    def cell_levels(self, kf_id: int, values: Tensor, uv: Tensor) -> Tensor:
        """Per-crop scalars of one keyframe (`cell_values`) interpolated bilinearly between crop centres at
        pixels uv (R, 2), on every level: (n_levels, R) float32 (`blend_levels` then picks the scale)."""
        cells, w = self.corner_table([int(kf_id)], torch.zeros(uv.shape[0], dtype=torch.long), uv)
        return (values.to(self.device, torch.float32)[cells] * w).sum(dim=-1)

    def grids_of(self, kf_ids: Sequence[int]) -> Tensor:
        """(cells, D) float32: the stored embeddings of several keyframes (all levels), concatenated in the
        order of kf_ids (the table `corner_table`'s indices point into)."""
        with self.store.lock:
            return torch.cat([self.store.grid(int(k)).float() for k in kf_ids]) if len(kf_ids) else \
                torch.zeros(0, self.dim, device=self.device)

    def corner_table(self, kf_ids: Sequence[int], pos: Tensor, uv: Tensor,
                     levels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`cell_levels`'s interpolation for rows of several keyframes at once, before any values: row r
        of keyframe kf_ids[pos[r]] at pixel uv[r] reads, on level l, the cells ``cells[l, r]`` (4,) of the
        `grids_of(kf_ids)` concatenation with bilinear weights ``weights[l, r]`` (4,).
        pos (R,) long, uv (R, 2) -> cells (n_levels, R, 4) long, weights (n_levels, R, 4) float32; then
        ``(values[cells] * weights).sum(-1)`` is (n_levels, R) as `cell_levels` gives per keyframe.
        ``levels`` (K, R) long: only those levels, row r's k-th at ``cells[k, r]`` (K instead of n_levels)."""
        with self.store.lock:
            sizes = [self.store.layout(int(k)) for k in kf_ids]
        r = uv.shape[0]
        pos = pos.to(self.device, torch.long)
        uv = uv.to(self.device, torch.float32)
        if levels is not None:
            levels = levels.to(self.device, torch.long).reshape(-1, r)
        n_lv = self.fracs.numel() if levels is None else levels.shape[0]
        cells = torch.zeros(n_lv, r, 4, dtype=torch.long, device=self.device)
        weights = torch.zeros(n_lv, r, 4, dtype=torch.float32, device=self.device)
        counts = torch.tensor([0] + [sum(lv.nx * lv.ny for lv in self._layout(*sz)[0]) for sz in sizes],
                              dtype=torch.long, device=self.device)
        base = counts.cumsum(0)[:-1]  # first cell of each keyframe in the concatenation
        layout_of = {sz: i for i, sz in enumerate(dict.fromkeys(sizes))}
        which = torch.tensor([layout_of[sz] for sz in sizes], dtype=torch.long, device=self.device)
        for size, li in layout_of.items():
            rows = (which[pos] == li).nonzero().squeeze(1) if len(layout_of) > 1 else \
                torch.arange(r, device=self.device)
            if rows.numel() == 0:
                continue
            _, geo = self._layout(*size)
            level = (torch.arange(n_lv, device=self.device).repeat_interleave(rows.numel()) if levels is None
                     else levels[:, rows].reshape(-1))
            c, w = self._corners(geo, level, uv[rows].repeat(n_lv, 1))
            c = c + base[pos[rows]].repeat(n_lv).unsqueeze(1)
            cells[:, rows] = c.reshape(n_lv, rows.numel(), 4)
            weights[:, rows] = w.reshape(n_lv, rows.numel(), 4).float()
        return cells, weights

    def blend_levels(self, per_level: Tensor, tile_frac: Tensor) -> Tensor:
        """(n_levels, R) values (`cell_levels`) at tile fractions (R,) (clamped to the range), linear between
        the two nearest levels as `sample` blends embeddings -> (R,)."""
        lo, hi, t = self.level_pair(tile_frac)
        cols = torch.arange(per_level.shape[1], device=per_level.device)
        return (1 - t) * per_level[lo, cols] + t * per_level[hi, cols]

    def sample_cells(self, kf_id: int, values: Tensor, uv: Tensor, tile_frac: Tensor) -> Tensor:
        """`cell_levels` blended at tile_frac (R,): per-crop scalars interpolated as `sample` interpolates
        embeddings, without gathering any D-dimensional row. Returns (R,) float32."""
        r = self._check_rows(torch.empty(uv.shape[0]), uv, tile_frac)
        with self.store.lock:
            size = self.store.layout(int(kf_id))
        _, geo = self._layout(*size)
        lo, hi, t = self.level_pair(tile_frac)  # only the two levels each row needs
        cells, w = self._corners(geo, torch.cat([lo, hi]), uv.to(self.device, torch.float32).repeat(2, 1))
        both = (values.to(self.device, torch.float32)[cells] * w).sum(dim=1)
        return (1 - t) * both[:r] + t * both[r:]

    # ---- persistence ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "encoder_name": self.encoder.name,
            "dim": self.dim,
            "input_size": int(self.encoder.input_size),
            "config": json.loads(json.dumps(asdict(self.config))),
        }

    def state_dict(self, ids=None) -> dict:
        """Plain values + CPU tensors: {format, encoder_name, dim, input_size, config, keyframes}.
        ``ids``: only these keyframes' entries (a map's keyframes: the engine keeps an evicted keyframe's
        entry until the queries reading it end, and a map must not hold it)."""
        keep = None if ids is None else {int(i) for i in ids}
        with self.store.lock:
            kfs = {
                k: {
                    "size": list(self.store.layout(k)),
                    "key": self._keys.get(k, ""),
                    "grid": self.store.grid(k).cpu(),
                }
                for k in self.store.ids() if keep is None or k in keep
            }
        return {**self._meta(), "keyframes": kfs}

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a saved state; ValueError (nothing changed) on any mismatch."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a CLIP pyramid state (format {got!r}, expected {STATE_FORMAT!r})")
        mine = self._meta()
        for field in ("encoder_name", "dim", "input_size", "config"):
            if state.get(field) != mine[field]:
                raise ValueError(
                    f"pyramid {field} mismatch: saved {state.get(field)!r}, current {mine[field]!r}"
                )
        fresh = KeyframeFeatureStore(self.dim, self.store.dtype, self.device)
        keys: dict[int, str] = {}
        for kf_id, entry in dict(state.get("keyframes", {})).items():
            try:
                size = (int(entry["size"][0]), int(entry["size"][1]))
                grid, key = entry["grid"], str(entry["key"])
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"pyramid entry for keyframe {kf_id!r} is malformed: {exc}") from exc
            cells = sum(lv.nx * lv.ny for lv in self._layout(*size)[0])
            if not isinstance(grid, Tensor) or tuple(grid.shape) != (cells, self.dim):
                shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
                raise ValueError(
                    f"pyramid grid of keyframe {kf_id}: shape {shape}, expected ({cells}, {self.dim})"
                )
            if not torch.isfinite(grid.float()).all():
                raise ValueError(f"pyramid grid of keyframe {kf_id} is not finite")
            fresh.put(int(kf_id), size, grid)
            keys[int(kf_id)] = key
        with self.store.lock:
            self.store, self._keys = fresh, keys
