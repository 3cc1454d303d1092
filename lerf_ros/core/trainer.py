"""One optimisation step over keyframe rays; optimisers and schedules per parameter group.

`KeyframeTensors` holds the training keyframes on the device (padded to a common size so that a batch
of rays over many keyframes is one gather). `sample_ray_batch` draws random pixels uniformly over the
keyframes whose language targets are ready and builds the batch the model's ``compute_losses`` takes.
`Trainer` owns one Adam optimiser + one learning-rate schedule per parameter group of the model
(``model.param_groups()``), optional gradient clipping and, on CUDA only, autocast + GradScaler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation settings.

    rays_per_step:        rays per training step.
    lr:                   Adam learning rate of any group not named in ``lr_by_group``.
    lr_by_group:          ((group name, lr), ...) overrides, names as in ``model.param_groups()``.
    warmup_steps:         linear warm-up from 1 % of the lr over this many steps (0 = none).
    lr_decay_steps:       exponential decay from lr to ``lr * lr_final_factor`` over this many steps,
                          then flat.
    lr_final_factor:      see ``lr_decay_steps``.
    adam_eps:             Adam epsilon (hash-grid tables want a tiny one: most entries see no gradient).
    max_grad_norm:        clip each group's gradient norm to this; None = no clipping.
    mixed_precision:      autocast + GradScaler on CUDA; ignored on the CPU (fp32 there).
    amp_dtype:            "bf16" or "fp16" (fp16 uses loss scaling, bf16 does not need it).
    clip_loss_start_step: train the CLIP and DINO heads from this step on (geometry first, as LERF's
                          language field is meaningless on a field with no surfaces yet).
    """

    rays_per_step: int = 4096
    lr: float = 1e-2
    lr_by_group: tuple[tuple[str, float], ...] = ()
    warmup_steps: int = 0
    lr_decay_steps: int = 30000
    lr_final_factor: float = 0.01
    adam_eps: float = 1e-15
    max_grad_norm: float | None = None
    mixed_precision: bool = True
    amp_dtype: str = "bf16"
    clip_loss_start_step: int = 0

    def validate(self) -> TrainerConfig:
        if self.rays_per_step < 1:
            raise ValueError(f"rays_per_step must be >= 1, got {self.rays_per_step}")
        for name, lr in (("lr", self.lr), *self.lr_by_group):
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rate of {name!r} must be finite and > 0, got {lr}")
        if self.warmup_steps < 0 or self.lr_decay_steps < 1:
            raise ValueError(
                f"warmup_steps must be >= 0 and lr_decay_steps >= 1, got {self.warmup_steps}, "
                f"{self.lr_decay_steps}"
            )
        if not 0 < self.lr_final_factor <= 1:
            raise ValueError(f"lr_final_factor must be in (0, 1], got {self.lr_final_factor}")
        if self.amp_dtype not in ("bf16", "fp16"):
            raise ValueError(f"amp_dtype must be 'bf16' or 'fp16', got {self.amp_dtype!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        return self

    def group_lr(self, name: str) -> float:
        return dict(self.lr_by_group).get(name, self.lr)


def lr_factor(step: int, config: TrainerConfig) -> float:
    """Multiplier on a group's base lr at ``step``: linear warm-up, then exponential decay, then flat."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return 0.01 + 0.99 * step / config.warmup_steps
    t = min(max(step - config.warmup_steps, 0) / config.lr_decay_steps, 1.0)
    return math.exp(t * math.log(config.lr_final_factor))


@dataclass
class KeyframeTensors:
    """Training keyframes on the device, padded to the largest image (K keyframes).

    kf_ids:      (K,) int64 keyframe ids (the pyramid / dense cache keys)
    images:      (K, H, W, 3) uint8 RGB; only ``[:h_k, :w_k]`` of keyframe k is valid
    depth:       (K, H, W) float32 metric z-depth (optical axis), NaN = unknown
    T_world_cam: (K, 4, 4) float32 camera poses, ROS optical convention, metres
    intrinsics:  (K, 4) float32 fx, fy, cx, cy in pixels (pixel centres at integer coordinates)
    sizes:       (K, 2) int64 (w_k, h_k)
    """

    kf_ids: torch.Tensor
    images: torch.Tensor
    depth: torch.Tensor
    T_world_cam: torch.Tensor
    intrinsics: torch.Tensor
    sizes: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.kf_ids.shape[0])

    @classmethod
    def from_frames(cls, ids: list[int], frames: list, device: torch.device) -> KeyframeTensors:
        """Pack pinhole ``Frame`` s (depth NaN = unknown, or None) into padded device tensors."""
        h = max(f.image.shape[0] for f in frames)
        w = max(f.image.shape[1] for f in frames)
        images = np.zeros((len(frames), h, w, 3), np.uint8)
        depth = np.full((len(frames), h, w), np.nan, np.float32)
        for r, f in enumerate(frames):
            fh, fw = f.image.shape[:2]
            images[r, :fh, :fw] = f.image
            if f.depth_m is not None:
                depth[r, :fh, :fw] = f.depth_m
        intr = [(f.intrinsics.fx, f.intrinsics.fy, f.intrinsics.cx, f.intrinsics.cy) for f in frames]
        return cls(
            kf_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            images=torch.from_numpy(images).to(device),
            depth=torch.from_numpy(depth).to(device),
            T_world_cam=torch.tensor(np.stack([f.T_world_cam for f in frames]), dtype=torch.float32,
                                     device=device),
            intrinsics=torch.tensor(intr, dtype=torch.float32, device=device),
            sizes=torch.tensor([[f.image.shape[1], f.image.shape[0]] for f in frames], dtype=torch.int64,
                               device=device),
        )


def pixel_rays_batched(kf: KeyframeTensors, rows: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """World rays through pixel centres of several keyframes at once.

    rows: (N,) int64 index into ``kf``; u, v: (N,) float pixel coordinates (x right, y down).
    Returns origins (N, 3), unit directions (N, 3) in the world frame, and ``ray_per_z`` (N,): the ray
    distance per metre of z-depth (|d_cam| with d_cam = ((u-cx)/fx, (v-cy)/fy, 1)).
    """
    fx, fy, cx, cy = kf.intrinsics[rows].unbind(-1)
    d_cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], dim=-1)
    ray_per_z = d_cam.norm(dim=-1)
    T = kf.T_world_cam[rows]
    d_world = torch.einsum("nij,nj->ni", T[:, :3, :3], d_cam) / ray_per_z[:, None]
    return T[:, :3, 3], d_world, ray_per_z


def sample_ray_batch(kf: KeyframeTensors, n_rays: int, generator: torch.Generator, pyramid=None,
                     dense=None) -> dict[str, torch.Tensor]:
    """Draw ``n_rays`` random pixels, keyframes uniformly, and their training targets.

    Returns origins (N, 3), directions (N, 3) unit, rgb (N, 3) float in [0, 1], depth (N,) ray distance in
    metres (NaN unknown), kf_ids (N,), uv (N, 2) pixel coordinates, and, when ``pyramid`` is given, clip
    (N, clip_dim) targets at a random tile size per ray with clip_scale_factor (N,) = tile_frac * H / fy
    (the CLIP scale in metres per metre of depth); when ``dense`` is given, dino (N, dino_dim).
    """
    dev = kf.images.device
    rows = torch.randint(0, kf.count, (n_rays,), generator=generator, device=dev)
    size = kf.sizes[rows].to(torch.float32)
    # Integer pixels: the targets are exact pixel values, no interpolation of colours or depth.
    ui = (torch.rand(n_rays, generator=generator, device=dev) * size[:, 0]).long()
    vi = (torch.rand(n_rays, generator=generator, device=dev) * size[:, 1]).long()
    ui = torch.minimum(ui, kf.sizes[rows, 0] - 1)
    vi = torch.minimum(vi, kf.sizes[rows, 1] - 1)
    u, v = ui.to(torch.float32), vi.to(torch.float32)
    origins, directions, ray_per_z = pixel_rays_batched(kf, rows, u, v)
    z = kf.depth[rows, vi, ui]
    batch = {
        "origins": origins,
        "directions": directions,
        "rgb": kf.images[rows, vi, ui].to(torch.float32) / 255.0,
        "depth": z * ray_per_z,
        "kf_ids": kf.kf_ids[rows],
        "uv": torch.stack([u, v], dim=-1),
    }
    if pyramid is not None:
        ids = batch["kf_ids"]
        tile_frac = pyramid.random_tile_frac(n_rays, generator=generator).to(dev)
        batch["clip"] = pyramid.sample(ids, batch["uv"], tile_frac).to(torch.float32)
        fy, h = kf.intrinsics[rows, 1], size[:, 1]
        batch["clip_scale_factor"] = tile_frac * h / fy
    if dense is not None:
        batch["dino"] = dense.sample(batch["kf_ids"], batch["uv"]).to(torch.float32)
    return batch


class Trainer:
    """Optimises ``model`` one batch at a time.

    model:  an ``LERFModel`` (``forward``, ``compute_losses``, ``param_groups``).
    config: `TrainerConfig`.
    device: torch device the model lives on; AMP is used only when it is CUDA.
    """

    def __init__(self, model: torch.nn.Module, config: TrainerConfig, device: torch.device | str):
        self.model = model
        self.config = config.validate()
        self.device = torch.device(device)
        self.step_count = 0
        groups = model.param_groups()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.base_lr: dict[str, float] = {}
        for name, params in groups.items():
            params = [p for p in params if p.requires_grad]
            if not params:
                continue
            lr = config.group_lr(name)
            self.base_lr[name] = lr
            # fused: one kernel per group instead of one per tensor (3x faster on CPU too, torch >= 2.4).
            self.optimizers[name] = torch.optim.Adam(params, lr=lr, eps=config.adam_eps, fused=True)
        if not self.optimizers:
            raise ValueError("model.param_groups() returned no trainable parameters")
        self.use_amp = bool(config.mixed_precision) and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if config.amp_dtype == "bf16" else torch.float16
        # Loss scaling only matters for fp16 (bf16 has fp32's exponent range).
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    @property
    def language_active(self) -> bool:
        """Whether the CLIP / DINO losses are trained at the current step."""
        return self.step_count >= self.config.clip_loss_start_step

    def _set_lr(self) -> None:
        f = lr_factor(self.step_count, self.config)
        for name, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = self.base_lr[name] * f

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One forward / backward / update on ``batch`` (see `sample_ray_batch`); returns float losses.

        Raises RuntimeError on a non-finite total loss without touching the weights.
        """
        self.model.train()
        self._set_lr()
        if not self.language_active:
            batch = {k: v for k, v in batch.items() if k not in ("clip", "dino")}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.model(batch["origins"], batch["directions"],
                                 clip_scale_factor=batch.get("clip_scale_factor"))
            losses = self.model.compute_losses(outputs, batch)
        total = sum(v for v in losses.values())
        if not torch.isfinite(total):
            raise RuntimeError(f"non-finite loss at step {self.step_count}: "
                               f"{ {k: float(v.detach()) for k, v in losses.items()} }")
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        for opt in self.optimizers.values():
            if self.config.max_grad_norm is not None:
                self.scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            self.scaler.step(opt)
        self.scaler.update()
        self.step_count += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        return out

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.optimizers) ^ set(state["optimizers"])
        if missing:
            raise ValueError(f"optimiser groups differ from the checkpoint: {sorted(missing)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        # A disabled scaler (CPU, or bf16) saves {}; an enabled one (CUDA fp16) raises on {} — so a map
        # trained on the CPU could not be resumed on a GPU with fp16. Keep the fresh scale instead.
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step_count"])
