"""Training losses: RGB, depth, proposal (interlevel), distortion, CLIP, DINO.

All take (R, ...) per-ray tensors and return scalar tensors (unweighted; the model applies weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = torch.finfo(torch.float32).eps


def rgb_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over rays and channels; pred, target (R, 3) in [0, 1]."""
    return F.mse_loss(pred, target.to(pred))


def _outer_measure(
    t0: torch.Tensor, t1: torch.Tensor, y1: torch.Tensor
) -> torch.Tensor:
    """For each interval of edges t0 (R, A+1): the mass of y1 (R, B) (over edges t1 (R, B+1))
    in the t1 intervals overlapping it, i.e. the tightest upper bound ("outer measure")."""
    cy1 = torch.cat([torch.zeros_like(y1[:, :1]), torch.cumsum(y1, dim=-1)], dim=-1)
    nb = y1.shape[-1]
    starts0, ends0 = t0[:, :-1].contiguous(), t0[:, 1:].contiguous()
    starts1, ends1 = t1[:, :-1].contiguous(), t1[:, 1:].contiguous()
    lo = (torch.searchsorted(starts1, starts0, right=True) - 1).clamp(0, nb - 1)
    hi = torch.searchsorted(ends1, ends0, right=True).clamp(0, nb - 1)
    return cy1[:, 1:].gather(-1, hi) - cy1[:, :-1].gather(-1, lo)


def interlevel_loss(
    final_edges: torch.Tensor,
    final_weights: torch.Tensor,
    proposal_edges: list[torch.Tensor],
    proposal_weights: list[torch.Tensor],
) -> torch.Tensor:
    """mip-NeRF 360 proposal loss: each proposal histogram must upper-bound the final weights.

    Edges in spacing units (R, S+1). The final histogram is detached, so this loss trains only the
    proposal fields (and never changes the radiance field).
    """
    c, w = final_edges.detach(), final_weights.detach()
    loss = final_weights.new_zeros(())
    for cp, wp in zip(proposal_edges, proposal_weights, strict=True):
        w_outer = _outer_measure(c, cp.detach(), wp)
        loss = loss + ((w - w_outer).clamp_min(0.0) ** 2 / (w + _EPS)).sum(dim=-1).mean()
    return loss


def distortion_loss(edges: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mip-NeRF 360 distortion loss on the final bins (edges in spacing units, (R, S+1)); mean over rays.

    sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (s_{i+1} - s_i), computed in O(S) with prefix sums
    (midpoints are sorted, so |m_i - m_j| splits into the samples before and after i).
    """
    mid = (edges[:, 1:] + edges[:, :-1]) / 2
    width = edges[:, 1:] - edges[:, :-1]
    w_before = torch.cumsum(weights, dim=-1) - weights
    wm_before = torch.cumsum(weights * mid, dim=-1) - weights * mid
    inter = 2.0 * (weights * (mid * w_before - wm_before)).sum(dim=-1)
    intra = (weights**2 * width).sum(dim=-1) / 3.0
    return (inter + intra).mean()


def depth_loss(
    depth_pred: torch.Tensor,
    weights: torch.Tensor,
    t_edges: torch.Tensor,
    depth_target: torch.Tensor,
    margin_frac: float = 0.05,
    margin_min_m: float = 0.05,
) -> torch.Tensor:
    """Depth supervision from measured distance along the ray (R,) metres; NaN / <= 0 = unknown.

    Two terms over the rays with valid depth:
      * L1 between the expected (rendered) depth and the measurement, relative to the measured
        depth (sensor noise grows with range);
      * an empty-space term in the spirit of URF's line-of-sight loss: the total weight in bins
        that end before (measurement - margin) must be zero. The expected-depth term alone can be
        satisfied by a spread of mass in front of and behind the surface (floaters); this term
        removes mass in front of it, which is what makes depth help geometry early.
    Returns 0 when no ray has valid depth. No host sync: invalid rays are masked, not dropped.
    """
    valid = torch.isfinite(depth_target) & (depth_target > 0)
    d = torch.where(valid, depth_target, 1.0).to(depth_pred)  # any finite value where unknown
    l1 = _masked_mean((depth_pred - d).abs() / d, valid)
    margin = torch.clamp(d * margin_frac, min=margin_min_m)
    in_front = t_edges[:, 1:] < (d - margin)[:, None]
    empty = _masked_mean((weights * in_front).sum(dim=-1), valid)
    return l1 + empty


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (R,) over the rows where ``valid`` (R,) bool, 0 when there are none.

    The same value as ``values[valid].mean()`` (bit for bit when all or no rows are valid), without the
    boolean indexing that makes the host wait for the device (the size of its result) on every step. The
    rows left out get a zero gradient (callers keep their values finite)."""
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp_min(1)


def clip_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss (delta 1.25), summed over the embedding, mean over rays with a finite target.

    This is the released LERF code's form rather than the paper's cosine form. For unit vectors
    every component difference is at most 2 and in practice far below 1.25, so it equals
    0.5 * |a - b|^2 = 1 - cos(a, b): the same objective as the paper's, but with a gradient that
    stays bounded on outlier components of noisy crop targets. We keep the released form so our
    loss weights match LERF's tuned ones.
    """
    valid = torch.isfinite(target).all(dim=-1)
    target = torch.where(valid[:, None], target, 0.0).to(pred)
    per = F.huber_loss(pred, target, delta=1.25, reduction="none")
    return _masked_mean(per.sum(dim=-1), valid)


def dino_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over DINO channels, mean over rays with a finite target (as LERF)."""
    valid = torch.isfinite(target).all(dim=-1)
    target = torch.where(valid[:, None], target, 0.0).to(pred)
    return _masked_mean(((pred - target) ** 2).sum(dim=-1), valid)
