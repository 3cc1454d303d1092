"""Proposal-network sampling along rays (mip-NeRF 360 / nerfstudio style).

Samples live in a normalised "spacing" coordinate s in [0, 1] per ray, mapped to metric distance t:
linear in t up to ``t_split`` (where the ray leaves the scene box) and linear in disparity beyond it,
so the contracted outside gets few, geometrically spaced samples. The initial samples are uniform in
s; each proposal density field then renders weights whose (padded) histogram is resampled by
inverse-CDF into the next, smaller set of bins; the last set is what the radiance field renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..fields.radiance_field import DensityField, DensityFieldConfig
from ..fields.scene_box import SceneBox
from .renderer import render_weights


@dataclass(frozen=True)
class SamplerConfig:
    """proposal_samples[i]: bins rendered by proposal field i (the first count is the initial uniform
    sampling); nerf_samples: bins for the radiance field. One DensityFieldConfig per proposal stage."""

    proposal_samples: tuple[int, ...] = (256, 96)
    nerf_samples: int = 48
    proposal_fields: tuple[DensityFieldConfig, ...] = field(
        default_factory=lambda: (DensityFieldConfig(), DensityFieldConfig())
    )
    histogram_padding: float = 0.01
    stratified: bool = True  # jitter samples while training

    def validate(self) -> SamplerConfig:
        if len(self.proposal_samples) != len(self.proposal_fields) or not self.proposal_samples:
            raise ValueError(
                f"need one proposal field per proposal stage (>= 1), got {len(self.proposal_samples)} "
                f"sample counts and {len(self.proposal_fields)} fields"
            )
        if min(self.proposal_samples) < 2 or self.nerf_samples < 2:
            raise ValueError(f"sample counts must be >= 2, got {self.proposal_samples}, {self.nerf_samples}")
        return self


@dataclass
class RaySamples:
    """Bins along R rays: edges (R, S+1) in metres (t) and in spacing units (s, in [0, 1])."""

    origins: torch.Tensor  # (R, 3) world
    directions: torch.Tensor  # (R, 3) unit, world
    t_edges: torch.Tensor  # (R, S+1) metres
    s_edges: torch.Tensor  # (R, S+1) spacing units

    @property
    def t_mid(self) -> torch.Tensor:
        return (self.t_edges[:, 1:] + self.t_edges[:, :-1]) / 2

    @property
    def deltas(self) -> torch.Tensor:
        return self.t_edges[:, 1:] - self.t_edges[:, :-1]

    def positions(self) -> torch.Tensor:
        """(R, S, 3) world points at bin midpoints."""
        return self.origins[:, None, :] + self.directions[:, None, :] * self.t_mid[..., None]


class Spacing:
    """Per-ray map between metric distance t and spacing s in [0, 1] (module docstring).

    near, t_split, far: (R,) metres with near < far; t_split is clamped into [near, far].
    """

    def __init__(self, near: torch.Tensor, t_split: torch.Tensor, far: torch.Tensor):
        self.split = torch.minimum(torch.maximum(t_split, near), far).clamp_min(1e-6)
        self.g_near, self.g_far = self._g(near), self._g(far)

    def _g(self, t: torch.Tensor) -> torch.Tensor:
        x = t / self.split[..., None] if t.ndim == 2 else t / self.split
        return torch.where(x < 1.0, x, 2.0 - 1.0 / x.clamp_min(1e-6))

    def t_to_s(self, t: torch.Tensor) -> torch.Tensor:
        """(R, K) metres -> (R, K) spacing."""
        return (self._g(t) - self.g_near[:, None]) / (self.g_far - self.g_near).clamp_min(1e-9)[:, None]

    def s_to_t(self, s: torch.Tensor) -> torch.Tensor:
        """(R, K) spacing -> (R, K) metres."""
        y = self.g_near[:, None] + s * (self.g_far - self.g_near)[:, None]
        x = torch.where(y < 1.0, y, 1.0 / (2.0 - y).clamp_min(1e-6))
        return x * self.split[:, None]


def sample_pdf(
    s_edges: torch.Tensor, weights: torch.Tensor, num_samples: int, stratified: bool, padding: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inverse-CDF resampling of a piecewise-constant density over bins.

    s_edges (R, S+1) sorted; weights (R, S) >= 0. Returns new sorted edges (R, num_samples+1),
    detached. ``stratified``: one jitter per ray (training), else bin centres (deterministic).
    """
    w = weights.detach() + padding
    pdf = w / w.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1).clamp(max=1.0)], dim=-1)
    n = num_samples + 1
    u = torch.linspace(0.0, 1.0 - 1.0 / n, n, device=w.device, dtype=w.dtype).expand(w.shape[0], n)
    if stratified:
        u = u + torch.rand(w.shape[0], 1, device=w.device, dtype=w.dtype, generator=generator) / n
    else:
        u = u + 0.5 / n
    u = u.contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    below = (idx - 1).clamp(0, cdf.shape[-1] - 1)
    above = idx.clamp(0, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, below), cdf.gather(-1, above)
    b0, b1 = s_edges.detach().gather(-1, below), s_edges.detach().gather(-1, above)
    frac = torch.nan_to_num((u - c0) / (c1 - c0), 0.0).clamp(0.0, 1.0)
    return b0 + frac * (b1 - b0)


class ProposalSampler(nn.Module):
    """Initial uniform samples -> proposal fields -> PDF resampling -> final RaySamples."""

    def __init__(self, config: SamplerConfig, scene_box: SceneBox):
        super().__init__()
        self.config = config.validate()
        self.proposal_fields = nn.ModuleList(DensityField(c, scene_box) for c in config.proposal_fields)
        # The training jitter draws from its own generator, so a run is reproducible whatever else in the
        # process uses torch's global one (made on first use, on the rays' device).
        self._generator: torch.Generator | None = None

    def _jitter_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(0)
        return self._generator

    def forward(
        self,
        origins: torch.Tensor,
        directions: torch.Tensor,
        near: torch.Tensor,
        t_split: torch.Tensor,
        far: torch.Tensor,
    ) -> tuple[RaySamples, list[RaySamples], list[torch.Tensor]]:
        """origins, directions (R, 3); near, t_split, far (R,) metres.

        Returns final samples and, per proposal stage, its samples and (R, S_i) weights (with
        gradients into the proposal fields, for the interlevel loss).
        """
        cfg = self.config
        spacing = Spacing(near, t_split, far)
        stratified = cfg.stratified and self.training
        r = origins.shape[0]
        n0 = cfg.proposal_samples[0]
        s = torch.linspace(0.0, 1.0, n0 + 1, device=origins.device, dtype=origins.dtype).expand(r, n0 + 1)
        gen = self._jitter_generator(origins.device) if stratified else None
        if stratified:
            # Jitter interior edges within their bins; the ray's ends stay fixed.
            jitter = (torch.rand(r, n0 + 1, device=origins.device, generator=gen) - 0.5) / n0
            jitter[:, 0] = 0
            jitter[:, -1] = 0
            s = s + jitter
        prop_samples: list[RaySamples] = []
        prop_weights: list[torch.Tensor] = []
        for i, density_field in enumerate(self.proposal_fields):
            if i > 0:
                s = sample_pdf(
                    s, prop_weights[-1], cfg.proposal_samples[i], stratified, cfg.histogram_padding, gen
                )
            rs = RaySamples(origins, directions, spacing.s_to_t(s), s)
            sigma = density_field(rs.positions().reshape(-1, 3)).view(r, -1)
            prop_samples.append(rs)
            prop_weights.append(render_weights(sigma, rs.deltas))
        s = sample_pdf(s, prop_weights[-1], cfg.nerf_samples, stratified, cfg.histogram_padding, gen)
        return RaySamples(origins, directions, spacing.s_to_t(s), s), prop_samples, prop_weights
