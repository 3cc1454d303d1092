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
    clip_mlp: MLPConfig = field(default_factory=lambda: MLPConfig(4, 256))  # LERF: 4 hidden layers of 256
    dino_mlp: MLPConfig = field(default_factory=lambda: MLPConfig(1, 256))
    standardise_clip: bool = True  # see LanguageField; False = LERF's field exactly

    def validate(self) -> LanguageFieldConfig:
        if not self.grids:
            raise ValueError("language field needs at least one hash grid")
        return self


class LanguageField(nn.Module):
    """Per-point CLIP (unit, clip_dim) and DINO (dino_dim) features.

    CLIP standardisation (ours, not LERF's): CLIP image embeddings share a large common component
    (crops of one scene differ by a few degrees), so a field fitted to them directly spends its loss on
    that component and learns the small differences that tell "red" from "orange" slowly. The head
    therefore predicts the STANDARDISED embedding ``(t - clip_mean) / clip_scale`` (set once from the
    first keyframes' crop embeddings, `set_clip_standardisation`), and the embedding is
    ``normalize(clip_mean + clip_scale * head)``. With the defaults (mean 0, scale 1) it is LERF's field.
    """

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
        self.register_buffer("clip_mean", torch.zeros(clip_dim))
        self.register_buffer("clip_scale", torch.ones(()))
        self.standardised = False  # a plain flag: reading the buffers would sync the GPU every step

    def set_clip_standardisation(self, targets: torch.Tensor) -> None:
        """Mean (clip_dim,) and RMS distance to it of target embeddings (N, clip_dim), N >= 2."""
        t = targets.detach().float().reshape(-1, self.clip_dim)
        if t.shape[0] < 2 or not torch.isfinite(t).all():
            raise ValueError(f"need >= 2 finite target embeddings, got {tuple(targets.shape)}")
        mean = t.mean(dim=0)
        scale = (t - mean).norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-4)
        self.clip_mean.copy_(mean)
        self.clip_scale.copy_(scale)
        self.standardised = True

    def standardise(self, targets: torch.Tensor) -> torch.Tensor:
        """Unit target embeddings (N, clip_dim) -> what the head is trained to predict."""
        return (targets - self.clip_mean.to(targets)) / self.clip_scale.to(targets)

    def unstandardise(self, residual: torch.Tensor) -> torch.Tensor:
        """Head output (N, clip_dim) (or a weighted sum of them) -> unit embeddings."""
        return F.normalize(self.clip_mean.to(residual) + self.clip_scale.to(residual) * residual, dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Maps saved before standardisation existed hold no mean / scale: they are LERF's plain field.
        state_dict.setdefault(prefix + "clip_mean", torch.zeros(self.clip_dim))
        state_dict.setdefault(prefix + "clip_scale", torch.ones(()))
        self.standardised = bool(state_dict[prefix + "clip_mean"].abs().sum() > 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) world -> concatenated grid features (N, sum L*F)."""
        x = self.scene_box.normalize(points)
        return torch.cat([g(x) for g in self.grids], dim=-1)

    def clip_residual(self, feats: torch.Tensor, scale_m: torch.Tensor) -> torch.Tensor:
        """grid features (N, G) + scale (N,) metres -> (N, clip_dim) standardised embeddings (the head)."""
        return self.clip_head(torch.cat([feats, scale_m.reshape(-1, 1).to(feats)], dim=-1))

    def clip(self, feats: torch.Tensor, scale_m: torch.Tensor) -> torch.Tensor:
        """grid features (N, G) + scale (N,) metres -> (N, clip_dim) unit vectors."""
        return self.unstandardise(self.clip_residual(feats, scale_m))

    def dino(self, feats: torch.Tensor) -> torch.Tensor:
        """grid features (N, G) -> (N, dino_dim)."""
        if self.dino_head is None:
            return feats.new_zeros(feats.shape[0], 0)
        return self.dino_head(feats)
