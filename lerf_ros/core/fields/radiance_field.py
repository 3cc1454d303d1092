"""Radiance field (hash grid + MLPs -> density, rgb) and the small proposal density fields.

Positions come in as world points (N, 3) metres; the scene box normalises and contracts them to
[0, 1]^3 before the hash grid. Densities are per metre of WORLD distance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .hash_encoding import HashEncoding, HashEncodingConfig
from .mlp import MLP, MLPConfig
from .scene_box import SceneBox

#: Largest exponent the density activation evaluates: exp(80) ~ 5.5e34 per metre is finite in float32
#: (exp(88.8) is not) and is opaque over any sample interval anyway.
_EXP_MAX = 80.0


class _TruncExp(torch.autograd.Function):
    """exp with the gradient clamped at exp(15): keeps early training from exploding (instant-ngp).

    The value is capped at exp(_EXP_MAX) so a density is never inf (inf * a zero-length interval is
    NaN); the gradient ignores that cap, so an overgrown density is still pulled back.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=_EXP_MAX))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x.float())


def sh_encoding(dirs: torch.Tensor, degree: int = 4) -> torch.Tensor:
    """Real spherical harmonics of unit directions (N, 3) -> (N, degree**2), degree in 1..4."""
    if not 1 <= degree <= 4:
        raise ValueError(f"spherical-harmonics degree must be in 1..4, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * x * z,
            0.54627421529603959 * (xx - yy),
        ]
    if degree > 3:
        out += [
            0.59004358992664352 * y * (-3.0 * xx + yy),
            2.8906114426405538 * x * y * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz),
            0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (-xx + 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def _inside(x01: torch.Tensor) -> torch.Tensor:
    """(N,) bool: normalised position inside [0, 1]^3 (outside = empty space)."""
    return ((x01 >= 0.0) & (x01 <= 1.0)).all(dim=-1)


@dataclass(frozen=True)
class RadianceFieldConfig:
    grid: HashEncodingConfig = field(default_factory=lambda: HashEncodingConfig(16, 2, 19, 16, 2048))
    geo_feat_dim: int = 15
    density_mlp: MLPConfig = field(default_factory=lambda: MLPConfig(1, 64))
    color_mlp: MLPConfig = field(default_factory=lambda: MLPConfig(2, 64, "sigmoid"))
    sh_degree: int = 4
    density_bias: float = -1.0  # added before trunc_exp: start nearly transparent


class RadianceField(nn.Module):
    """density(points (N,3) world) -> (N,) per metre, plus geometry features; rgb from features + dirs."""

    def __init__(self, config: RadianceFieldConfig, scene_box: SceneBox):
        super().__init__()
        self.config, self.scene_box = config, scene_box
        self.grid = HashEncoding(config.grid)
        self.density_mlp = MLP(self.grid.output_dim, 1 + config.geo_feat_dim, config.density_mlp)
        self.color_mlp = MLP(config.sh_degree**2 + config.geo_feat_dim, 3, config.color_mlp)

    def density(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (N, 3) world -> density (N,) >= 0 per metre, geometry features (N, geo_feat_dim)."""
        x = self.scene_box.normalize(points)
        h = self.density_mlp(self.grid(x))
        sigma = trunc_exp(h[:, 0] + self.config.density_bias) * _inside(x)
        return sigma, h[:, 1:]

    def rgb(self, geo_feat: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """geometry features (N, G) + unit view directions (N, 3) world -> rgb (N, 3) in [0, 1]."""
        d = sh_encoding(directions, self.config.sh_degree)
        out = self.color_mlp(torch.cat([d, geo_feat], dim=-1))
        if self.color_mlp.config.out_activation != "sigmoid":
            out = torch.sigmoid(out)
        return out

    def forward(self, points: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, geo = self.density(points)
        return sigma, self.rgb(geo, directions)


@dataclass(frozen=True)
class DensityFieldConfig:
    """A proposal network: small hash grid + tiny MLP -> density only."""

    grid: HashEncodingConfig = field(default_factory=lambda: HashEncodingConfig(5, 2, 17, 16, 256))
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(1, 16))
    density_bias: float = -1.0


class DensityField(nn.Module):
    def __init__(self, config: DensityFieldConfig, scene_box: SceneBox):
        super().__init__()
        self.config, self.scene_box = config, scene_box
        self.grid = HashEncoding(config.grid)
        self.mlp = MLP(self.grid.output_dim, 1, config.mlp)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) world -> density (N,) >= 0 per metre."""
        x = self.scene_box.normalize(points)
        return trunc_exp(self.mlp(self.grid(x))[:, 0] + self.config.density_bias) * _inside(x)
