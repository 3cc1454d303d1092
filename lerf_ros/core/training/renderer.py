"""Volume rendering: compositing weights and the quantities rendered from them.

Plain functions on (R, S) tensors (R rays, S samples per ray, samples ordered near to far), in the
style of nerfacc: the field is evaluated elsewhere, this module only composites.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Optical depth per sample is capped here (see ``render_weights``).
_TAU_MAX = 1e3


def render_weights(densities: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Alpha-compositing weights.

    densities: (R, S) >= 0, per metre; deltas: (R, S) sample interval lengths in metres.
    Returns weights (R, S): w_i = T_i * (1 - exp(-sigma_i delta_i)),
    T_i = exp(-sum_{j<i} sigma_j delta_j) (transmittance reaching sample i).
    """
    if densities.shape != deltas.shape or densities.ndim != 2:
        raise ValueError(
            f"densities and deltas must both be (R, S), "
            f"got {tuple(densities.shape)} and {tuple(deltas.shape)}"
        )
    # Beyond tau ~ 104 float32 exp(-tau) is exactly 0, so the cap changes no value and no gradient; it
    # only keeps an overflowing density (inf, or a sum of huge ones) from turning into inf - inf = NaN.
    tau = (densities * deltas).clamp(max=_TAU_MAX)
    alphas = -torch.expm1(-tau)
    # EXCLUSIVE cumulative sum of the samples before i. Not ``cumsum(tau) - tau``: when sample i is far
    # more opaque than everything before it (an opaque surface, tau_i ~ 1e9 after a sum ~ 3), float32
    # rounds (sum + tau_i) - tau_i to 0, transmittance comes out 1, the weights of a ray sum to 2 or
    # more, and since that forward value no longer responds to the earlier densities their gradient
    # pushes them up without bound until exp overflows (the training divergence this fixes).
    optical_depth = torch.cat([torch.zeros_like(tau[:, :1]), torch.cumsum(tau[:, :-1], dim=-1)], dim=-1)
    return alphas * torch.exp(-optical_depth)


def render_accumulation(weights: torch.Tensor) -> torch.Tensor:
    """(R, S) -> (R,) opacity of each ray in [0, 1]."""
    return weights.sum(dim=-1)


def render_rgb(
    weights: torch.Tensor, rgb: torch.Tensor, background: torch.Tensor | None = None
) -> torch.Tensor:
    """Composite colour.

    weights (R, S); rgb (R, S, 3) in [0, 1]; background (3,) or (R, 3) in [0, 1] fills the
    remaining transmittance (None: black). Returns (R, 3).
    """
    out = (weights[..., None] * rgb).sum(dim=-2)
    if background is not None:
        out = out + (1.0 - weights.sum(dim=-1, keepdim=True)) * background.to(out)
    return out


def render_depth(weights: torch.Tensor, t_mid: torch.Tensor) -> torch.Tensor:
    """Expected depth (R,) in metres along the ray: sum(w t) / sum(w).

    Normalised by the accumulation so a half-transparent ray still reports where its mass is;
    clamped to the sampled interval [t_mid[:, 0], t_mid[:, -1]]. A ray with no mass reports the far end.
    """
    acc = weights.sum(dim=-1)
    depth = (weights * t_mid).sum(dim=-1) / acc.clamp_min(1e-10)
    depth = torch.where(acc > 1e-10, depth, t_mid[:, -1])
    return torch.minimum(torch.maximum(depth, t_mid[:, 0]), t_mid[:, -1])


def render_embedding(weights: torch.Tensor, embeddings: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Weighted sum of per-sample embeddings (R, S, D) -> (R, D).

    ``normalize`` renormalises to unit norm (CLIP); DINO features are left as summed.
    """
    out = (weights[..., None] * embeddings).sum(dim=-2)
    return F.normalize(out, dim=-1) if normalize else out
