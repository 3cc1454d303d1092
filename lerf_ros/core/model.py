"""LERFModel: radiance field + proposal sampler + language field, rendering, losses, point queries.

Frames: rays and points in the world frame, metres. LERF's key rule is enforced here: the language
(CLIP, DINO) branch sees DETACHED sample positions and rendering weights, so its losses can never
change density or the proposal fields (``test_model.py`` checks the gradients are exactly zero).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field

import torch
from torch import nn

from .fields.hash_encoding import HashEncodingConfig
from .fields.language_field import LanguageField, LanguageFieldConfig
from .fields.mlp import MLPConfig
from .fields.radiance_field import DensityFieldConfig, RadianceField, RadianceFieldConfig
from .fields.scene_box import SceneBox
from .training import losses as L
from .training.renderer import (
    render_accumulation,
    render_depth,
    render_embedding,
    render_rgb,
    render_weights,
)
from .training.sampler import ProposalSampler, SamplerConfig

_POINT_CHUNK = 65536


@dataclass(frozen=True)
class LossWeights:
    rgb: float = 1.0
    depth: float = 0.1
    interlevel: float = 1.0
    distortion: float = 0.002
    clip: float = 0.1  # LERF's clip_loss_weight
    dino: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    """near_m: rays start here; max_depth_m: far end of every ray when the scene box contracts
    (otherwise the box exit, capped by max_depth_m). language_samples_per_ray: the CLIP / DINO heads
    are evaluated only at this many highest-weight samples per ray (0 = all; LERF: 24 of its 48), their
    weights rescaled to the ray's total; the weights are detached anyway, and with an opaque surface a
    handful of samples carry almost all the mass. The language grids and heads then cost K / S of a full
    pass, and only those K samples get a gradient from the language losses."""

    radiance: RadianceFieldConfig = field(default_factory=RadianceFieldConfig)
    language: LanguageFieldConfig = field(default_factory=LanguageFieldConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    near_m: float = 0.05
    max_depth_m: float = 20.0
    language_samples_per_ray: int = 24

    def validate(self) -> ModelConfig:
        if not 0 < self.near_m < self.max_depth_m:
            raise ValueError(f"need 0 < near_m < max_depth_m, got {self.near_m}, {self.max_depth_m}")
        if len(self.background_rgb) != 3 or not all(0.0 <= c <= 1.0 for c in self.background_rgb):
            raise ValueError(f"background_rgb must be 3 values in [0, 1], got {self.background_rgb}")
        if self.language_samples_per_ray < 0:
            raise ValueError(f"language_samples_per_ray must be >= 0, got {self.language_samples_per_ray}")
        self.sampler.validate()
        self.language.validate()
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serialisable) for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of ``to_dict``; ValueError naming the first unknown or malformed key."""
        return _from_dict(cls, d, "model").validate()


def _from_dict(cls, value, path: str):
    """Rebuild a (nested) frozen config dataclass from ``dataclasses.asdict`` output."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a mapping for {cls.__name__}, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for name, v in value.items():
        tp = hints[name]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, v, f"{path}.{name}")
        elif origin is tuple and args and dataclasses.is_dataclass(args[0]):
            kwargs[name] = tuple(_from_dict(args[0], x, f"{path}.{name}[{i}]") for i, x in enumerate(v))
        elif origin is tuple:
            kwargs[name] = tuple(v)
        else:
            kwargs[name] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def tiny_config(implementation: str = "auto") -> ModelConfig:
    """Small CPU configuration (~0.9 M parameters with a 512-d CLIP head, mostly hash tables).

    Measured on the shared 2-core dev machine (load ~7, one torch thread): 256 rays/step 19 steps/s
    (clip_dim 8), 512 rays with clip_dim 512 + dino_dim 64 ~8 steps/s; on the synthetic room
    (96x72, 40 orbit keyframes, depth) held-out PSNR 27.6 dB after 250 steps, 30.7 dB after 1000.
    """

    def grid(levels, log2, base, top):
        return HashEncodingConfig(levels, 2, log2, base, top, implementation)

    def mlp(layers, width, act="none"):
        return MLPConfig(layers, width, act, implementation)

    prop = DensityFieldConfig(grid(4, 14, 16, 64), mlp(1, 16))
    return ModelConfig(
        radiance=RadianceFieldConfig(grid(8, 15, 16, 256), 15, mlp(1, 32), mlp(1, 32, "sigmoid"), 3),
        language=LanguageFieldConfig((grid(6, 15, 16, 128),), mlp(1, 64), mlp(1, 32)),
        sampler=SamplerConfig((48,), 24, (prop,)),
        language_samples_per_ray=6,
    )


class LanguagePointQueries:
    """The language field's point queries, for any object with ``language`` (a `LanguageField`) and
    ``clip_dim``: `LERFModel` and `LanguageSnapshot` (a copy that queries read outside the engine lock)."""

    language: LanguageField
    clip_dim: int

    @torch.no_grad()
    def clip_at_points(self, points: torch.Tensor, scale_m: float | torch.Tensor) -> torch.Tensor:
        """points (N, 3) world metres; scale_m scalar or (N,) metres -> (N, clip_dim) unit."""
        points = points.float()
        scale = torch.as_tensor(scale_m, dtype=torch.float32, device=points.device).reshape(-1)
        scale = scale.expand(points.shape[0]) if scale.numel() == 1 else scale
        if scale.shape[0] != points.shape[0]:
            raise ValueError(f"scale_m must be a scalar or ({points.shape[0]},), got {tuple(scale.shape)}")
        out = []
        for i in range(0, points.shape[0], _POINT_CHUNK):
            feats = self.language.features(points[i : i + _POINT_CHUNK])
            out.append(self.language.clip(feats, scale[i : i + _POINT_CHUNK]))
        return torch.cat(out) if out else points.new_zeros(0, self.clip_dim)

    @torch.no_grad()
    def language_features(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) world metres -> (N, G) the language hash grids' features (scale-independent)."""
        points = points.float()
        out = [self.language.features(points[i : i + _POINT_CHUNK])
               for i in range(0, points.shape[0], _POINT_CHUNK)]
        return torch.cat(out) if out else points.new_zeros(0, 0)

    @torch.no_grad()
    def clip_multiscale(self, points: torch.Tensor, scales_m: torch.Tensor,
                        features: torch.Tensor | None = None) -> torch.Tensor:
        """points (N, 3) world metres, scales_m (S,) metres -> (S, N, clip_dim) unit.

        The hash-grid features are computed once and reused for every scale (LERF's scale search
        evaluates ~30 scales per query); ``features`` (N, G) from `language_features` skips them.
        """
        points = points.float()
        scales = torch.as_tensor(scales_m, dtype=torch.float32, device=points.device).reshape(-1)
        out = points.new_empty(scales.shape[0], points.shape[0], self.clip_dim)
        for i in range(0, points.shape[0], _POINT_CHUNK):
            feats = (self.language.features(points[i : i + _POINT_CHUNK]) if features is None
                     else features[i : i + _POINT_CHUNK])
            for j, s in enumerate(scales):
                out[j, i : i + _POINT_CHUNK] = self.language.clip(feats, s.expand(feats.shape[0]))
        return out


class LERFModel(LanguagePointQueries, nn.Module):
    """See module docstring. clip_dim / dino_dim: encoder output sizes (dino_dim 0 = no DINO head)."""

    def __init__(self, config: ModelConfig, scene_box: SceneBox, clip_dim: int, dino_dim: int):
        super().__init__()
        self.config = config.validate()
        self.scene_box = scene_box
        self.clip_dim, self.dino_dim = int(clip_dim), int(dino_dim)
        self.sampler = ProposalSampler(config.sampler, scene_box)
        self.radiance = RadianceField(config.radiance, scene_box)
        self.language = LanguageField(config.language, scene_box, self.clip_dim, self.dino_dim)
        self.register_buffer("background", torch.tensor(config.background_rgb, dtype=torch.float32))

    # ------------------------------------------------------------------ rendering

    def _near_split_far(self, origins: torch.Tensor, directions: torch.Tensor):
        cfg = self.config
        t_in, t_out = self.scene_box.ray_intersect(origins, directions)
        if self.scene_box.contract:
            near = torch.full_like(t_in, cfg.near_m)
            far = torch.full_like(t_in, cfg.max_depth_m)
            hit = t_out > torch.maximum(t_in, near)
            split = torch.where(hit, t_out.clamp(max=cfg.max_depth_m), near)
        else:
            near = torch.maximum(t_in, torch.full_like(t_in, cfg.near_m))
            far = torch.minimum(torch.maximum(t_out, near + 1e-3), torch.full_like(t_in, cfg.max_depth_m))
            near = torch.minimum(near, far - 1e-3)
            split = far
        return near, split, far

    def forward(
        self, origins: torch.Tensor, directions: torch.Tensor, clip_scale_factor: torch.Tensor | None = None,
        surface_depth: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list]:
        """Render R rays (world frame, unit directions).

        Returns 'rgb' (R, 3) [0, 1], 'depth' (R,) metres along the ray, 'accumulation' (R,), and when
        ``clip_scale_factor`` (R,) (tile size in pixels / focal length) is given: 'clip' (R, clip_dim)
        unit, 'dino' (R, dino_dim), 'clip_scale_m' (R,) = factor * rendered depth (detached).
        ``surface_depth`` (R,): measured distance along each ray (NaN / beyond max_depth_m = unknown); where
        known, the language heads are read at that surface point (and the scale taken at that distance)
        instead of at the heaviest rendered samples (see `_render_language`).
        Also 'weights' (R, S), 'samples' (final RaySamples), 'proposal_samples', 'proposal_weights'.
        """
        if origins.ndim != 2 or origins.shape[1] != 3 or directions.shape != origins.shape:
            raise ValueError(
                f"origins and directions must both be (R, 3), "
                f"got {tuple(origins.shape)}, {tuple(directions.shape)}"
            )
        origins, directions = origins.float(), directions.float()
        near, split, far = self._near_split_far(origins, directions)
        samples, prop_samples, prop_weights = self.sampler(origins, directions, near, split, far)
        r, s = samples.t_mid.shape
        positions = samples.positions()
        dirs = directions[:, None, :].expand(r, s, 3).reshape(-1, 3)
        sigma, rgb = self.radiance(positions.reshape(-1, 3), dirs)
        weights = render_weights(sigma.view(r, s), samples.deltas)
        depth = render_depth(weights, samples.t_mid)
        out: dict[str, torch.Tensor | list] = {
            "rgb": render_rgb(weights, rgb.view(r, s, 3), self.background),
            "depth": depth,
            "accumulation": render_accumulation(weights),
            "weights": weights,
            "samples": samples,
            "proposal_samples": prop_samples,
            "proposal_weights": prop_weights,
        }
        if clip_scale_factor is not None:
            at, surface, known = depth.detach(), None, None
            if surface_depth is not None:
                measured = surface_depth.to(depth).reshape(-1)
                known = torch.isfinite(measured) & (measured > 0) & (measured <= self.config.max_depth_m)
                at = torch.where(known, measured, at)
                surface = origins + directions * at[:, None]
            scale_m = clip_scale_factor.to(depth).reshape(-1) * at
            out.update(self._render_language(positions.detach(), weights.detach(), scale_m, surface, known))
        return out

    def _render_language(self, positions: torch.Tensor, weights: torch.Tensor, scale_m: torch.Tensor,
                         surface: torch.Tensor | None = None, known: torch.Tensor | None = None):
        """positions (R, S, 3) and weights (R, S), both detached; scale_m (R,).

        surface (R, 3) / known (R,) bool: rays with a measured surface point read the language heads there
        alone (weight 1). LERF reads them at the rendered samples; where depth is measured that is the same
        place once the density has converged, but a 9 cm cup seen by a few dozen rays may not have formed in
        the density yet, and its language targets would then train the wall behind it."""
        r, s = weights.shape
        k = self.config.language_samples_per_ray
        if 0 < k < s:
            total = weights.sum(dim=-1, keepdim=True)
            top_w, idx = weights.topk(k, dim=-1)
            positions = positions.gather(1, idx[..., None].expand(r, k, 3))
            # Keep each ray's total mass so the DINO sum is not biased low by the dropped tail.
            weights = top_w * (total / top_w.sum(dim=-1, keepdim=True).clamp_min(1e-10))
            s = k
        if surface is not None and known is not None:  # a no-op where none is known (no host sync)
            at_surface = surface.detach()[:, None, :].expand(r, s, 3)
            positions = torch.where(known[:, None, None], at_surface, positions)
            weights = torch.where(known[:, None], torch.full_like(weights, 1.0 / s), weights)
        feats = self.language.features(positions.reshape(-1, 3))
        residual = self.language.clip_residual(feats, scale_m[:, None].expand(r, s).reshape(-1))
        residual = render_embedding(weights, residual.view(r, s, -1), normalize=False)
        dino = self.language.dino(feats)
        return {
            "clip": self.language.unstandardise(residual),
            "clip_residual": residual,
            "dino": render_embedding(weights, dino.view(r, s, -1), normalize=False),
            "clip_scale_m": scale_m,
        }

    # ------------------------------------------------------------------ losses

    def compute_losses(self, outputs: dict, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted loss terms (sum them for the total; no 'total' key).

        batch: 'rgb' (R, 3) float [0, 1]; optional 'depth' (R,) metres along the ray (NaN or beyond
        ``max_depth_m`` = unknown);
        optional 'clip' (R, clip_dim) unit target; optional 'dino' (R, dino_dim). CLIP / DINO terms
        appear only when both the batch target and the rendered output exist.
        """
        w = self.config.loss_weights
        samples = outputs["samples"]
        out = {"rgb": w.rgb * L.rgb_loss(outputs["rgb"], batch["rgb"])}
        if w.interlevel:
            out["interlevel"] = w.interlevel * L.interlevel_loss(
                samples.s_edges, outputs["weights"],
                [p.s_edges for p in outputs["proposal_samples"]], outputs["proposal_weights"],
            )
        if w.distortion:
            out["distortion"] = w.distortion * L.distortion_loss(samples.s_edges, outputs["weights"])
        if "depth" in batch and w.depth:
            # Beyond the rays' far end a measurement cannot be rendered (sensors report far garbage, e.g.
            # 65.535 m for a saturated 16UC1): unknown, like NaN.
            depth = batch["depth"].reshape(-1)
            depth = torch.where(depth <= self.config.max_depth_m, depth, torch.full_like(depth, float("nan")))
            out["depth"] = w.depth * L.depth_loss(outputs["depth"], outputs["weights"], samples.t_edges,
                                                  depth)
        if "clip" in batch and "clip" in outputs:
            if self.language.standardised:  # in the standardised space (see LanguageField)
                out["clip"] = w.clip * L.clip_loss(outputs["clip_residual"],
                                                   self.language.standardise(batch["clip"]))
            else:  # LERF: the rendered unit embedding against the unit target
                out["clip"] = w.clip * L.clip_loss(outputs["clip"], batch["clip"])
        if "dino" in batch and "dino" in outputs and self.dino_dim > 0:
            out["dino"] = w.dino * L.dino_loss(outputs["dino"], batch["dino"])
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'proposal' (proposal density fields), 'radiance' (density + colour), 'language' (CLIP + DINO)."""
        return {
            "proposal": list(self.sampler.parameters()),
            "radiance": list(self.radiance.parameters()),
            "language": list(self.language.parameters()),
        }

    # ------------------------------------------------------------------ point queries
    # clip_at_points, language_features, clip_multiscale: `LanguagePointQueries`

    @torch.no_grad()
    def density_at_points(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) world metres -> (N,) density per metre."""
        points = points.float()
        chunks = range(0, points.shape[0], _POINT_CHUNK)
        out = [self.radiance.density(points[i : i + _POINT_CHUNK])[0] for i in chunks]
        return torch.cat(out) if out else points.new_zeros(0)

    @torch.no_grad()
    def rgb_at_points(self, points: torch.Tensor, view_dirs: torch.Tensor | None = None) -> torch.Tensor:
        """points (N, 3) world -> (N, 3) rgb in [0, 1]; view_dirs (N, 3) unit, or None to average the
        six axis directions (a view-independent colour for point clouds)."""
        points = points.float()
        if view_dirs is None:
            axes = torch.cat([torch.eye(3), -torch.eye(3)]).to(points)
            return torch.stack([self.rgb_at_points(points, a.expand_as(points)) for a in axes]).mean(0)
        out = []
        for i in range(0, points.shape[0], _POINT_CHUNK):
            _, geo = self.radiance.density(points[i : i + _POINT_CHUNK])
            out.append(self.radiance.rgb(geo, view_dirs[i : i + _POINT_CHUNK].float()))
        return torch.cat(out) if out else points.new_zeros(0, 3)


def geometry_snapshot(model: LERFModel) -> LERFModel | None:
    """A frozen copy (eval mode, no gradients) of ``model`` for rendering rgb and depth outside the engine
    lock while training changes the model: the radiance field, proposal sampler and buffers are copied; the
    language field is left out (an empty module in its place: ``forward`` without ``clip_scale_factor``
    never reads it). None when a module cannot be copied (tinycudann's native objects)."""
    try:
        snap = copy.deepcopy(model, memo={id(model.language): nn.Module()})
    except Exception:  # a backend whose modules do not copy
        return None
    return snap.eval().requires_grad_(False)


class LanguageSnapshot(LanguagePointQueries):
    """A frozen copy of a model's language field (``copy.deepcopy``, eval mode) with the model's point
    queries: the engine answers queries from it outside its lock while training goes on changing the
    model. ``of`` returns None when the field cannot be copied (tinycudann's native modules cannot): the
    engine then answers from the model itself, under the lock."""

    def __init__(self, language: LanguageField, clip_dim: int):
        self.language, self.clip_dim = language, int(clip_dim)

    @classmethod
    def of(cls, model: LERFModel) -> LanguageSnapshot | None:
        try:
            language = copy.deepcopy(model.language)
        except Exception:  # a backend whose modules do not copy (tinycudann's native objects)
            return None
        return cls(language.eval().requires_grad_(False), model.clip_dim)
