"""LERF language field: its own hash grids, a scale-conditioned CLIP head and a DINO head.

As in LERF, several hash grids of different resolution ranges are concatenated (coarse grids
share information across large regions, fine ones localise); the CLIP head also takes the
metric language scale (metres) so one field answers at every scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hash_encoding import HashEncoding, HashEncodingConfig
from .mlp import MLP, MLPConfig
from .scene_box import SceneBox


@dataclass(frozen=True)
class LanguageFieldConfig:
    grids: tuple[HashEncodingConfig, ...] = (
        HashEncodingConfig(12, 8, 19, 16, 128),
        HashEncodingConfig(12, 8, 19, 128, 512),
    )
    clip_mlp: MLPConfig = field(default_factory=lambda: MLPConfig(3, 256))
    dino_mlp: MLPConfig = field(default_factory=lambda: MLPConfig(1, 256))

    def validate(self) -> LanguageFieldConfig:
        if not self.grids:
            raise ValueError("language field needs at least one hash grid")
        return self


class LanguageField(nn.Module):
    """Per-point CLIP (unit, clip_dim) and DINO (dino_dim) features."""

    def __init__(self, config: LanguageFieldConfig, scene_box: SceneBox, clip_dim: int, dino_dim: int):
        super().__init__()
        config.validate()
        if clip_dim < 1 or dino_dim < 0:
            raise ValueError(f"clip_dim must be >= 1 and dino_dim >= 0, got {clip_dim}, {dino_dim}")
        self.config, self.scene_box = config, scene_box
        self.clip_dim, self.dino_dim = clip_dim, dino_dim
        self.grids = nn.ModuleList(HashEncoding(g) for g in config.grids)
        feat_dim = sum(g.output_dim for g in self.grids)
        self.clip_head = MLP(feat_dim + 1, clip_dim, config.clip_mlp)
        self.dino_head = MLP(feat_dim, dino_dim, config.dino_mlp) if dino_dim > 0 else None

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) world -> concatenated grid features (N, sum L*F)."""
        x = self.scene_box.normalize(points)
        return torch.cat([g(x) for g in self.grids], dim=-1)

    def clip(self, feats: torch.Tensor, scale_m: torch.Tensor) -> torch.Tensor:
        """grid features (N, G) + scale (N,) metres -> (N, clip_dim) unit vectors."""
        out = self.clip_head(torch.cat([feats, scale_m.reshape(-1, 1).to(feats)], dim=-1))
        return F.normalize(out, dim=-1)

    def dino(self, feats: torch.Tensor) -> torch.Tensor:
        """grid features (N, G) -> (N, dino_dim)."""
        if self.dino_head is None:
            return feats.new_zeros(feats.shape[0], 0)
        return self.dino_head(feats)
