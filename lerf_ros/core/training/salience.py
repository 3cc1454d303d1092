"""Where to spend training rays: more of them on pixels whose content stands out from their keyframe.

With rays drawn uniformly, a 9 cm cup seen in 8 of 48 keyframes, a few dozen pixels each, gets a ray
about once in fifty steps, and the language field never learns it while walls and floor converge
(measured on the randomised rooms, `bench/quality.py`: the field's relevancy at such objects stayed at
background level although their crop embeddings named them correctly). LERF draws rays uniformly and
trains 30 k steps of 4096 rays; a map that must be usable after a minute on a robot cannot.

Salience is read from what the keyframe already stores, with no extra encoder call: each crop of the
smallest pyramid level against the mean of that keyframe's smallest crops, ``s = 1 - cos(e, mean)``.
Uniform content (walls, floor, a table top) sits near its keyframe's mean; objects do not, whatever the
encoder. A share ``frac`` of each batch is drawn by importance: a crop cell of any keyframe with
probability proportional to ``s ** power + floor`` (the floor keeps every cell possible), then a pixel
uniformly inside it. The table of cells and its cumulative weights is built once per keyframe set
(`cell_table`), so a draw costs a binary search per ray. The rest of the batch stays uniform, so every
pixel keeps being trained (photometric and language losses are means over the batch: the salient share
weights objects more, on purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SalienceConfig:
    """frac: share of each batch drawn by salience (0 = uniform sampling only); power: sharpness of the
    preference; floor: weight added to every cell."""

    frac: float = 0.5
    power: float = 2.0
    floor: float = 1e-3

    def validate(self) -> SalienceConfig:
        if not 0.0 <= self.frac <= 1.0:
            raise ValueError(f"salience frac must be in [0, 1], got {self.frac}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"salience power must be finite and > 0, got {self.power}")
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"salience floor must be finite and > 0, got {self.floor}")
        return self

    def counts(self, n_rays: int) -> tuple[int, int]:
        """(uniform rays, salient rays) of a batch of ``n_rays``."""
        n_sal = round(self.frac * n_rays)
        return n_rays - n_sal, n_sal


@dataclass
class CellTable:
    """The smallest-level crop cells of a keyframe set and their sampling weights.

    rows: (N,) int64 keyframe row (index into `KeyframeTensors`); centre: (N, 2) float32 (u, v) of the
    cell's crop centre; half: (N,) float32 half the cell's size (the level's stride) in pixels;
    score: (N,) float32 salience ``1 - cos`` of the cell; cdf: (N,) float64 cumulative weights (built for
    one config by `weights`)."""

    rows: torch.Tensor
    centre: torch.Tensor
    half: torch.Tensor
    score: torch.Tensor
    cdf: torch.Tensor | None = None

    def weights(self, config: SalienceConfig) -> CellTable:
        w = self.score.double().clamp_min(0.0).pow(config.power) + config.floor
        w = torch.where(torch.isfinite(w), w, torch.full_like(w, config.floor))
        self.cdf = torch.cumsum(w, 0)
        return self


def cell_table(pyramid, kf_ids: list[int], device) -> CellTable:
    """The smallest-level cells of keyframes ``kf_ids`` (row i = kf_ids[i]) with their salience."""
    rows, centres, halves, scores = [], [], [], []
    for r, kf_id in enumerate(kf_ids):
        h, w = pyramid.store.layout(kf_id)
        lv = pyramid.levels(h, w)[0]
        e = F.normalize(pyramid.level_embeddings(kf_id, 0).reshape(-1, pyramid.dim), dim=1)
        mean = F.normalize(e.mean(0), dim=0)
        scores.append((1.0 - e @ mean).clamp_min(0.0))
        jj, ii = torch.meshgrid(torch.arange(lv.nx), torch.arange(lv.ny), indexing="xy")
        u0, v0 = lv.centre0
        s = lv.stride_px
        centres.append(torch.stack([u0 + jj.reshape(-1) * s, v0 + ii.reshape(-1) * s], 1))
        halves.append(torch.full((lv.nx * lv.ny,), lv.stride_px / 2.0))
        rows.append(torch.full((lv.nx * lv.ny,), r, dtype=torch.int64))
    return CellTable(torch.cat(rows).to(device), torch.cat(centres).float().to(device),
                     torch.cat(halves).to(device), torch.cat(scores).float().to(device))


def draw(table: CellTable, n: int, sizes: torch.Tensor, generator: torch.Generator):
    """(rows, u, v) int64 (n,) each: cells drawn with probability ~ their weight (``table.cdf``), then a
    pixel uniformly inside each, clamped to its keyframe's image (``sizes`` (K, 2) int64 (w, h))."""
    dev = generator.device
    r = torch.rand(n, generator=generator, device=dev, dtype=torch.float64).to(table.cdf.device)
    idx = torch.searchsorted(table.cdf, r * table.cdf[-1], right=True).clamp(max=table.cdf.shape[0] - 1)
    rows = table.rows[idx]
    jitter = (torch.rand(n, 2, generator=generator, device=dev).to(table.centre.device) * 2.0 - 1.0)
    uv = torch.round(table.centre[idx] + jitter * table.half[idx, None]).long()
    size = sizes[rows]
    u = uv[:, 0].clamp(min=0).minimum(size[:, 0] - 1)
    v = uv[:, 1].clamp(min=0).minimum(size[:, 1] - 1)
    return rows, u, v
