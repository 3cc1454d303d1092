"""One optimisation step over keyframe rays; optimisers and schedules per parameter group.

`KeyframeTensors` holds the training keyframes on the device (padded to a common size so that a batch
of rays over many keyframes is one gather). `sample_ray_batch` draws random pixels over the keyframes
whose language targets are ready (uniformly, plus a salient share: `salience.py`) and builds the batch
the model's ``compute_losses`` takes.
`Trainer` owns one Adam optimiser + one learning-rate schedule per parameter group of the model
(``model.param_groups()``), optional gradient clipping and, on CUDA only, autocast + GradScaler.

Held-out pixels (`holdout.py`, ~5 % of every keyframe) are never drawn for training; the trainer's
`ConvergenceMonitor` (``convergence``) judges on them, when asked (``evaluate``), whether the map is usable.

A step never waits for the device: its losses and the finiteness of its loss and gradients stay there as
one small record, and every ``log_every`` steps (or when the caller asks: `Trainer.flush`) the records
come back to the host together (one sync) and are replayed in order: the reported losses, the convergence
monitor's language-loss EMA, the non-finite count. A step whose loss or gradients are not finite applies
nothing: the fused optimisers skip it on the device (``found_inf``, as for fp16 loss scaling), and the
report raises `NonFiniteStep`; when the steps reported end in two or more such steps in a row (or the
weights themselves are no longer finite) the weights and optimiser state go back to the last snapshot
(taken every ``snapshot_every`` clean steps, at a report), so training goes on from a good state. The
caller decides when ``in_row`` failures mean the run has failed (`TrainerConfig.max_nonfinite_in_row`).
With ``log_every = 1`` this is exactly the per-step check.

A step that runs out of GPU memory (``torch.cuda.OutOfMemoryError``) applies nothing either and raises
`OutOfMemoryStep` once its tensors are freed and CUDA's cache is released (`recovery.py`); the caller picks
a smaller batch (`recovery.halved_rays`, floor ``min_rays_per_step``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .convergence import ConvergenceConfig, ConvergenceMonitor, ConvergenceSignals
from .holdout import training_pixels
from .recovery import NonFiniteStep, OutOfMemoryStep, Snapshot, oom_reason, release_cuda_cache
from .salience import CellTable, SalienceConfig
from .salience import draw as salience_draw


@dataclass(frozen=True)
class GroupSchedule:
    """Optimiser and learning-rate schedule of one parameter group, when it differs from the rest.

    LERF trains its language field with RAdam, lr 1e-2 decaying exponentially to 1e-3 over 4000 steps,
    weight decay 1e-9 (its released config). We keep its schedule and weight decay but default to Adam:
    RAdam's variance rectification holds the first few hundred steps back, and a robot wants a usable map
    in a minute (measured on the demo room, tiny preset, 150 steps: 2 of 6 objects located with RAdam, 6
    of 6 with Adam; README "Language field"). optimizer: "radam" (LERF exactly) or "adam"; lr decays
    from lr to lr_final over decay_steps. The radiance and proposal fields keep the trainer-wide schedule.
    """

    optimizer: str = "adam"
    lr: float = 1e-2
    lr_final: float = 1e-3
    decay_steps: int = 4000
    weight_decay: float = 1e-9

    def validate(self) -> GroupSchedule:
        if self.optimizer not in ("radam", "adam"):
            raise ValueError(f"optimizer must be 'radam' or 'adam', got {self.optimizer!r}")
        if not (0 < self.lr_final <= self.lr and math.isfinite(self.lr)) or self.decay_steps < 1:
            raise ValueError(f"need 0 < lr_final <= lr (finite) and decay_steps >= 1, got {self}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        return self

    def factor(self, step: int) -> float:
        """Multiplier on lr at ``step``: exponential decay to lr_final / lr, then flat."""
        t = min(max(step, 0) / self.decay_steps, 1.0)
        return math.exp(t * math.log(self.lr_final / self.lr))


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation settings.

    rays_per_step:        rays per training step.
    min_rays_per_step:    the floor when running out of GPU memory halves the rays per step
                          (`recovery.halved_rays`; the smaller of this and ``rays_per_step``): 64 rays still
                          give every loss a few samples per keyframe; out of memory at the floor is an error.
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
    snapshot_every:       copy weights + optimiser state every this many clean steps (the state a run of
                          non-finite steps is rolled back to); 0 = never (bad steps are only skipped).
    max_nonfinite_in_row: this many non-finite steps in a row (each skipped, rolled back) and the engine
                          gives up with an error.
    log_every:            the step losses and the non-finite check reach the host every this many steps
                          (`Trainer.flush`); in between no step waits for the device. 1 = every step:
                          exact per-step reports, and free on the CPU, where nothing runs ahead of the
                          host. Steps found non-finite at a report were skipped on the device; the steps
                          after them used a learning rate one step further on than their count. RAdam
                          (not fused) cannot skip on the device: with it every step checks on the host.
    convergence:          when the map counts as usable (`ConvergenceConfig`).
    language:             the language field's own optimiser and schedule (`GroupSchedule`, LERF's);
                          None = Adam with the settings above, like the other groups.
    salience:             share of rays drawn where a keyframe's content stands out (`SalienceConfig`);
                          ``SalienceConfig(frac=0)`` = LERF's uniform rays.
    """

    rays_per_step: int = 4096
    min_rays_per_step: int = 64
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
    snapshot_every: int = 200
    max_nonfinite_in_row: int = 20
    log_every: int = 1
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    language: GroupSchedule | None = field(default_factory=GroupSchedule)
    salience: SalienceConfig = field(default_factory=SalienceConfig)

    def validate(self) -> TrainerConfig:
        if self.rays_per_step < 1:
            raise ValueError(f"rays_per_step must be >= 1, got {self.rays_per_step}")
        if self.min_rays_per_step < 1:
            raise ValueError(f"min_rays_per_step must be >= 1, got {self.min_rays_per_step}")
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
        if self.snapshot_every < 0 or self.max_nonfinite_in_row < 1:
            raise ValueError(f"need snapshot_every >= 0 and max_nonfinite_in_row >= 1, got "
                             f"{self.snapshot_every}, {self.max_nonfinite_in_row}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        self.convergence.validate()
        self.salience.validate()
        if self.language is not None:
            self.language.validate()
        return self

    @property
    def rays_floor(self) -> int:
        """The fewest rays per step halving may reach (``min_rays_per_step``, at most ``rays_per_step``)."""
        return min(self.min_rays_per_step, self.rays_per_step)

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
    salience:    the keyframes' smallest crop cells and how salient each is (`salience.CellTable`), or
                 None (set by the engine once the pyramids exist; for salient ray sampling)
    """

    kf_ids: torch.Tensor
    images: torch.Tensor
    depth: torch.Tensor
    T_world_cam: torch.Tensor
    intrinsics: torch.Tensor
    sizes: torch.Tensor
    salience: CellTable | None = None

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


def _uniform_pixels(kf: KeyframeTensors, n: int, generator: torch.Generator):
    """(rows, u, v) int64 (n,) each: keyframes uniformly, then a training pixel uniformly in each."""
    dev = kf.images.device
    rows = torch.randint(0, kf.count, (n,), generator=generator, device=dev)
    size = kf.sizes[rows].to(torch.float32)
    # Integer pixels: the targets are exact pixel values, no interpolation of colours or depth.
    ui = (torch.rand(n, generator=generator, device=dev) * size[:, 0]).long()
    vi = (torch.rand(n, generator=generator, device=dev) * size[:, 1]).long()
    ui = torch.minimum(ui, kf.sizes[rows, 0] - 1)
    vi = torch.minimum(vi, kf.sizes[rows, 1] - 1)
    return rows, training_pixels(kf.kf_ids[rows], ui, vi, kf.sizes[rows, 0]), vi


def _draw_pixels(kf: KeyframeTensors, n_rays: int, generator: torch.Generator, config: SalienceConfig | None):
    """Uniform pixels, plus a salient share (`salience.py`) when a config and the keyframes' salience
    table (``kf.salience``) are there."""
    if config is None or kf.salience is None or config.frac <= 0:
        return _uniform_pixels(kf, n_rays, generator)
    n_uni, n_sal = config.counts(n_rays)
    if kf.salience.cdf is None:
        kf.salience.weights(config)
    rows, ui, vi = _uniform_pixels(kf, n_uni, generator)
    sr, su, sv = salience_draw(kf.salience, n_sal, kf.sizes, generator)
    su = training_pixels(kf.kf_ids[sr], su, sv, kf.sizes[sr, 0]).minimum(kf.sizes[sr, 0] - 1)
    return torch.cat([rows, sr]), torch.cat([ui, su]), torch.cat([vi, sv])


def sample_ray_batch(kf: KeyframeTensors, n_rays: int, generator: torch.Generator, pyramid=None,
                     dense=None, *, salience: SalienceConfig | None = None,
                     targets: bool = True) -> dict[str, torch.Tensor]:
    """Draw ``n_rays`` training pixels (never a held-out one) and their targets.

    Pixels: keyframes uniformly, then pixels uniformly; with ``salience`` (and ``kf.salience``) a share of
    them where the keyframe's content stands out (`salience.py`). Returns origins (N, 3), directions (N, 3)
    unit, rgb (N, 3) float in [0, 1], depth (N,) ray distance in metres (NaN unknown), kf_ids (N,), uv (N, 2)
    pixel coordinates, and, with ``targets``: when ``pyramid`` is given, clip (N, clip_dim) targets at a
    random tile size per ray with clip_scale_factor (N,) = tile_frac * H / fy (the CLIP scale in metres per
    metre of depth); when ``dense`` is given, dino (N, dino_dim). Every keyframe of ``kf`` must have its
    targets there (not checked: the check would make the host wait for the device).
    """
    rows, ui, vi = _draw_pixels(kf, n_rays, generator, salience)
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
    if pyramid is not None and targets:
        ids = batch["kf_ids"]
        tile_frac = pyramid.random_tile_frac(n_rays, generator=generator).to(rows.device)
        batch["clip"] = pyramid.sample(ids, batch["uv"], tile_frac, check_ids=False).to(torch.float32)
        fy, h = kf.intrinsics[rows, 1], kf.sizes[rows, 1].to(torch.float32)
        batch["clip_scale_factor"] = tile_frac * h / fy
    if dense is not None and targets:
        batch["dino"] = dense.sample(batch["kf_ids"], batch["uv"], check_ids=False).to(torch.float32)
    return batch


def warm_up_optimizers() -> None:
    """Make one fused Adam on a scalar, so that the lazy imports its first construction runs (~2.5 s on this
    project's CPU) happen here, off the engine lock, not in the first `Trainer` built under it."""
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, fused=True)


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
            sched = self._schedule(name)
            lr = config.group_lr(name) if sched is None else sched.lr
            self.base_lr[name] = lr
            if sched is not None and sched.optimizer == "radam":
                self.optimizers[name] = torch.optim.RAdam(params, lr=lr, eps=config.adam_eps,
                                                          weight_decay=sched.weight_decay)
            else:
                # fused: one kernel per group instead of one per tensor (3x faster on CPU, torch >= 2.4).
                decay = 0.0 if sched is None else sched.weight_decay
                self.optimizers[name] = torch.optim.Adam(params, lr=lr, eps=config.adam_eps, fused=True,
                                                         weight_decay=decay)
        if not self.optimizers:
            raise ValueError("model.param_groups() returned no trainable parameters")
        self.use_amp = bool(config.mixed_precision) and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if config.amp_dtype == "bf16" else torch.float16
        # Loss scaling only matters for fp16 (bf16 has fp32's exponent range).
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.nonfinite_steps = 0  # all non-finite steps so far (skipped), as of the last report
        self.nonfinite_in_row = 0
        self.restores = 0  # roll-backs to the snapshot
        self._snapshot = Snapshot(self.optimizers) if config.snapshot_every else None
        self._last_bad_step = -1
        self._updating = False  # inside the optimiser update: a failure there has applied part of the step
        self.convergence = ConvergenceMonitor(config.convergence, pixel_rays_batched)
        # Fused Adam takes ``found_inf`` and skips the whole update on the device where it is 1.
        self._skip_on_device = all(getattr(o, "_step_supports_amp_scaling", False)
                                   for o in self.optimizers.values())
        self._pending: list[tuple[tuple[str, ...], torch.Tensor]] = []  # (names, record) per unreported step
        self._reported_step = 0  # step_count as of the last report (every step before it known good)
        self._unreported: NonFiniteStep | None = None  # found by a report that could not raise it
        self.last_losses: dict[str, float] = {}  # the latest good step's losses as of the last report

    @property
    def language_active(self) -> bool:
        """Whether the CLIP / DINO losses are trained at the current step."""
        return self.step_count >= self.config.clip_loss_start_step

    def _schedule(self, name: str) -> GroupSchedule | None:
        return self.config.language if name == "language" else None

    def _set_lr(self) -> None:
        f = lr_factor(self.step_count, self.config)
        for name, opt in self.optimizers.items():
            sched = self._schedule(name)
            lr = self.base_lr[name] * (f if sched is None else sched.factor(self.step_count))
            for g in opt.param_groups:
                g["lr"] = lr

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One forward / backward / update on ``batch`` (see `sample_ray_batch`).

        Returns the float losses of the latest good step when this step completed a report (every
        ``log_every`` steps: `flush`), else {}; no host sync otherwise. A non-finite loss or gradient
        applies nothing and is raised as `NonFiniteStep` by the report that finds it; running out of GPU
        memory applies nothing and raises `OutOfMemoryStep` (module docstring).
        """
        if self._snapshot is not None and self._snapshot.step < 0:
            self._snapshot.take(self.step_count)  # the initial weights: always something to go back to
        try:
            return self._step(batch)
        except torch.cuda.OutOfMemoryError as exc:
            reason = oom_reason(exc)
        # Out of the except block the failed step's frames (activations, autograd graph) are gone with the
        # exception's traceback, so the cache release below can give their memory back.
        raise self.out_of_memory(reason, int(batch["origins"].shape[0]))

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self._updating = False
        self.model.train()
        self._set_lr()
        if not self.language_active:
            batch = {k: v for k, v in batch.items() if k not in ("clip", "dino")}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.model(batch["origins"], batch["directions"],
                                 clip_scale_factor=batch.get("clip_scale_factor"),
                                 surface_depth=batch.get("depth"))
            losses = self.model.compute_losses(outputs, batch)
        total = sum(v for v in losses.values())
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        # With fp16 loss scaling an overflowing gradient is routine: the scaler skips that update and
        # lowers the scale itself. Otherwise a non-finite gradient means the model is in trouble.
        grad_sums = {} if self.scaler.is_enabled() else self._grad_sums()
        names = (*losses, "total", *(f"grad:{g}" for g in grad_sums))
        record = torch.stack([v.detach().float() for v in (*losses.values(), total, *grad_sums.values())])
        skip = None  # found_inf for the fused optimisers: 1 = apply nothing of this step
        # With fp16 loss scaling the scaler's own check of the gradients decides (it sets found_inf itself);
        # a non-finite loss is still counted at the report.
        if not self.scaler.is_enabled():
            bad = ~torch.isfinite(record).all()
            if self._skip_on_device:
                skip = bad.float()
            elif bool(bad):  # an optimiser that cannot skip on the device: this check waits for it
                self._record(names, record)
                self.flush()  # raises NonFiniteStep
        if self.config.max_grad_norm is not None:
            for opt in self.optimizers.values():
                self.scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        # Every group's update after all clipping: an out-of-memory error can cut only this loop short
        # (Adam allocates its moments on a group's first step), and then the snapshot undoes it.
        self._updating = True
        for opt in self.optimizers.values():
            if skip is not None:
                opt.found_inf, opt.grad_scale = skip, None
            try:
                self.scaler.step(opt)
            finally:
                if skip is not None:
                    del opt.found_inf, opt.grad_scale
        self.scaler.update()
        self._updating = False
        self._record(names, record)
        return self.flush() if len(self._pending) >= self.config.log_every else {}

    def _record(self, names: tuple[str, ...], record: torch.Tensor) -> None:
        """Keep a step's record (on the device) for the next report; the step counts until then."""
        self._pending.append((names, record))
        self.step_count += 1

    def flush(self) -> dict[str, float]:
        """Report the steps since the last report: their records come to the host in one sync and are
        replayed in order (losses, the convergence monitor, the non-finite count, the step count corrected
        for skipped steps; a snapshot after a clean stretch). Returns the latest good step's losses ({} before
        any). Raises `NonFiniteStep` when some were not finite (rolled back to the snapshot
        when the report ends with two or more in a row, or the weights are not finite)."""
        err, self._unreported = self._report() or self._unreported, None
        if err is not None:
            raise err
        return dict(self.last_losses)

    def _report(self) -> NonFiniteStep | None:
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        host = torch.cat([r for _, r in pending]).tolist()  # the one sync
        step, start, at, bad_steps, worst, last = self._reported_step, self._reported_step, 0, 0, 0, None
        for names, _ in pending:
            values = dict(zip(names, host[at:at + len(names)], strict=True))
            at += len(names)
            bad = tuple(k for k, x in values.items() if k != "total" and not math.isfinite(x))
            if bad or not math.isfinite(values["total"]):
                bad_steps += 1
                self.nonfinite_steps += 1
                self.nonfinite_in_row += 1
                worst = max(worst, self.nonfinite_in_row)
                self._last_bad_step, last = step, (step, bad or ("total",))
                continue
            step += 1
            self.nonfinite_in_row = 0
            self.last_losses = {k: x for k, x in values.items() if not k.startswith("grad:")}
            self.convergence.observe_losses(self.last_losses)
        self.step_count = self._reported_step = step
        snap, every = self._snapshot, self.config.snapshot_every
        if (snap is not None and not self.nonfinite_in_row and step // every > start // every
                and step - self._last_bad_step >= every):
            snap.take(step)  # only after a clean stretch, never in the middle of trouble
        if not bad_steps:
            return None
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        params_bad = not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())
        restored = False
        if snap is not None and (self.nonfinite_in_row >= 2 or params_bad):
            snap.restore()
            self.restores += 1
            restored = True
        return NonFiniteStep(last[0], last[1], worst, restored, snap.step if snap is not None else -1,
                             count=bad_steps)

    def evaluate(self, kf: KeyframeTensors, key=None) -> ConvergenceSignals:
        """Judge convergence now on the held-out pixels of ``kf`` (``ConvergenceMonitor.evaluate``; key:
        identity of the keyframe set, a change restarts the history). Reports first (`flush`: the language
        loss must include every step), so it may raise `NonFiniteStep`."""
        self.flush()
        return self.convergence.evaluate(self.model, kf, self.step_count, key)

    def _grad_sums(self) -> dict[str, torch.Tensor]:
        """Per optimiser group, the sum of all its gradients (0-d): NaN / inf iff some gradient is."""
        sums = {}
        for name, opt in self.optimizers.items():
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                sums[name] = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
        return sums

    def out_of_memory(self, reason: str, rays: int) -> OutOfMemoryStep:
        """Clean up after a step (or its batch) that ran out of GPU memory; returns the `OutOfMemoryStep` to
        raise. Gradients are dropped; an optimiser update cut short is rolled back to the snapshot; the loss
        scaler forgets the failed step (its scale is kept); CUDA's cached blocks are released."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        partial, self._updating = self._updating, False
        snap = self._snapshot
        restored = partial and snap is not None and snap.step >= 0
        if restored:
            snap.restore()
            self.restores += 1
        if self.scaler.is_enabled():
            # unscale_ / step of the failed step left per-optimiser records that the next step would trip
            # over ("unscale_() has already been called"); a fresh scaler with the same scale has none.
            state = self.scaler.state_dict()
            self.scaler = torch.amp.GradScaler("cuda", enabled=True)
            self.scaler.load_state_dict(state)
        release_cuda_cache()
        return OutOfMemoryStep(self.step_count, rays, reason, restored=restored,
                               partial=partial and not restored,
                               snapshot_step=snap.step if snap is not None else -1)

    def state_dict(self) -> dict:
        # Unreported steps first (their losses feed the convergence state); a non-finite one found here is
        # raised by the next `flush`.
        self._unreported = self._report() or self._unreported
        return {
            "step_count": self.step_count,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "convergence": self.convergence.state_dict(),
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
        self.step_count = self._reported_step = int(state["step_count"])
        self._pending, self._unreported = [], None  # steps of the replaced state
        if "convergence" in state:  # maps saved before convergence was judged have none
            self.convergence.load_state_dict(state["convergence"])
