"""`LERFEngine`: the facade nodes, tools and benchmarks drive (docs/ARCHITECTURE.md, "The engine facade").

Threading: ``lock`` (a reentrant `PriorityLock`) is held for one training step at a time and, briefly,
for a query / ``add_frame`` / ``status`` / ``save``. Training takes it in background mode, so any such
caller waits for at most the one step in progress, whichever thread trains (worker, CLI, benchmark).

Work is incremental: ``add_frame`` only validates, undistorts, downsizes and selects keyframes; each
``step`` call computes the CLIP pyramid + dense features of at most ``ingest.pyramid_keyframes_per_step``
new keyframes, then trains. The scene box is fixed when training starts (see `SceneBoxConfig`).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .camera import pixel_rays, undistort_depth, undistort_image, z_to_ray_distance
from .dense_features import DenseFeatureCache
from .encoders import checked_encode_texts, load_encoder
from .engine_lock import PriorityLock
from .fields.scene_box import SceneBox
from .frame import Frame
from .keyframes import KeyframeSelector, KeyframeStore
from .model import LERFModel
from .presets import EngineConfig
from .pyramid import ClipPyramid
from .query import QueryResult, locate
from .relevancy import negative_texts
from .trainer import KeyframeTensors, Trainer, sample_ray_batch


@dataclass(frozen=True)
class AddResult:
    """keyframe: the frame was kept; reason: the selector's ("first", "moved", "turned", "interval",
    "redundant", "blurred"); keyframe_id: its id in ``engine.store`` when kept."""

    keyframe: bool
    reason: str
    keyframe_id: int | None = None


@dataclass(frozen=True)
class StepStats:
    """train_steps done; keyframes whose language targets were computed; work_done = either happened."""

    train_steps: int = 0
    pyramid_keyframes: int = 0
    losses: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def work_done(self) -> bool:
        return self.train_steps > 0 or self.pyramid_keyframes > 0


@dataclass(frozen=True)
class EngineStatus:
    """step: training steps done; keyframes: held; keyframes_pending: without CLIP / DINO features yet;
    losses: last step's weighted terms + "total"; rays_per_s: training throughput of the last ``step``
    call; gpu_mem_*_mb: torch.cuda allocated / peak (0 on the CPU); last_error: "Type: message" of the
    last failed ``step``; ready: queries can be answered."""

    step: int
    keyframes: int
    keyframes_pending: int
    losses: dict
    rays_per_s: float
    gpu_mem_allocated_mb: float
    gpu_mem_peak_mb: float
    last_error: str | None
    ready: bool


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LERFEngine:
    """Learns a LERF from posed frames and answers 3D language queries (module docstring)."""

    def __init__(self, config: EngineConfig, device: str = "auto"):
        self.config = config.validate()
        self.device = resolve_device(device)
        self.lock = PriorityLock()
        self._data_cond = threading.Condition()
        self._data_version = 0
        # Encoders are validated by a probe encode here: a broken plugin fails at construction.
        self.clip_encoder = load_encoder(config.clip_encoder, self.device)
        self.dino_encoder = load_encoder(config.dino_encoder, self.device, dense=True)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        cfg = self.config
        self.selector = KeyframeSelector(cfg.keyframes)
        self.store = KeyframeStore(cfg.keyframes)
        self.pyramid = ClipPyramid(self.clip_encoder, cfg.pyramid, self.device)
        self.dense = DenseFeatureCache(self.dino_encoder, self.device)
        self._pending: collections.deque[int] = collections.deque()
        self._kf_version = 0
        self._tensors: KeyframeTensors | None = None
        self._tensors_version = -1
        self.scene_box: SceneBox | None = None
        self.model: LERFModel | None = None
        self.trainer: Trainer | None = None
        self._generator = torch.Generator(device=self.device).manual_seed(0)
        self._losses: dict[str, float] = {}
        self._rays_per_s = 0.0
        self._last_error: str | None = None
        self._candidates_key = None
        self._candidates = None

    def reset(self) -> None:
        """Forget all frames, features and the model (encoders and config are kept)."""
        with self.lock:
            self._reset_state()
        self._bump_data()

    # ------------------------------------------------------------------ data notifications
    @property
    def data_version(self) -> int:
        with self._data_cond:
            return self._data_version

    def _bump_data(self) -> None:
        with self._data_cond:
            self._data_version += 1
            self._data_cond.notify_all()

    def wait_for_data(self, version: int, timeout: float | None) -> int:
        """Block until ``data_version`` differs from ``version`` (new keyframes, reset) or timeout."""
        with self._data_cond:
            self._data_cond.wait_for(lambda: self._data_version != version, timeout)
            return self._data_version

    def wake(self) -> None:
        with self._data_cond:
            self._data_cond.notify_all()

    @property
    def train_step(self) -> int:
        return 0 if self.trainer is None else self.trainer.step_count

    # ------------------------------------------------------------------ ingest
    def _prepare(self, frame: Frame) -> Frame:
        """Validate, undistort once, downsize. Raises ValueError; touches no engine state.

        Returns a pinhole Frame whose depth (if any) is float32 with NaN where invalid.
        """
        frame.validate()
        image, intr = undistort_image(frame.image, frame.intrinsics)
        depth = None
        if frame.depth_m is not None:
            depth, _ = undistort_depth(np.asarray(frame.depth_m, dtype=np.float32), frame.intrinsics)
            depth = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float32)
        side = self.config.ingest.max_image_side
        if side and max(intr.width, intr.height) > side:
            intr = intr.scaled(side / max(intr.width, intr.height))
            img_t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            img_t = F.interpolate(img_t, size=(intr.height, intr.width), mode="area")
            image = img_t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
            if depth is not None:  # nearest: averaging across an occlusion edge would invent surfaces
                d_t = F.interpolate(torch.from_numpy(depth)[None, None], size=(intr.height, intr.width),
                                    mode="nearest")
                depth = d_t[0, 0].numpy()
        return Frame(np.ascontiguousarray(image), intr, np.asarray(frame.T_world_cam, np.float64),
                     int(frame.stamp_ns), depth)

    def add_frame(self, frame: Frame) -> AddResult:
        """Validate (ValueError, nothing changed), undistort, downsize, keyframe decision, queue features."""
        kf = self._prepare(frame)
        with self.lock:
            if len(self.store):
                ref = self.store.get(self.store.ids()[0]).image.shape
                if kf.image.shape != ref:
                    raise ValueError(f"frame is {kf.image.shape} after ingest, keyframes are {ref}: "
                                     f"one camera (image size) per engine")
            decision = self.selector.consider(kf)
            if not decision.accept:
                return AddResult(False, decision.reason, None)
            kf_id, evicted = self.store.add(kf)
            for old in evicted:
                self._evict(old)
            self._pending.append(kf_id)
            self._kf_version += 1
        self._bump_data()
        return AddResult(True, decision.reason, kf_id)

    def _evict(self, kf_id: int) -> None:
        if kf_id in self._pending:
            self._pending.remove(kf_id)
        self.pyramid.remove(kf_id)
        self.dense.remove(kf_id)
        self._kf_version += 1

    # ------------------------------------------------------------------ training
    def _ready_ids(self) -> list[int]:
        return [i for i in self.store.ids() if self.pyramid.ready(i) and self.dense.ready(i)]

    def _compute_features(self) -> bool:
        """Pyramid + dense features of the oldest pending keyframe; False when none is pending.

        The encoders run OUTSIDE the engine lock (the slow part: ~0.3 s per keyframe for ViT-B/16 on a
        GPU), so queries are not held up; results are inserted under the lock, and dropped if the
        keyframe was evicted meanwhile.
        """
        with self.lock.background():
            if not self._pending:
                return False
            kf_id = self._pending.popleft()
            image = self.store.get(kf_id).image
        key = self.pyramid.cache_key(image)
        size, grid = self.pyramid.compute(image)
        self.dense.add(kf_id, image)  # the dense cache's own store is thread-safe
        with self.lock.background():
            if kf_id in self.store:
                self.pyramid.insert(kf_id, size, grid, key)
                self._kf_version += 1
            else:
                self.dense.remove(kf_id)
        return True

    def _derive_box(self) -> SceneBox:
        sc = self.config.scene
        if sc.box_min is not None:
            return SceneBox(tuple(sc.box_min), tuple(sc.box_max))
        frames = self.store.frames()
        cams = np.stack([f.T_world_cam[:3, 3] for f in frames])
        lo, hi = cams.min(0), cams.max(0)
        surf = [_lift_depth(f, stride=4) for f in frames if f.depth_m is not None]
        if surf:
            # Percentiles keep a few stray depth pixels (reflections, far windows) from inflating the box.
            pts = np.concatenate(surf)
            lo = np.minimum(lo, np.percentile(pts, 1, axis=0))
            hi = np.maximum(hi, np.percentile(pts, 99, axis=0))
        return SceneBox(tuple(lo - sc.margin_m), tuple(hi + sc.margin_m))

    def _ensure_model(self) -> None:
        if self.model is not None:
            return
        self.scene_box = self._derive_box()
        self._build_model()

    def _build_model(self) -> None:
        self.model = LERFModel(self.config.model, self.scene_box, self.clip_encoder.dim,
                               self.dino_encoder.dim).to(self.device)
        self.trainer = Trainer(self.model, self.config.trainer, self.device)

    def _keyframe_tensors(self, ids: list[int]) -> KeyframeTensors:
        """Training tensors of the ready keyframes, rebuilt only when the keyframe set changed."""
        key = (self._kf_version, tuple(ids))
        if self._tensors is None or self._tensors_version != key:
            self._tensors = KeyframeTensors.from_frames(ids, [self.store.get(i) for i in ids], self.device)
            self._tensors_version = key
        return self._tensors

    def step(self, max_steps: int = 1) -> StepStats:
        """Compute pending keyframe features (bounded), then up to ``max_steps`` training steps."""
        t0 = time.perf_counter()
        try:
            return self._step(max_steps, t0)
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise

    def _step(self, max_steps: int, t0: float) -> StepStats:
        n_features = 0
        for _ in range(self.config.ingest.pyramid_keyframes_per_step):
            if not self._compute_features():
                break
            n_features += 1
        losses: dict[str, float] = {}
        done = 0
        rays = self.config.trainer.rays_per_step
        t_train = time.perf_counter()
        for _ in range(max_steps):
            with self.lock.background():  # gives way to a waiting query / add_frame / status / save
                ids = self._ready_ids()
                if len(ids) < self.config.ingest.min_keyframes:
                    break
                self._ensure_model()
                kf = self._keyframe_tensors(ids)
                lang = self.trainer.language_active
                batch = sample_ray_batch(kf, rays, self._generator, self.pyramid if lang else None,
                                         self.dense if lang else None)
                losses = self.trainer.step(batch)
                done += 1
        if done:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._rays_per_s = done * rays / max(time.perf_counter() - t_train, 1e-9)
            self._losses = losses
        return StepStats(done, n_features, losses, time.perf_counter() - t0)

    def ready(self) -> bool:
        """A model exists and has trained at least one step on enough keyframes."""
        with self.lock:
            return self.model is not None and self.train_step > 0

    # ------------------------------------------------------------------ queries
    def _text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, dim) unit text embeddings, cached per text (the encoder is fixed for the engine's life)."""
        missing = [t for t in texts if t not in self._text_cache]
        if missing:
            with torch.no_grad():
                out = checked_encode_texts(self.clip_encoder, missing).float().to(self.device)
            self._text_cache.update(zip(missing, out, strict=True))
        return torch.stack([self._text_cache[t] for t in texts])

    def query(self, text: str, negatives: Sequence[str] = (), threshold: float | None = None,
              with_cloud: bool = True) -> QueryResult:
        """Locate ``text`` in the world frame (see `core.query.locate`). Empty text -> ValueError."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"query text must be a non-empty string, got {text!r}")
        if isinstance(negatives, str):
            raise ValueError(f"negatives must be a sequence of strings, got the string {negatives!r}")
        text = text.strip()
        negs = negative_texts(negatives)
        with self.lock:
            if not self.ready():
                pending = len(self._pending)
                return _empty_result(
                    f"no model yet: {len(self._ready_ids())} keyframes with features "
                    f"(need {self.config.ingest.min_keyframes}), {pending} pending, "
                    f"step {self.train_step}", self.train_step)
            embeds = self._text_embeds([text, *negs])
            points, rgb, views = self._candidate_points()
            model = self.model
            model.eval()

            def embed_fn(pts: torch.Tensor, scale_m: float) -> torch.Tensor:
                with torch.no_grad():
                    return model.clip_at_points(pts, scale_m)

            result = locate(points, rgb, views, embed_fn, embeds[0], embeds[1:], self.config.query,
                            threshold, with_cloud)
            return dataclasses.replace(result, model_step=self.train_step)

    def _candidate_points(self):
        """Voxelised surface points (P, 3) world, rgb (P, 3) uint8, view counts (P,) int; cached."""
        key = (self._kf_version, self.train_step if self._needs_rendered_depth() else -1)
        if self._candidates_key == key:
            return self._candidates
        cc = self.config.candidates
        frames = self.store.frames()
        s = cc.pixel_stride
        depth_grids, pts_all, rgb_all = [], [], []
        for kf in frames:
            if kf.depth_m is not None:
                grid = kf.depth_m[::s, ::s].copy()
            else:
                grid = self._render_depth_grid(kf, s)
            depth_grids.append(grid)
            pts, rgb = _lift_depth(kf, s, grid, with_rgb=True)
            pts_all.append(pts)
            rgb_all.append(rgb)
        pts = np.concatenate(pts_all)
        rgb = np.concatenate(rgb_all).astype(np.float64)
        # Voxel downsample: one point per occupied voxel, the mean of its points and colours.
        vox = np.floor(pts / cc.voxel_m).astype(np.int64)
        _, inverse, counts = np.unique(vox, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        centres = np.zeros((counts.shape[0], 3))
        colours = np.zeros((counts.shape[0], 3))
        np.add.at(centres, inverse, pts)
        np.add.at(colours, inverse, rgb)
        centres /= counts[:, None]
        colours = np.clip(np.rint(colours / counts[:, None]), 0, 255).astype(np.uint8)
        views = self._view_counts(centres, frames, depth_grids, s)
        self._candidates = (
            torch.tensor(centres, dtype=torch.float32, device=self.device),
            torch.from_numpy(colours).to(self.device),
            torch.from_numpy(views).to(self.device),
        )
        self._candidates_key = key
        return self._candidates

    def _needs_rendered_depth(self) -> bool:
        return any(f.depth_m is None for f in self.store.frames())

    def _render_depth_grid(self, kf: Frame, s: int) -> np.ndarray:
        """Rendered z-depth (h, w) at every s-th pixel of a keyframe without measured depth."""
        h, w = kf.image.shape[:2]
        v, u = np.mgrid[0:h:s, 0:w:s]
        T = torch.tensor(kf.T_world_cam, dtype=torch.float32, device=self.device)
        o, d = pixel_rays(kf.intrinsics, T, u.reshape(-1), v.reshape(-1))
        ray_per_z = z_to_ray_distance(kf.intrinsics, u.reshape(-1), v.reshape(-1)).to(self.device)
        self.model.eval()
        with torch.no_grad():
            t = torch.cat([self.model(o[a:a + 4096], d[a:a + 4096])["depth"].reshape(-1)
                           for a in range(0, o.shape[0], 4096)])
        return (t / ray_per_z).reshape(v.shape).cpu().numpy().astype(np.float32)

    def _view_counts(self, points: np.ndarray, kfs: list[Frame], grids: list[np.ndarray],
                     s: int) -> np.ndarray:
        """How many keyframes see each point (P,): projects inside and agrees with their depth."""
        tol = self.config.candidates.depth_tol_rel
        counts = np.zeros(points.shape[0], np.int64)
        for kf, grid in zip(kfs, grids, strict=True):
            R, t = kf.T_world_cam[:3, :3], kf.T_world_cam[:3, 3]
            p_cam = (points - t) @ R  # R^T (p - t) for row vectors
            z = p_cam[:, 2]
            with np.errstate(divide="ignore", invalid="ignore"):
                u = kf.intrinsics.fx * p_cam[:, 0] / z + kf.intrinsics.cx
                v = kf.intrinsics.fy * p_cam[:, 1] / z + kf.intrinsics.cy
            gi, gj = np.rint(v / s), np.rint(u / s)
            ok = (z > 1e-6) & (gi >= 0) & (gi < grid.shape[0]) & (gj >= 0) & (gj < grid.shape[1])
            d = np.full_like(z, np.nan)
            d[ok] = grid[gi[ok].astype(np.int64), gj[ok].astype(np.int64)]
            with np.errstate(invalid="ignore"):
                counts += (ok & (np.abs(z - d) <= tol * d + self.config.candidates.voxel_m)).astype(np.int64)
        return counts

    # ------------------------------------------------------------------ maps on disk
    def save(self, path) -> None:
        """Write a map directory (``core/checkpoint.py``), a consistent snapshot taken under the lock."""
        with self.lock:
            checkpoint.save_engine(self, path)

    @classmethod
    def load(cls, path, device: str = "auto") -> LERFEngine:
        """A new engine from a map directory; ValueError naming the file, nothing half-loaded."""
        return checkpoint.load_engine(cls, path, device)

    # ------------------------------------------------------------------ status
    def status(self) -> EngineStatus:
        with self.lock:
            alloc = peak = 0.0
            if self.device.type == "cuda":
                alloc = torch.cuda.memory_allocated(self.device) / 2**20
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return EngineStatus(
                step=self.train_step, keyframes=len(self.store), keyframes_pending=len(self._pending),
                losses=dict(self._losses), rays_per_s=self._rays_per_s, gpu_mem_allocated_mb=alloc,
                gpu_mem_peak_mb=peak, last_error=self._last_error, ready=self.ready())


def _empty_result(message: str, step: int) -> QueryResult:
    return QueryResult(found=False, message=message, location_world=None, relevancy=0.0, scale_m=0.0,
                       cloud_xyz=np.zeros((0, 3), np.float32), cloud_relevancy=np.zeros(0, np.float32),
                       cloud_rgb=np.zeros((0, 3), np.uint8), model_step=step)


def _lift_depth(kf: Frame, stride: int, grid: np.ndarray | None = None, with_rgb: bool = False):
    """World points (N, 3) of every stride-th pixel with finite z-depth (``grid`` or kf.depth_m)."""
    h, w = kf.image.shape[:2]
    v, u = np.mgrid[0:h:stride, 0:w:stride]
    z = kf.depth_m[::stride, ::stride] if grid is None else grid
    ok = np.isfinite(z) & (z > 0)
    i = kf.intrinsics
    p_cam = np.stack([(u[ok] - i.cx) / i.fx * z[ok], (v[ok] - i.cy) / i.fy * z[ok], z[ok]], axis=-1)
    pts = p_cam @ kf.T_world_cam[:3, :3].T + kf.T_world_cam[:3, 3]
    if with_rgb:
        return pts, kf.image[v[ok], u[ok]]
    return pts
