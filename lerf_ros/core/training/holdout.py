"""Held-out pixels: a fixed ~5 % of every keyframe that training never sees, to judge convergence on.

Pixel (u, v) of keyframe k is held out when u is even, u + 1 is still inside the image and an integer
hash of (k, u // 2, v) falls below 2 x ``HOLDOUT_FRACTION``. Pairing keeps the training sampler free of
host round trips: a held-out pixel drawn for training is swapped for its right-hand neighbour (never held
out) with fixed-shape tensor ops, so nothing is filtered or redrawn. The price is that those neighbours
(5 % of the pixels) are drawn twice as often, a negligible bias.

Integer arithmetic only, every product below 2**63: the same pixels on the CPU and on CUDA, in every run,
for as long as keyframe ids stay (they are never reused).
"""

from __future__ import annotations

import torch

#: Share of each keyframe's pixels held out of training.
HOLDOUT_FRACTION = 0.05
_THRESHOLD = int(2 * HOLDOUT_FRACTION * 2**32)
_MASK32 = 0xFFFFFFFF


def _hash32(kf_ids: torch.Tensor, pair: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """int64 tensors (broadcastable) -> int64 in [0, 2**32), well mixed (murmur-style finaliser)."""
    h = ((kf_ids * 0x27D4EB2F) ^ (v * 0x165667B1) ^ (pair * 0x61C88647)) & _MASK32
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK32
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK32
    return h ^ (h >> 15)


def is_held_out(kf_ids: torch.Tensor, u: torch.Tensor, v: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """(N,) bool: pixel (u, v) (int64, x right / y down) of keyframe ``kf_ids`` (N,) is held out.

    width: (N,) or scalar int64 image width of each pixel's keyframe.
    """
    even_inside = ((u & 1) == 0) & (u + 1 < width)
    return even_inside & (_hash32(kf_ids, u >> 1, v) < _THRESHOLD)


def training_pixels(kf_ids: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                    width: torch.Tensor) -> torch.Tensor:
    """(N,) int64 column to train on: ``u``, or its right-hand neighbour when (u, v) is held out."""
    return u + is_held_out(kf_ids, u, v, width).to(u.dtype)
