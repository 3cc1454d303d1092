"""When is a map usable? Convergence judged from held-out pixels, multi-view depth and the language loss.

Signals, computed every ``eval_every`` training steps (never per step: each costs a render and a host sync):

* colour: held-out PSNR and R^2 = 1 - MSE / variance on a fixed sample of held-out keyframe pixels
  (`holdout.py`: training never sees them). R^2 and not PSNR is what is judged: black or uniform images
  give a high PSNR for an empty map, and R^2 says there is nothing to explain (no signal).
* surfaces and geometry: the share of those pixels that render a surface (opacity >= 0.5), and whether the
  rendered depth agrees between views: a held-out pixel's surface point is projected into another keyframe
  that sees it from 5-45 degrees away (the one nearest 25 degrees) and the depth rendered along that view's
  ray is compared with the point's distance (median relative disagreement). Fog and floaters that explain
  one view's colours put the expected depth off the surface, which a second view at a real angle does not
  reproduce (a view a few degrees away nearly does: measured on the demo room, RGB only, the disagreement at
  25 degrees is ~3x that at 5 throughout training); a static camera gives no pair at all (no signal).
* levelling off: the best held-out PSNR of the last ``window`` evaluations against the best before them, and
  the slope of an EMA of the language (CLIP + DINO) training loss over the same span.

``usable`` needs every check; ``progress`` in [0, 1] averages how far each check is from passing (1 only
when usable). Levelling off is latched: once seen, later noise in the held-out PSNR (+-1 dB between
evaluations while the learning rate is still high) does not take ``usable`` back. The history and the
latch restart when the keyframe set changes (new keyframes bring pixels the map has not learnt yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .holdout import is_held_out

_NAN = float("nan")
_EVAL_SEED = 0
_CHUNK = 4096


@dataclass(frozen=True)
class ConvergenceConfig:
    """eval_every: training steps between evaluations. eval_rays: held-out pixels rendered per evaluation
    (a fixed sample per keyframe set; as many again for the second views of the depth check).
    window: evaluations over which PSNR and language loss must have levelled off.
    min_r2: share of the held-out colour variance the map must explain.
    psnr_gain_db: a best held-out PSNR rising by less than this over the window has levelled off.
    min_coverage: share of held-out pixels that must render a surface.
    max_depth_disagreement: largest median relative depth disagreement between views.
    min_depth_pairs: surface points with a second view needed to judge depth at all.
    parallax_deg: (min, max) angle between the two views' rays at the point for the depth check; the view
    nearest the middle is used.
    language_slope: a language-loss EMA falling by less than this fraction per 1000 steps has levelled off.
    language_ema_steps: time constant of that EMA, steps.
    min_variance: held-out colour variance (per channel, [0, 1] units) below which colour carries no signal.
    """

    eval_every: int = 100
    eval_rays: int = 512
    window: int = 3
    min_r2: float = 0.8
    psnr_gain_db: float = 0.3
    min_coverage: float = 0.5
    max_depth_disagreement: float = 0.05
    min_depth_pairs: int = 32
    parallax_deg: tuple[float, float] = (5.0, 45.0)
    language_slope: float = 0.1
    language_ema_steps: int = 100
    min_variance: float = 1e-4

    def validate(self) -> ConvergenceConfig:
        if self.eval_every < 1 or self.eval_rays < 8 or self.window < 1 or self.min_depth_pairs < 1:
            raise ValueError(f"need eval_every >= 1, eval_rays >= 8, window >= 1, min_depth_pairs >= 1, got "
                             f"{self.eval_every}, {self.eval_rays}, {self.window}, {self.min_depth_pairs}")
        lo, hi = self.parallax_deg
        if not 0 < lo < hi <= 90:
            raise ValueError(f"parallax_deg must be (min, max) with 0 < min < max <= 90, "
                             f"got {self.parallax_deg}")
        for name in ("min_r2", "min_coverage"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("psnr_gain_db", "max_depth_disagreement", "language_slope", "min_variance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.language_ema_steps < 1:
            raise ValueError(f"language_ema_steps must be >= 1, got {self.language_ema_steps}")
        return self


@dataclass(frozen=True)
class ConvergenceSignals:
    """The last evaluation. step: training step it was taken at (-1: none yet). psnr_db, r2: held-out
    colour; coverage: share of held-out pixels with a surface; depth_disagreement: median relative,
    over depth_pairs points; psnr_gain_db: best PSNR of the window minus the best before it;
    language_slope: relative change of the language-loss EMA per 1000 steps (negative = falling).
    usable, progress: see the module docstring; note: why (not) usable, one line; no_signal: the data
    cannot show convergence (uniform images, no second viewpoint), so training will not get there."""

    step: int = -1
    psnr_db: float = _NAN
    r2: float = _NAN
    coverage: float = _NAN
    depth_disagreement: float = _NAN
    depth_pairs: int = 0
    psnr_gain_db: float = _NAN
    language_slope: float = _NAN
    usable: bool = False
    progress: float = 0.0
    note: str = "not evaluated yet"
    no_signal: bool = False


def heldout_pixels(kf, n: int, seed: int = _EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``n`` distinct held-out pixels of the keyframes ``kf`` (`KeyframeTensors`), the same ones for
    the same keyframes on any device: rows (M,) into kf, u, v (M,) int64 on kf's device."""
    ids, sizes = kf.kf_ids.cpu(), kf.sizes.cpu()
    g = torch.Generator().manual_seed(seed)
    m = 40 * n  # held-out pixels are 1 in 10 of the even columns drawn below
    rows = torch.randint(0, kf.count, (m,), generator=g)
    pairs = (sizes[rows, 0] // 2).clamp_min(1)
    u = 2 * (torch.rand(m, generator=g) * pairs).long()
    v = (torch.rand(m, generator=g) * sizes[rows, 1]).long()
    held = is_held_out(ids[rows], u, v, sizes[rows, 0])
    keys = ((rows * 2**20 + v) * 2**20 + u).tolist()
    seen: set[int] = set()
    pick: list[int] = []
    for i in torch.nonzero(held).squeeze(1).tolist():
        if keys[i] not in seen and len(pick) < n:
            seen.add(keys[i])
            pick.append(i)
    sel = torch.tensor(pick, dtype=torch.int64)
    dev = kf.images.device
    return rows[sel].to(dev), u[sel].to(dev), v[sel].to(dev)


@torch.no_grad()
def render_rays(model, origins: torch.Tensor, directions: torch.Tensor):
    """Deterministic (eval-mode) render of (R, 3) world rays -> rgb (R, 3), depth (R,) metres along the ray,
    accumulation (R,). Leaves the model in eval mode (the trainer sets train mode every step)."""
    model.eval()
    rgb, depth, acc = [], [], []
    for i in range(0, origins.shape[0], _CHUNK):
        out = model(origins[i:i + _CHUNK], directions[i:i + _CHUNK])
        rgb.append(out["rgb"].float())
        depth.append(out["depth"].float())
        acc.append(out["accumulation"].float())
    if not rgb:
        z = origins.new_zeros(0)
        return origins.new_zeros(0, 3), z, z
    return torch.cat(rgb), torch.cat(depth), torch.cat(acc)


def colour_signal(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    """(N, 3) rendered and true colours in [0, 1] -> (PSNR dB, R^2, target variance per channel)."""
    mse = float(((pred - target) ** 2).mean())
    var = float(target.var(dim=0, unbiased=False).mean()) if target.shape[0] > 1 else 0.0
    psnr = -10.0 * math.log10(max(mse, 1e-10))
    r2 = 1.0 - mse / var if var > 0 else _NAN
    return psnr, r2, var


@torch.no_grad()
def depth_agreement(kf, rows: torch.Tensor, points: torch.Tensor, origins: torch.Tensor, render_depth_fn,
                    parallax_deg: tuple[float, float]) -> tuple[float, int]:
    """Median relative disagreement of rendered depth between views, and the number of points judged.

    kf: `KeyframeTensors`; rows (N,) keyframe of each point's first view; points (N, 3) world surface points
    rendered from ``origins`` (N, 3). Each point is projected into every other keyframe; among those that
    see it (in front, inside the image) with a ray angle in ``parallax_deg`` the one nearest the middle wins;
    ``render_depth_fn(origins (M, 3), unit directions (M, 3)) -> (M,)`` renders the depth along that view's
    ray through the point, to be compared with the point's distance. (nan, 0) when no point has a view.
    """
    if points.shape[0] == 0:
        return _NAN, 0
    R, c = kf.T_world_cam[:, :3, :3], kf.T_world_cam[:, :3, 3]  # (K, 3, 3), (K, 3)
    rel = points[None] - c[:, None]  # (K, N, 3)
    cam = torch.einsum("kji,knj->kni", R, rel)  # R^T (X - c): camera frame
    z = cam[..., 2]
    fx, fy, cx, cy = (x[:, None] for x in kf.intrinsics.unbind(-1))
    zs = z.clamp_min(1e-6)
    pu, pv = fx * cam[..., 0] / zs + cx, fy * cam[..., 1] / zs + cy
    w, h = (x[:, None].to(pu) for x in kf.sizes.unbind(-1))
    inside = (z > 1e-3) & (pu >= -0.5) & (pu <= w - 0.5) & (pv >= -0.5) & (pv <= h - 0.5)
    ray_a = F.normalize(points - origins, dim=-1)
    ray_b = F.normalize(rel, dim=-1)
    angle = torch.rad2deg(torch.acos((ray_a[None] * ray_b).sum(-1).clamp(-1.0, 1.0)))
    other = torch.arange(kf.count, device=rows.device)[:, None] != rows[None]
    ok = inside & other & (angle >= parallax_deg[0]) & (angle <= parallax_deg[1])
    off_mid = (angle - (parallax_deg[0] + parallax_deg[1]) / 2).abs()
    best = torch.where(ok, off_mid, torch.full_like(angle, math.inf)).argmin(dim=0)  # (N,)
    has = ok.any(dim=0)
    if not bool(has.any()):
        return _NAN, 0
    idx = torch.nonzero(has).squeeze(1)
    k = best[idx]
    dist = rel[k, idx].norm(dim=-1)
    t_b = render_depth_fn(c[k], ray_b[k, idx])
    err = (t_b - dist).abs() / dist.clamp_min(1e-6)
    return float(err.median()), int(idx.numel())


class ConvergenceMonitor:
    """Tracks the signals (module docstring). Call ``observe_losses`` with every step's losses, in order
    (host floats: the trainer replays them when it reads them back, `Trainer.flush`), ``evaluate`` when
    ``due``; ``signals`` is the last result.

    rays_fn(kf, rows, u, v) -> (origins (N, 3), unit directions (N, 3), ...): world rays through pixel
    centres of keyframes (``trainer.pixel_rays_batched``).
    """

    def __init__(self, config: ConvergenceConfig, rays_fn):
        self.config = config.validate()
        self._rays_fn = rays_fn
        self.signals = ConvergenceSignals()
        self._lang_ema = _NAN
        self._history: list[tuple[int, float, float]] = []  # (step, psnr_db, language EMA)
        self._levelled = False
        self._key = None
        self._sample_key = None
        self._sample = None

    # ---------------------------------------------------------------- per step
    def observe_losses(self, losses: dict[str, float]) -> None:
        lang = [losses[k] for k in ("clip", "dino") if k in losses]
        if not lang:
            return
        x = sum(lang)
        if not math.isfinite(x):
            return
        a = 1.0 / self.config.language_ema_steps
        self._lang_ema = x if math.isnan(self._lang_ema) else (1 - a) * self._lang_ema + a * x

    def due(self, step: int) -> bool:
        """``step`` is ``eval_every`` or more steps past the last evaluation (or past 0)."""
        return step - max(self.signals.step, 0) >= self.config.eval_every

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model, kf, step: int, key=None) -> ConvergenceSignals:
        """Render the held-out sample of ``kf`` with ``model`` and update ``signals``. ``key`` identifies the
        keyframe set (a change restarts the history); None = ``kf``'s identity."""
        cfg = self.config
        key = id(kf) if key is None else key
        if key != self._key:
            self._key, self._history, self._levelled = key, [], False
        if self._sample_key != key:
            self._sample, self._sample_key = heldout_pixels(kf, cfg.eval_rays), key
        rows, u, v = self._sample
        origins, dirs = self._rays_fn(kf, rows, u.float(), v.float())[:2]
        rgb, depth, acc = render_rays(model, origins, dirs)
        target = kf.images[rows, v, u].float() / 255.0
        psnr, r2, var = colour_signal(rgb, target)
        surface = acc >= 0.5
        coverage = float(surface.float().mean()) if surface.numel() else _NAN
        points = origins[surface] + dirs[surface] * depth[surface, None]
        disagreement, pairs = depth_agreement(
            kf, rows[surface], points, origins[surface],
            lambda o, d: render_rays(model, o, d)[1], cfg.parallax_deg)
        self._history.append((step, psnr, self._lang_ema))
        gain, slope = self._trends()
        self._levelled |= gain < cfg.psnr_gain_db and slope > -cfg.language_slope
        self.signals = self._judge(step, psnr, r2, var, coverage, disagreement, pairs, gain, slope)
        return self.signals

    def _trends(self) -> tuple[float, float]:
        """(best PSNR of the last ``window`` evaluations - best before them, language-EMA slope over the
        same span, relative per 1000 steps); nan while the history is shorter than window + 1."""
        w = self.config.window
        if len(self._history) <= w:
            return _NAN, _NAN
        recent, before = self._history[-w:], self._history[:-w]
        gain = max(p for _, p, _ in recent) - max(p for _, p, _ in before)
        (s0, _, e0), (s1, _, e1) = self._history[-w - 1], self._history[-1]
        slope = (e1 - e0) / max(abs(e0), 1e-12) * 1000.0 / max(s1 - s0, 1)
        return gain, slope

    def _judge(self, step, psnr, r2, var, coverage, disagreement, pairs, gain, slope) -> ConvergenceSignals:
        cfg = self.config
        lo, hi = cfg.parallax_deg
        span = cfg.window * cfg.eval_every
        parts: list[float] = []
        failing: list[str] = []
        no_signal: list[str] = []

        if var < cfg.min_variance:
            no_signal.append("the held-out pixels have no colour variation (uniform or black images)")
            parts.append(0.0)
        else:
            parts.append(_ratio(r2, cfg.min_r2))
            if not r2 >= cfg.min_r2:
                failing.append(f"held-out colour R^2 {r2:.2f} < {cfg.min_r2:.2f}")
        parts.append(_ratio(coverage, cfg.min_coverage))
        if not coverage >= cfg.min_coverage:
            failing.append(f"surfaces at {_pct(coverage)} of held-out pixels < {_pct(cfg.min_coverage)}")
        if pairs == 0 and coverage >= cfg.min_coverage:
            no_signal.append(f"no second keyframe sees the surfaces from {lo:g}-{hi:g} degrees away "
                             f"(a static camera?)")
        if pairs < cfg.min_depth_pairs:
            parts.append(0.0)
            if pairs:
                failing.append(f"depth checked at only {pairs} points < {cfg.min_depth_pairs}")
        else:
            parts.append(_ratio(cfg.max_depth_disagreement, disagreement))
            if not disagreement <= cfg.max_depth_disagreement:
                failing.append(f"depth disagrees by {_pct(disagreement)} between views > "
                               f"{_pct(cfg.max_depth_disagreement)}")
        history = min(len(self._history) / (cfg.window + 1), 1.0)
        if self._levelled:
            parts += [1.0, 1.0]
        elif math.isnan(gain):
            parts += [0.5 * history, 0.5 * history]
            failing.append(f"collecting {cfg.window + 1} evaluations to see PSNR and language loss level off")
        else:
            parts.append(_ratio(cfg.psnr_gain_db, gain))
            if not gain < cfg.psnr_gain_db:
                failing.append(f"held-out PSNR still rising (+{gain:.2f} dB over the last {span} steps)")
            if math.isnan(slope):
                parts.append(0.0)
                failing.append("language field not trained yet")
            else:
                parts.append(_ratio(cfg.language_slope, -slope))
                if not slope > -cfg.language_slope:
                    failing.append(f"language loss still falling ({100 * slope:+.0f} % per 1000 steps)")
        usable = not failing and not no_signal
        progress = 1.0 if usable else min(sum(parts) / len(parts), 0.99)
        if usable:
            note = (f"usable: held-out PSNR {psnr:.1f} dB (R^2 {r2:.2f}), depth agrees to "
                    f"{_pct(disagreement)} over {pairs} view pairs, PSNR and language loss levelled off")
        elif no_signal:
            note = "no convergence signal: " + "; ".join(no_signal)
        else:
            note = "converging: " + "; ".join(failing)
        return ConvergenceSignals(step, psnr, r2, coverage, disagreement, pairs, gain, slope, usable,
                                  progress, note, bool(no_signal))

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Plain Python values (loads with ``torch.load(weights_only=True)``)."""
        s = self.signals
        return {"lang_ema": self._lang_ema, "history": [list(h) for h in self._history],
                "signals": {f: getattr(s, f) for f in ConvergenceSignals.__dataclass_fields__}}

    def load_state_dict(self, state: dict) -> None:
        """The signals and EMA of a saved map (what a loaded map reports); the history and the levelling
        latch restart at the next evaluation (the keyframe set's identity is not saved)."""
        self._lang_ema = float(state.get("lang_ema", _NAN))
        self._history, self._key = [], None
        fields = ConvergenceSignals.__dataclass_fields__
        saved = state.get("signals", {})
        self.signals = ConvergenceSignals(**{k: v for k, v in saved.items() if k in fields})


def _ratio(num: float, den: float) -> float:
    """num / den clipped to [0, 1]: how far a check is from passing. A non-positive ``den`` (nothing left
    to gain or to fall) -> 1; nan -> 0."""
    if math.isnan(num) or math.isnan(den):
        return 0.0
    if den <= 0:
        return 1.0
    return min(max(num / den, 0.0), 1.0)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %" if math.isfinite(x) else "?"
