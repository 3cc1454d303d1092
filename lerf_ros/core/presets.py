"""Engine configuration: small frozen dataclasses composed into `EngineConfig`, and the named presets.

| preset    | device | rays / step | use                                                              |
|-----------|--------|-------------|------------------------------------------------------------------|
| "tiny"    | CPU    | few hundred | tests, CI, the CPU demo (tiny grids, demo colour encoders)       |
| "lite"    | GPU    | 2048        | laptops / Jetson-class GPUs (smaller grids, OpenCLIP ViT-B/16)   |
| "default" | GPU    | 4096        | LERF-sized grids, OpenCLIP ViT-B/16 laion2b_s34b_b88k + DINO ViT-S/16 |

`EngineConfig.to_dict` / `EngineConfig.from_dict` round-trip through JSON (the map manifest).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import numpy as np

from .encoders import DEFAULT_CLIP, DEFAULT_DINO, DEMO_CLIP, DEMO_DENSE, EncoderSpec
from .fields.hash_encoding import HashEncodingConfig
from .fields.language_field import LanguageFieldConfig
from .fields.mlp import MLPConfig
from .fields.radiance_field import DensityFieldConfig, RadianceFieldConfig
from .frames.keyframes import KeyframeConfig
from .language.pyramid import PyramidConfig
from .language.query import QueryConfig
from .model import ModelConfig
from .training.sampler import SamplerConfig
from .training.trainer import TrainerConfig

PRESETS = ("tiny", "lite", "default")
#: GPU presets: losses and the non-finite check reach the host every this many steps (and at the end of
#: every ``engine.step`` call), so the CPU queues steps ahead of the GPU instead of waiting for each one.
#: "tiny" reports every step: on the CPU nothing runs ahead of the host, so it costs nothing.
GPU_LOG_EVERY = 25


@dataclass(frozen=True)
class SceneBoxConfig:
    """Region the fields model at full resolution (outside it the model contracts space).

    box_min / box_max: (x, y, z) world frame, metres, both given = fixed box. None = derived once, when
    training starts, from the keyframes present then: the bounds of the camera positions and of what they
    see, grown by ``margin_m``: the measured surface points when depth is given, else the camera frusta cut
    at the ground plane ``ground_z_m`` (world z of the floor, None = no ground plane) or at ``max_range_m``
    (``core/frames/scene_region.py``). A given box must be seen by at least one keyframe. The box is then
    frozen: the hash grids are indexed in box coordinates, so moving it would scramble what was learnt.
    With ``refit`` (a derived box only): when over a quarter of the keyframes later see mostly outside it,
    the fields start over in a box that holds them all (keyframes and features kept; at most 3 times).
    """

    box_min: tuple[float, float, float] | None = None
    box_max: tuple[float, float, float] | None = None
    margin_m: float = 1.0
    max_range_m: float = 5.0
    ground_z_m: float | None = 0.0
    refit: bool = True

    def validate(self) -> SceneBoxConfig:
        if (self.box_min is None) != (self.box_max is None):
            raise ValueError(f"give both box_min and box_max or neither, got {self.box_min}, {self.box_max}")
        if self.box_min is not None:
            lo, hi = tuple(self.box_min), tuple(self.box_max)
            if len(lo) != 3 or len(hi) != 3 or not all(math.isfinite(v) for v in lo + hi):
                raise ValueError(f"box_min / box_max must be 3 finite numbers, got {lo}, {hi}")
            if not all(h > lo_ for lo_, h in zip(lo, hi, strict=True)):
                raise ValueError(f"box_max must exceed box_min on every axis, got {lo}, {hi}")
        if not (math.isfinite(self.margin_m) and self.margin_m >= 0):
            raise ValueError(f"margin_m must be finite and >= 0, got {self.margin_m}")
        if not (math.isfinite(self.max_range_m) and self.max_range_m > 0):
            raise ValueError(f"max_range_m must be finite and > 0, got {self.max_range_m}")
        if self.ground_z_m is not None and not math.isfinite(self.ground_z_m):
            raise ValueError(f"ground_z_m must be finite or None, got {self.ground_z_m}")
        return self


@dataclass(frozen=True)
class IngestConfig:
    """What happens to a frame before keyframe selection, and when training may start.

    max_image_side:             keyframes larger than this (pixels, longer side) are downsized (area
                                filter; intrinsics scaled); 0 = keep the input size.
    min_keyframes:              training starts once this many keyframes have their language targets.
    pyramid_keyframes_per_step: this many keyframes get their CLIP pyramid + dense features per
                                ``engine.step`` call, so training keeps going while frames arrive; while
                                more wait, further ones for as long as the call's training took before
                                (keyframes without features are not trained on).
    """

    max_image_side: int = 640
    min_keyframes: int = 3
    pyramid_keyframes_per_step: int = 1

    def validate(self) -> IngestConfig:
        if self.max_image_side < 0:
            raise ValueError(f"max_image_side must be >= 0, got {self.max_image_side}")
        if self.min_keyframes < 1 or self.pyramid_keyframes_per_step < 1:
            raise ValueError(
                f"min_keyframes and pyramid_keyframes_per_step must be >= 1, got {self.min_keyframes}, "
                f"{self.pyramid_keyframes_per_step}"
            )
        return self


@dataclass(frozen=True)
class CandidateConfig:
    """Candidate surface points for 3D queries, from keyframe depth.

    pixel_stride:  every pixel_stride-th pixel (both axes) of each keyframe is lifted to 3D.
    voxel_m:       points are merged into voxels of this size (metres); a voxel's point is their mean.
    depth_tol_rel: a point counts as seen by a keyframe when it projects inside it and its depth agrees
                   with the keyframe's depth there to within this fraction (occlusion test).
    """

    pixel_stride: int = 4
    voxel_m: float = 0.05
    depth_tol_rel: float = 0.05

    def validate(self) -> CandidateConfig:
        if self.pixel_stride < 1 or not self.voxel_m > 0 or not self.depth_tol_rel > 0:
            raise ValueError(
                f"need pixel_stride >= 1, voxel_m > 0, depth_tol_rel > 0, got {self.pixel_stride}, "
                f"{self.voxel_m}, {self.depth_tol_rel}"
            )
        return self


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LERFEngine` needs, one small config per component."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    clip_encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec(DEFAULT_CLIP))
    dino_encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec(DEFAULT_DINO))
    scene: SceneBoxConfig = field(default_factory=SceneBoxConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)

    def validate(self) -> EngineConfig:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
        return self

    def to_dict(self) -> dict:
        """JSON-compatible nested dict (tuples become lists)."""
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        """Inverse of `to_dict`; unknown or missing keys raise ValueError naming them."""
        return _from_jsonable(cls, data, "config")


def _to_jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _deep_tuple(value):
    return tuple(_deep_tuple(v) for v in value) if isinstance(value, list) else value


def _from_jsonable(tp, value, where: str):
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} for {tp.__name__}")
        kwargs = {k: _from_jsonable(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{where}: cannot build {tp.__name__}: {exc}") from exc
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _from_jsonable(arg, value, where)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) == len(value):
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_from_jsonable(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
        return _deep_tuple(value)
    return value


def _tiny_model() -> ModelConfig:
    """CPU-sized fields: 8 (radiance) + 8 (language) + 4 (proposal) hash levels, 2^14-entry tables (2^16
    for language), 32 proposal + 16 radiance samples per ray, language heads at the 4 heaviest samples.
    The language grid reaches 512 cells across contracted space, i.e. 256 across the scene box: ~4 cm
    cells in a 9 m room (128 gave 15 cm, coarser than the 8-12 cm objects it must name; a table lookup
    costs the same at any resolution). ~29 dB held-out PSNR on the 96 x 72 synthetic room after 500 steps
    of 256 rays (test_engine_e2e.py)."""

    def grid(levels, top, log2_size=14):
        return HashEncodingConfig(levels, 2, log2_size, 16, top)

    prop = DensityFieldConfig(grid(4, 64), MLPConfig(1, 16))
    return ModelConfig(
        radiance=RadianceFieldConfig(grid(8, 256), 15, MLPConfig(1, 32), MLPConfig(1, 32, "sigmoid"), 3),
        language=LanguageFieldConfig((grid(8, 512, 16),), MLPConfig(1, 64), MLPConfig(1, 32)),
        sampler=SamplerConfig((32,), 16, (prop,)),
        language_samples_per_ray=4,
    )


def _lite_model() -> ModelConfig:
    """About a quarter of LERF's grid memory: fits 8 GB GPUs, ~2x faster per ray."""
    return ModelConfig(
        radiance=RadianceFieldConfig(grid=HashEncodingConfig(16, 2, 17, 16, 1024)),
        language=LanguageFieldConfig(grids=(HashEncodingConfig(12, 4, 17, 16, 128),
                                            HashEncodingConfig(12, 4, 17, 128, 512))),
        sampler=SamplerConfig(proposal_samples=(128, 64), nerf_samples=32),
        language_samples_per_ray=12,
    )


def make_preset(name: str) -> EngineConfig:
    """The named preset ("tiny", "lite", "default"); see the module table."""
    if name == "tiny":
        return EngineConfig(
            name="tiny",
            model=_tiny_model(),
            # LERF's smallest tile (5 % of the height) too: 5-10 cm objects are a few pixels at robot range.
            pyramid=PyramidConfig(tile_fracs=(0.05, 0.1, 0.2, 0.35, 0.5), stride_ramp=(0.05, 0.15),
                                  batch_size=256),
            # 96, not 48: a robot driving a 5-7 m room sees a small object in few keyframes, and RGB-only
            # answers are placed where those views agree (bench/RESULTS.md, fifth landing).
            keyframes=KeyframeConfig(max_keyframes=96),
            trainer=TrainerConfig(rays_per_step=256, lr=1e-2, lr_decay_steps=1500, lr_final_factor=0.1,
                                  clip_loss_start_step=0),
            clip_encoder=EncoderSpec(DEMO_CLIP),
            dino_encoder=EncoderSpec(DEMO_DENSE),
            # Larger camera images are downsized: at 1280 x 720 one keyframe would be 100 k candidate points.
            ingest=IngestConfig(max_image_side=320, min_keyframes=3, pyramid_keyframes_per_step=2),
            candidates=CandidateConfig(pixel_stride=3, voxel_m=0.05, depth_tol_rel=0.05),
            # 12 scales instead of LERF's 30 and 5 cm voxels: a query costs ~5x less on the CPU; the
            # cluster radius must exceed the voxel spacing so one object stays one cluster.
            query=QueryConfig(voxel_m=0.0, cluster_radius_m=0.08,
                              scales_m=tuple(float(x) for x in np.geomspace(0.05, 1.0, 12).round(4))),
        ).validate()
    if name == "lite":
        return EngineConfig(
            name="lite",
            model=_lite_model(),
            trainer=TrainerConfig(rays_per_step=2048, lr=1e-2, lr_decay_steps=15000, lr_final_factor=0.1,
                                  log_every=GPU_LOG_EVERY),
            ingest=IngestConfig(max_image_side=480, min_keyframes=3, pyramid_keyframes_per_step=1),
            candidates=CandidateConfig(pixel_stride=6, voxel_m=0.04),
            query=QueryConfig(voxel_m=0.0, cluster_radius_m=0.07),
        ).validate()
    if name == "default":
        # LERF's released settings: 4096 rays, Adam eps 1e-15, lr 1e-2 decaying 10x over 30 k steps, the
        # language heads at the 24 heaviest of 48 samples per ray (`ModelConfig` defaults).
        return EngineConfig(
            name="default",
            trainer=TrainerConfig(rays_per_step=4096, lr=1e-2, lr_decay_steps=30000, lr_final_factor=0.1,
                                  log_every=GPU_LOG_EVERY),
            ingest=IngestConfig(max_image_side=640, min_keyframes=3, pyramid_keyframes_per_step=1),
            candidates=CandidateConfig(pixel_stride=8, voxel_m=0.03),
            query=QueryConfig(voxel_m=0.0),  # candidates are already merged per voxel by the engine
        ).validate()
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
