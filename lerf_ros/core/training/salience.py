"""Where to spend training rays: more of them on pixels whose content stands out from their keyframe.

With rays drawn uniformly, a 9 cm cup seen in 8 of 48 keyframes, a few dozen pixels each, gets a ray
about once in fifty steps, and the language field never learns it while walls and floor converge
(measured on the randomised rooms, `bench/quality.py`: the field's relevancy at such objects stayed at
background level although their crop embeddings named them correctly). LERF draws rays uniformly and
trains 30 k steps of 4096 rays; a map that must be usable after a minute on a robot cannot.

Salience is read from what the keyframe already stores, with no extra encoder call: a pixel's smallest
crop embedding against the mean of that keyframe's smallest crops, ``s = 1 - cos(e, mean)``. Uniform
content (walls, floor, a table top) sits near its keyframe's mean; objects do not, whatever the encoder.
A share ``frac`` of each batch is drawn by sampling-importance-resampling: ``pool`` uniform candidates
per ray, kept with probability proportional to ``s ** power`` (plus ``floor``, so nothing is ever
excluded). The rest of the batch stays uniform, so every pixel keeps being trained (photometric and
language losses are means over the batch: the salient share weights objects more, on purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SalienceConfig:
    """frac: share of each batch drawn by salience (0 = uniform sampling only); pool: uniform candidates
    per salient ray; power: sharpness of the preference; floor: weight added to every candidate."""

    frac: float = 0.5
    pool: int = 8
    power: float = 2.0
    floor: float = 1e-3

    def validate(self) -> SalienceConfig:
        if not 0.0 <= self.frac <= 1.0:
            raise ValueError(f"salience frac must be in [0, 1], got {self.frac}")
        if self.pool < 1:
            raise ValueError(f"salience pool must be >= 1, got {self.pool}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"salience power must be finite and > 0, got {self.power}")
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"salience floor must be finite and > 0, got {self.floor}")
        return self

    def counts(self, n_rays: int) -> tuple[int, int]:
        """(uniform rays, salient rays) of a batch of ``n_rays``."""
        n_sal = round(self.frac * n_rays)
        return n_rays - n_sal, n_sal


def keyframe_means(pyramid, kf_ids: list[int], device) -> torch.Tensor:
    """(K, D) unit mean of each keyframe's smallest-level crop embeddings (the salience reference)."""
    means = [F.normalize(pyramid.level_embeddings(i, 0).reshape(-1, pyramid.dim).mean(0), dim=0)
             for i in kf_ids]
    return torch.stack(means).to(device)


def salience(embeds: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(N,) in [0, 2]: 1 - cos between unit embeddings (N, D) and their keyframe's mean (N, D)."""
    return (1.0 - (embeds * means).sum(-1)).clamp_min(0.0)


def resample(scores: torch.Tensor, n: int, config: SalienceConfig,
             generator: torch.Generator) -> torch.Tensor:
    """Indices (n,) into ``scores`` (n * pool,), drawn without replacement, probability ~ score ** power."""
    w = scores.float().clamp_min(0.0).pow(config.power) + config.floor
    w = torch.where(torch.isfinite(w), w, torch.full_like(w, config.floor))
    gen_dev = generator.device
    return torch.multinomial(w.to(gen_dev), n, replacement=False, generator=generator).to(scores.device)
