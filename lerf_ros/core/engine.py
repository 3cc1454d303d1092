"""`LERFEngine`: the facade nodes, tools and benchmarks drive (docs/ARCHITECTURE.md, "The engine facade").

Threading: ``lock`` (a reentrant `PriorityLock`) is held for one training step at a time and, briefly,
for a query / ``add_frame`` / ``status`` / ``save``. Training takes it in background mode, so any such
caller waits for at most the one step in progress, whichever thread trains (worker, CLI, benchmark).

Work is incremental: ``add_frame`` only validates, undistorts, downsizes and selects keyframes; each
``step`` call computes the CLIP pyramid + dense features of ``ingest.pyramid_keyframes_per_step`` new
keyframes (more while a backlog waits, for as long as the last call trained), then trains. The scene box
is fixed when training starts (see `SceneBoxConfig`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint
from . import journal as journal_mod
from .encoders import checked_encode_texts, is_demo_encoder, load_encoder
from .fields import MLP, HashEncoding
from .fields.layouts import as_torch
from .fields.scene_box import SceneBox
from .frames import scene_region
from .frames.frame import Frame
from .frames.frame_prep import prepare_frame_with_source
from .frames.keyframes import KeyframeSelector, KeyframeStore
from .language import candidates, view_evidence
from .language.dense_features import Cancelled, DenseFeatureCache
from .language.pyramid import ClipPyramid
from .language.query import QueryResult, locate
from .language.query_embed import GridFeatureCache, multiscale_embed_fn
from .language.relevancy import CANONICAL_NEGATIVES, negative_texts
from .model import LanguageSnapshot, LERFModel, geometry_snapshot
from .presets import EngineConfig
from .training import salience
from .training.convergence import ConvergenceSignals
from .training.engine_lock import PriorityLock
from .training.recovery import OutOfMemoryStep, halved_rays, oom_reason, release_cuda_cache
from .training.trainer import KeyframeTensors, NonFiniteStep, Trainer, sample_ray_batch, warm_up_optimizers


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
    losses: the weighted terms + "total" of the last step (read back at the end of every ``step`` call and
    every ``TrainerConfig.log_every`` steps, never per step on a GPU); rays_per_s: training throughput of
    the last ``step``
    call; gpu_mem_*_mb: torch.cuda allocated / peak (0 on the CPU); last_error: "Type: message" of the
    last failed ``step``; ready: queries can be answered; keyframes_outside_box: keyframes whose view
    mostly leaves the scene box (`keyframes_outside_box`); scene_box: ((3,), (3,)) world metres or None;
    scene_box_source: what it came from (`LERFEngine.box_source`, `scene_region.describe_source`);
    clip_encoder / dino_encoder: the encoders' names; demo_encoders: either is a DEMO encoder (colours);
    convergence: the last `ConvergenceSignals` (usable, progress, held-out PSNR, depth agreement, language
    slope, note); nonfinite_steps: training steps skipped for a non-finite loss / gradient; restores: roll-
    backs to the last good weights (see `trainer.NonFiniteStep`); oom_events: training steps that ran out of
    GPU memory (each halved the rays per step, `recovery.OutOfMemoryStep`); rays_per_step: rays per training
    step now (the config's until memory ran out; kept until reset); journal_bytes: disk bytes of the attached
    journal (0 = none, `core/journal.py`); journal_skipped: its entries skipped as damaged on resume;
    gpu_mem_reserved_mb: torch.cuda's caching allocator reserve (0 on the CPU); device: the torch device the
    engine runs on ("cpu", "cuda:0"); keyframes_by_camera: {``Frame.camera``: keyframes held}; backends: the
    neural-field backends the model runs on (`describe_backends`, "" before there is a model)."""

    step: int
    keyframes: int
    keyframes_pending: int
    losses: dict
    rays_per_s: float
    gpu_mem_allocated_mb: float
    gpu_mem_peak_mb: float
    last_error: str | None
    ready: bool
    keyframes_outside_box: int = 0
    scene_box: tuple | None = None
    scene_box_source: str = ""
    clip_encoder: str = ""
    dino_encoder: str = ""
    demo_encoders: bool = False
    convergence: ConvergenceSignals = field(default_factory=ConvergenceSignals)
    nonfinite_steps: int = 0
    restores: int = 0
    oom_events: int = 0
    rays_per_step: int = 0
    journal_bytes: int = 0
    journal_skipped: int = 0
    gpu_mem_reserved_mb: float = 0.0
    device: str = ""
    keyframes_by_camera: dict = field(default_factory=dict)
    backends: str = ""

    @property
    def usable(self) -> bool:
        return self.convergence.usable

    @property
    def progress(self) -> float:
        return self.convergence.progress


#: Scene-box refit (`LERFEngine._maybe_refit_box`): how often it is checked, when it happens, how often.
#: A box from camera frusta is checked every FRUSTA_CHECK_STEPS steps (the test is cheap, and a robot that
#: drives out of it is best followed while the fields are young: a refit starts them over).
REFIT_CHECK_STEPS = 200
FRUSTA_CHECK_STEPS = 50
REFIT_OUTSIDE_FRACTION = 0.25
MAX_BOX_REFITS = 3
#: A box from camera frusta (no measured depth) is tightened once to the surfaces the model renders after
#: TIGHTEN_MIN_STEPS steps (`scene_region.tightened_box`; every TIGHTEN_STRIDE-th pixel of every
#: keyframe), when the tight box has at most TIGHTEN_VOLUME of the volume.
TIGHTEN_MIN_STEPS = 300
TIGHTEN_STRIDE = 10
TIGHTEN_VOLUME = 0.5
#: A training step within this many seconds means "training": queries then render no candidate grids.
TRAINING_ACTIVE_S = 2.0
#: Share of the training worker's wall time spent re-rendering query candidates (RGB-only keyframes):
#: REFRESH_FRACTION for the routine round (stalest first), URGENT_REFRESH_FRACTION while a keyframe has no
#: grid or its grid is from a model trained for less than URGENT_AGE_RATIO of the steps trained now (a
#: query during training cannot see what such keyframes show: after a start or a box refit, or while the
#: robot drives into new places, candidates are what a query is missing, not training steps). Not before
#: the fields trained URGENT_MIN_STEPS steps, nor while a frustum box waits to be tightened (its grids die
#: with its fields).
REFRESH_FRACTION = 0.1
URGENT_REFRESH_FRACTION = 0.4
URGENT_AGE_RATIO = 0.5
URGENT_MIN_STEPS = 50
MAX_REFRESH_GRIDS = 8


def _auto_to_torch(cfg):
    """Copy of a (nested) frozen config dataclass with every ``implementation="auto"`` set to "torch"."""
    changes = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "implementation" and v == "auto":
            changes[f.name] = "torch"
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _auto_to_torch(v)
        elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
            changes[f.name] = tuple(_auto_to_torch(x) for x in v)
    return dataclasses.replace(cfg, **changes)


def describe_backends(model: torch.nn.Module) -> str:
    """"hash grid: triton, MLP: torch": the backends the model's hash grids and MLPs run on ("tcnn/torch"
    when modules differ). A Triton grid moved off CUDA runs the torch path, and is named so."""
    grids, mlps = [], []
    for module in model.modules():
        if isinstance(module, HashEncoding):
            impl = module.implementation
            grids.append("torch" if impl == "triton" and not module.params.is_cuda else impl)
        elif isinstance(module, MLP):
            mlps.append(module.implementation)
    return f"hash grid: {'/'.join(sorted(set(grids))) or 'none'}, " \
           f"MLP: {'/'.join(sorted(set(mlps))) or 'none'}"


_DENORMAL = np.float32(1e-39)


def _denormals_flushed() -> bool:
    """Whether this thread flushes float32 denormals to zero (`torch.set_flush_denormal`: the CPU's own
    flags, so a numpy product shows them; a torch one would count as a host sync)."""
    return float(_DENORMAL * np.float32(1.0)) == 0.0


@contextlib.contextmanager
def _flushed_denormals(enabled: bool):
    """This thread flushes float32 denormals to zero inside the block, and is as it was after it.

    Adam's second moments of hash-table rows that see almost no gradient sink into float32's denormal
    range, where a CPU is ~100x slower: the optimiser took ~30 % of a tiny-preset step (flushed, as a GPU
    does, the steps are ~30 % faster). Only inside the block: the flag is per thread and threads started
    later inherit it, and elsewhere a denormal may be data (a point cloud's packed RGB is one as a float32
    whenever red < 128; read with the flag set, it is zero)."""
    if not enabled or _denormals_flushed():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


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
        # Set (by TrainingWorker.stop) to make a running ``step`` return soon: keyframe features are
        # abandoned between encoder batches (the keyframe stays pending), no further training steps.
        self.cancel_event = threading.Event()
        # Encoders are validated by a probe encode here: a broken plugin fails at construction.
        self.clip_encoder = load_encoder(config.clip_encoder, self.device)
        self.dino_encoder = load_encoder(config.dino_encoder, self.device, dense=True)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._grid_features = GridFeatureCache()  # language grid features of the last query points
        self._view_index = view_evidence.ViewIndexCache()  # which keyframe sees them, for the views pass
        self._training_calls = 0  # `_step` calls that could change the weights (the cache's key)
        self.journal = None  # core/journal.Journal recording this engine (attach_journal); kept over reset
        # Queries scoring outside the lock, and the pyramid entries of keyframes evicted meanwhile (removed
        # once no query reads them: a freed slot may be refilled by another keyframe's features)
        self._readers_lock = threading.Lock()
        self._readers = 0
        self._steps_in_flight = 0  # engine.step calls that train, running now (a worker waiting counts)
        self._deferred_removals: list[tuple[ClipPyramid, int]] = []
        self._reset_state()
        warm_up_optimizers()  # its lazy imports would otherwise hold the lock for seconds at the first step

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        cfg = self.config
        self.selector = KeyframeSelector(cfg.keyframes)
        self.store = KeyframeStore(cfg.keyframes)
        self.pyramid = ClipPyramid(self.clip_encoder, cfg.pyramid, self.device)
        self.dense = DenseFeatureCache(self.dino_encoder, self.device)
        self._pending: collections.deque[int] = collections.deque()
        self._sources: dict[int, np.ndarray] = {}  # full-resolution images of pending keyframes
        self._kf_version = 0
        self._tensors: KeyframeTensors | None = None
        self._tensors_version = -1
        self.scene_box: SceneBox | None = None
        self._outside, self._outside_key = 0, None
        self._box_refits, self._box_checked_step = 0, 0
        # What the scene box came from: "given", "depth", "frusta" (not yet checked against rendered
        # surfaces), "frusta, checked" (they filled it) or "rendered" (tightened to them)
        self.box_source = ""
        self._last_refresh, self._refresh_cost = 0.0, 0.0
        self._last_train_s = 0.0  # seconds the last step call spent training (`_step`: features' share)
        self._last_merge, self._merge_cost = 0.0, 0.0
        self._last_train_time = -1e9
        self._depends, self._depends_key = False, None  # candidates need rendered depth (per kf version)
        self.model: LERFModel | None = None
        self.trainer: Trainer | None = None
        self._serving: LanguageSnapshot | None = None  # the queries' copy of the language field
        self._serving_key: tuple | None = None
        self._geometry = None  # the copy of the model candidate grids are rendered from (`_render_grids`)
        self._geometry_key: tuple | None = None
        self._generator = torch.Generator(device=self.device).manual_seed(0)
        self._losses: dict[str, float] = {}
        self._rays_per_s = 0.0
        self._last_error: str | None = None
        # Halved on each out-of-memory step (`_out_of_memory`); kept over box refits (new fields, same GPU)
        # until reset.
        self._rays_per_step = cfg.trainer.rays_per_step
        self._oom_events = 0
        self.candidates = candidates.CandidateCache(cfg.candidates, self.device)

    def reset(self) -> None:
        """Forget all frames, features and the model (encoders and config are kept); an attached journal is
        emptied too (under the lock: keyframe ids start again at 0, so the old entries must go first)."""
        with self.lock:
            self._reset_state()
            if self.journal is not None:
                self._journal_call(self.journal.clear)
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
    def add_frame(self, frame: Frame) -> AddResult:
        """Validate (ValueError, nothing changed), undistort, downsize, keyframe decision, queue features."""
        kf, source = prepare_frame_with_source(frame, self.config.ingest.max_image_side)  # no engine state
        # Any image size and intrinsics: keyframes of several cameras (``frame.camera``) train one map; the
        # selector judges each camera against its own last keyframe.
        with self.lock:
            self._remove_deferred()
            decision = self.selector.consider(kf)
            if not decision.accept:
                return AddResult(False, decision.reason, None)
            kf_id, evicted = self.store.add(kf)
            for old in evicted:
                self._evict(old)
            self._pending.append(kf_id)
            if source is not None:  # kept only until the keyframe's pyramid is cut from it
                self._sources[kf_id] = source
            self._kf_version += 1
            journal = self.journal
            if journal is not None:
                gen, stored = journal.generation, self.store.get(kf_id)
        if journal is not None:  # on disk before add_frame returns; written off the lock
            self._journal_call(journal.remove, gen, evicted)
            self._journal_call(journal.write_keyframe, gen, kf_id, stored)
            self._enforce_journal_budget()
        self._bump_data()
        return AddResult(True, decision.reason, kf_id)

    def _remove_deferred(self) -> None:
        """Remove the pyramid entries `_evict` kept for queries in flight, once none is. Caller holds the
        lock."""
        with self._readers_lock:
            if self._readers or not self._deferred_removals:
                return
            done, self._deferred_removals = self._deferred_removals, []
        for pyramid, kf_id in done:
            if kf_id not in self.store or pyramid is not self.pyramid:
                pyramid.remove(kf_id)

    def _evict(self, kf_id: int) -> None:
        self._sources.pop(kf_id, None)
        if kf_id in self._pending:
            self._pending.remove(kf_id)
        with self._readers_lock:
            if self._readers:  # a query outside the lock may read this keyframe's crops: not yet
                self._deferred_removals.append((self.pyramid, kf_id))
            else:
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
            self._remove_deferred()
            if not self._pending:
                return False
            kf_id = self._pending.popleft()
            image = self.store.get(kf_id).image
            source = self._sources.get(kf_id)
        key = self.pyramid.cache_key(image, source)
        try:
            size, grid = self.pyramid.compute(image, self.cancel_event, source)
            self.dense.add(kf_id, image, self.cancel_event)  # the dense cache's own store is thread-safe
        except (Cancelled, torch.cuda.OutOfMemoryError):
            # Nothing was stored: the keyframe waits for the next step (after out of memory: for the
            # worker's resume; the error reaches the status through ``step``).
            with self.lock.background():
                if kf_id in self.store:
                    self._pending.appendleft(kf_id)
            raise
        except ValueError as exc:
            # The encoders' outputs are checked (finite, shape, unit norm): NaN features would become NaN
            # targets. The keyframe is dropped, training goes on with the others.
            with self.lock.background():
                if kf_id in self.store:
                    self.store.remove(kf_id)
                    self._evict(kf_id)
                self._last_error = f"ValueError: keyframe {kf_id} dropped, its features failed: {exc}"
                journal = self.journal
                gen = None if journal is None else journal.generation
            if journal is not None:
                self._journal_call(journal.remove, gen, [kf_id])
            return True
        feats = None
        with self.lock.background():
            if kf_id in self.store:
                self.pyramid.insert(kf_id, size, grid, key)
                self._sources.pop(kf_id, None)
                self._kf_version += 1
                journal = self.journal
                if journal is not None:
                    gen, feats = journal.generation, journal.features_of(self, kf_id)
            else:
                self.dense.remove(kf_id)
        if feats is not None:
            self._journal_call(journal.write_features, gen, feats)
            self._enforce_journal_budget()
        return True

    def _derive_box(self) -> SceneBox:
        sc = self.config.scene
        frames = self.store.frames()
        if sc.box_min is not None:
            box = SceneBox(tuple(sc.box_min), tuple(sc.box_max))
            seen = (scene_region.inside_fraction(f, box, sc.max_range_m, sc.ground_z_m) > 0 for f in frames)
            if not any(seen):
                raise ValueError(f"no keyframe sees inside the scene box {sc.box_min} .. {sc.box_max} "
                                 f"(within {sc.max_range_m} m): check scene_box_min / scene_box_max and "
                                 f"the world frame")
            self.box_source = "given"
            return box
        self.box_source = "depth" if any(f.depth_m is not None for f in frames) else "frusta"
        return scene_region.derive_box(frames, sc.margin_m, sc.max_range_m, sc.ground_z_m)

    def _rendered_seen(self, min_step: int = 0, every: int = 1) -> dict[int, np.ndarray]:
        """Keyframe id -> world points (N, 3) of its rendered depth grid (every ``every``-th grid row and
        column), for keyframes without measured depth whose grid was rendered at ``min_step`` or later."""
        stride = self.config.candidates.pixel_stride
        grids = self.candidates.rendered_grids(min_step)
        return {i: candidates.lift_depth(self.store.get(i), stride * every, g[::every, ::every])
                for i, g in grids.items() if i in self.store and self.store.get(i).depth_m is None}

    def keyframes_outside_box(self) -> int:
        """Keyframes whose view mostly (> half of the frustum up to max_range_m / the ground) leaves the
        scene box: what they see there is modelled only coarsely, in the contracted region."""
        with self.lock:
            if self.scene_box is None:
                return 0
            # Judged once per keyframe set and box (this runs on the status path, under the lock), not
            # again at every refreshed grid.
            key = (self._kf_version, self.scene_box)
            if self._outside_key != key:
                sc = self.config.scene
                seen = self._rendered_seen(every=4) if self.box_source == "rendered" else {}
                # A box fitted to rendered surfaces is judged by them only: a frustum reaches max_range_m
                # whatever the room, so it would call every keyframe "outside" a tight box.
                judged = [(i, f) for i, f in zip(self.store.ids(), self.store.frames(), strict=True)
                          if self.box_source != "rendered" or f.depth_m is not None or i in seen]
                self._outside = sum(scene_region.inside_fraction(f, self.scene_box, sc.max_range_m,
                                                                 sc.ground_z_m, seen=seen.get(i)) < 0.5
                                    for i, f in judged)
                self._outside_key = key
            return self._outside

    def _ensure_model(self) -> None:
        if self.model is not None:
            return
        self.scene_box = self._derive_box()
        self._start_fields()

    def _start_fields(self) -> None:
        """New fields (and optimiser) in ``self.scene_box``."""
        self._build_model()
        self.candidates = candidates.CandidateCache(self.config.candidates, self.device)
        if self.config.model.language.standardise_clip:
            with self.pyramid.store.lock:
                grids = [self.pyramid.store.grid(i) for i in self._ready_ids()]
            self.model.language.set_clip_standardisation(torch.cat(grids).float().to(self.device))

    def _maybe_refit_box(self) -> None:
        """A live robot's box comes from its first keyframes. When, later, a keyframe's camera lies outside
        it or most keyframes look out of it, the fields start over in a box that also holds what they see
        (the keyframes and their features are kept; training restarts). Every REFIT_CHECK_STEPS steps
        (FRUSTA_CHECK_STEPS for a frustum box, which is tightened once TIGHTEN_MIN_STEPS are trained), at
        most MAX_BOX_REFITS times; never for a given box. Caller holds the lock."""
        sc = self.config.scene
        if not sc.refit or sc.box_min is not None or self.model is None or self._box_refits >= MAX_BOX_REFITS:
            return
        # A frustum box is tightened as soon as it may be (every step of fields in a box about to be
        # replaced is lost), not at the next multiple of REFIT_CHECK_STEPS.
        frusta = self._box_awaits_tightening
        tighten_due = frusta and self.train_step >= TIGHTEN_MIN_STEPS
        every = FRUSTA_CHECK_STEPS if frusta else REFIT_CHECK_STEPS
        if not tighten_due and self.train_step - self._box_checked_step < every:
            return
        self._box_checked_step = self.train_step
        if self._maybe_tighten_box():
            return
        frames = self.store.frames()
        # A camera outside the box means the robot has driven out of it: whatever the keyframes' views say
        # (a rendered test is biased there: fields trained in the old box put surfaces at its border).
        cams = np.stack([f.T_world_cam[:3, 3] for f in frames])
        cams_out = bool(np.any((cams < np.asarray(self.scene_box.min_xyz))
                               | (cams > np.asarray(self.scene_box.max_xyz))))
        if not cams_out and self.keyframes_outside_box() <= REFIT_OUTSIDE_FRACTION * len(frames):
            return
        old, source = self.scene_box, self.box_source
        new = self._derive_box()
        if source == "rendered":  # grow by what the keyframes render, not by their frusta
            new = scene_region.tightened_box(
                scene_region.derive_box(frames, sc.margin_m, sc.max_range_m, sc.ground_z_m),
                cams, list(self._rendered_seen().values()), sc.margin_m) or old
            self.box_source = source
        lo = np.minimum(old.min_xyz, new.min_xyz)
        hi = np.maximum(old.max_xyz, new.max_xyz)
        if np.allclose(lo, old.min_xyz, atol=0.05) and np.allclose(hi, old.max_xyz, atol=0.05):
            return
        self._refit(SceneBox(tuple(lo), tuple(hi)))

    def _refit(self, box: SceneBox) -> None:
        self.scene_box = box
        self._start_fields()
        self._box_refits += 1
        self._box_checked_step = 0

    @property
    def _box_awaits_tightening(self) -> bool:
        """A box from camera frusta not yet checked against the rendered surfaces (`_maybe_tighten_box`):
        the fields in it, and the candidate grids they render, will likely start over."""
        return self.box_source == "frusta"

    def _maybe_tighten_box(self) -> bool:
        """A box from camera frusta, cut down to the surfaces the model renders after TIGHTEN_MIN_STEPS
        (a coarse depth grid per keyframe, every TIGHTEN_STRIDE-th pixel: well under a second); True
        when the fields restarted in the tighter box (at most TIGHTEN_VOLUME of the volume)."""
        if not self._box_awaits_tightening or self.train_step < TIGHTEN_MIN_STEPS:
            return False
        frames = [f for f in self.store.frames() if f.depth_m is None]
        seen = [candidates.lift_depth(f, TIGHTEN_STRIDE, candidates.render_depth_grid(
            self.model, f, TIGHTEN_STRIDE, self.device)) for f in frames]
        cams = np.stack([f.T_world_cam[:3, 3] for f in self.store.frames()])
        tight = scene_region.tightened_box(self.scene_box, cams, seen, self.config.scene.margin_m)
        self.box_source = "frusta, checked"  # once: the frustum box stays when the surfaces fill it
        if tight is None or scene_region.box_volume(tight) > TIGHTEN_VOLUME * scene_region.box_volume(
                self.scene_box):
            return False
        self.box_source = "rendered"
        self._refit(tight)
        return True

    def _build_model(self, torch_modules: tuple[str, ...] = ()) -> None:
        """A fresh model and trainer. torch_modules: MLP paths to build with PyTorch whatever the config
        (a loaded map's MLPs that tinycudann cannot hold: ``checkpoint.portable_state``)."""
        model_cfg = self.config.model
        if self.device.type != "cuda":
            # "auto" picks tinycudann whenever CUDA is present, whatever the engine's device; its modules
            # cannot run on the CPU, so an explicit device="cpu" on a GPU machine would crash in step().
            model_cfg = _auto_to_torch(model_cfg)
        with torch.random.fork_rng(devices=[]):  # the same initial fields every run (reproducible maps)
            torch.manual_seed(0)
            model = LERFModel(model_cfg, self.scene_box, self.clip_encoder.dim, self.dino_encoder.dim)
            for path in torch_modules:
                as_torch(model, path)
            self.model = model.to(self.device)
        self.trainer = Trainer(self.model, self.config.trainer, self.device)

    def _keyframe_tensors(self, ids: list[int]) -> KeyframeTensors:
        """Training tensors of the ready keyframes, rebuilt only when the keyframe set changed."""
        key = (self._kf_version, tuple(ids))
        if self._tensors is None or self._tensors_version != key:
            self._tensors = KeyframeTensors.from_frames(ids, [self.store.get(i) for i in ids], self.device)
            self._tensors.salience = salience.cell_table(self.pyramid, ids, self.device)
            self._tensors_version = key
        return self._tensors

    def step(self, max_steps: int = 1) -> StepStats:
        """Compute pending keyframe features (bounded), then up to ``max_steps`` training steps."""
        t0 = time.perf_counter()
        training = max_steps > 0
        if training:
            with self._readers_lock:
                self._steps_in_flight += 1
        try:
            with _flushed_denormals(self.device.type == "cpu"):
                stats = self._step(max_steps, t0)
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, torch.cuda.OutOfMemoryError):  # features, candidate grids, evaluation
                self._last_error = f"{type(exc).__name__}: {oom_reason(exc)}"
                release_cuda_cache(exc)
            raise
        finally:
            if training:
                with self._readers_lock:
                    self._steps_in_flight -= 1
        self.checkpoint_journal()
        return stats

    def _step(self, max_steps: int, t0: float) -> StepStats:
        n_features = 0
        # pyramid_keyframes_per_step keyframes, and more while a backlog waits, for as long as the last
        # call trained: a keyframe without features is not trained on at all (`_ready_ids`), so while the
        # robot drives into new places they are worth as much as training steps.
        while (n_features < self.config.ingest.pyramid_keyframes_per_step
               or (max_steps > 0 and time.perf_counter() - t0 < self._last_train_s)):
            try:
                if not self._compute_features():
                    break
            except Cancelled:
                return StepStats(0, n_features, {}, time.perf_counter() - t0)
            n_features += 1
        if max_steps > 0:
            self._training_calls += 1
            with self.lock.background():
                self._maybe_refit_box()  # before training, so this call trains the new fields at once
        losses: dict[str, float] = {}
        start, rays_done = self.train_step, 0
        t_train = time.perf_counter()
        for _ in range(max_steps):
            if self.cancel_event.is_set():
                break
            with self.lock.background():  # gives way to a waiting query / add_frame / status / save
                ids = self._ready_ids()
                if len(ids) < self.config.ingest.min_keyframes:
                    break
                self._ensure_model()
                kf = self._keyframe_tensors(ids)
                rays = self._rays_per_step
                try:
                    # {} between reports (`TrainerConfig.log_every`): the step did not wait for the device
                    losses = self._train_step(kf, rays) or losses
                except NonFiniteStep as exc:  # this step ran; nothing of the non-finite ones was applied
                    rays_done += rays
                    self._nonfinite(exc)
                    continue
                except OutOfMemoryStep as exc:  # nothing applied; fewer rays from the next step on
                    self._out_of_memory(exc)
                    continue
                rays_done += rays
                self._last_train_time = time.perf_counter()  # a query during a long step(n) sees "training"
                if self.trainer.convergence.due(self.train_step):
                    try:
                        self.trainer.evaluate(kf, self._tensors_version)  # reports the steps first
                    except NonFiniteStep as exc:
                        self._nonfinite(exc)
        if self.trainer is not None and max_steps > 0:  # report what this call trained (status current)
            with self.lock.background():
                try:
                    losses = self.trainer.flush() or losses
                except NonFiniteStep as exc:
                    self._nonfinite(exc)
        done = max(0, self.train_step - start)  # skipped steps are not counted (the report corrected it)
        if done:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._last_train_s = time.perf_counter() - t_train
            self._rays_per_s = rays_done / max(self._last_train_s, 1e-9)
            self._losses = losses
            self._last_train_time = time.perf_counter()
            self._refresh_candidates()
        return StepStats(done, n_features, losses, time.perf_counter() - t0)

    def _nonfinite(self, exc: NonFiniteStep) -> None:
        """Steps found non-finite (skipped; counted and rolled back by the trainer, `Trainer.flush`): noted
        in ``last_error``; RuntimeError once ``max_nonfinite_in_row`` of them came in a row."""
        if exc.in_row >= self.config.trainer.max_nonfinite_in_row:
            raise RuntimeError(f"training diverged: {exc}") from exc
        self._last_error = f"NonFiniteStep: {exc}"

    def _train_step(self, kf: KeyframeTensors, rays: int) -> dict[str, float]:
        """Sample ``rays`` rays and take one optimisation step; running out of GPU memory in either raises
        `OutOfMemoryStep` (`Trainer.step`). Caller holds the lock."""
        lang = self.trainer.language_active
        try:
            batch = sample_ray_batch(kf, rays, self._generator, self.pyramid, self.dense,
                                     salience=self.config.trainer.salience, targets=lang)
        except torch.cuda.OutOfMemoryError as exc:
            reason = oom_reason(exc)
        else:
            return self.trainer.step(batch)
        raise self.trainer.out_of_memory(reason, rays)  # outside the except: the batch's tensors are freed

    def _out_of_memory(self, exc: OutOfMemoryStep) -> None:
        """Halve the rays per step after a step that ran out of GPU memory, and say so in ``last_error``.
        At the floor (``min_rays_per_step``), or when the step could not be undone, it is an error
        (RuntimeError): the worker stops in state "error" instead of failing step after step."""
        self._oom_events += 1
        floor = self.config.trainer.rays_floor
        smaller = halved_rays(exc.rays, floor)
        if exc.partial:
            raise RuntimeError(f"training stopped: {exc}") from exc
        if smaller is None:
            raise RuntimeError(f"training stopped: {exc}; already at the floor of {floor} rays per step "
                               f"(min_rays_per_step): free GPU memory or use a smaller preset") from exc
        self._rays_per_step = min(self._rays_per_step, smaller)
        self._last_error = (f"OutOfMemoryStep: {exc}; rays per step halved to {self._rays_per_step} "
                            f"(floor {floor}; kept until reset)")

    def evaluate_convergence(self) -> ConvergenceSignals:
        """Judge convergence now (normally every ``trainer.convergence.eval_every`` steps), e.g. at the end
        of a fixed step budget. Before any training: the empty signals."""
        with self.lock:
            ids = self._ready_ids()
            if self.trainer is None or self.train_step == 0 or len(ids) < self.config.ingest.min_keyframes:
                return self.convergence()
            return self.trainer.evaluate(self._keyframe_tensors(ids), self._tensors_version)

    def convergence(self) -> ConvergenceSignals:
        """The last convergence judgement (`core/training/convergence.py`); empty before the first
        evaluation."""
        with self.lock:
            return ConvergenceSignals() if self.trainer is None else self.trainer.convergence.signals

    def usable(self) -> bool:
        """The map has converged (held-out colour, multi-view depth and language loss; see
        `core/training/convergence.py`). Queries are answered before that (``ready``), from a map still
        converging."""
        return self.convergence().usable

    def _refresh_candidates(self) -> None:
        """Keep query candidates current: rendered keyframe depth grids, the stalest first
        (`CandidateCache.refresh`), then their merge into the candidate set (`CandidateCache.merge_job`, run
        outside the lock), each spending ~REFRESH_FRACTION of the wall time, so that a query during training
        neither renders nor merges."""
        self._render_grids()
        now = time.perf_counter()
        if (now - self._last_merge) * REFRESH_FRACTION / (1.0 - REFRESH_FRACTION) < self._merge_cost:
            return
        with self.lock.background():
            cache = self.candidates
            job = cache.merge_job(self._kf_version, self.store.ids(), self.store.frames(), self.train_step)
        if job is None:
            return
        cset = job()
        with self.lock.background():
            if self.candidates is cache:  # not replaced meanwhile (a box refit starts new fields)
                cache.install(cset, job.key)
        self._last_merge = time.perf_counter()
        self._merge_cost = self._last_merge - now

    def _grids_depend_on_model(self) -> bool:
        """Whether some keyframe's candidate grid is rendered (no depth, or holes in it): every depth image
        scanned once per keyframe set. Caller holds the lock."""
        if self._depends_key != self._kf_version:
            self._depends = candidates.depends_on_model(self.store.frames(),
                                                        self.config.candidates.pixel_stride)
            self._depends_key = self._kf_version
        return self._depends

    def _render_grids(self) -> None:
        """`_refresh_candidates`' grids: ~REFRESH_FRACTION of the wall time, the lock taken per grid."""
        now = time.perf_counter()
        with self.lock.background():
            if not self._grids_depend_on_model():  # measured depth everywhere: nothing to render
                self._last_refresh = now
                return
            urgent = (self.candidates is not None and self.train_step >= URGENT_MIN_STEPS
                      and not self._box_awaits_tightening
                      and self.candidates.urgent(self.store.ids(), self.train_step, URGENT_AGE_RATIO))
        share = URGENT_REFRESH_FRACTION if urgent else REFRESH_FRACTION
        # Grids this call may render: the wall time since the last refresh, times the share it may take,
        # over the cost of one grid (at most MAX_REFRESH_GRIDS per call; the lock is taken per grid).
        budget = (now - self._last_refresh) * share / (1.0 - share)
        n = min(int(budget / max(self._refresh_cost, 1e-6)), MAX_REFRESH_GRIDS)
        if n < 1:
            return
        for _ in range(n):
            with self.lock.background():
                if self.model is None or not self._grids_depend_on_model():
                    break
                cache, step = self.candidates, self.train_step
                todo = cache.stale(self.store.ids(), step)
                if not todo:
                    break
                kf_id, kf = todo[0], self.store.get(todo[0])
                t = time.perf_counter()
                model = self._geometry_model()
                if model is None:  # no copy (tinycudann): rendered under the lock, as the model itself
                    cache.put_grid(kf_id, cache.depth_grid(kf, step, self.model))
                    self._refresh_cost = time.perf_counter() - t
                    continue
            # Rendered from the copy outside the lock (seconds for a large keyframe on a CPU): queries,
            # frames and status go on meanwhile; a keyframe evicted or fields restarted meanwhile drop it.
            grid = cache.depth_grid(kf, step, model)
            with self.lock.background():
                if self.candidates is cache and kf_id in self.store:
                    cache.put_grid(kf_id, grid)
            self._refresh_cost = time.perf_counter() - t
        self._last_refresh = time.perf_counter()

    def _geometry_model(self):
        """The copy of the model that candidate grids are rendered from outside the lock
        (`model.geometry_snapshot`), made again once the weights may have changed; None when the model
        cannot be copied. Caller holds the lock."""
        key = (id(self.model), self.train_step, self._training_calls)
        if self._geometry_key != key:
            self._geometry = geometry_snapshot(self.model)
            self._geometry_key = key
        return self._geometry

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
              with_cloud: bool = True, max_results: int = 1) -> QueryResult:
        """Locate ``text`` in the world frame (see `core.language.query.locate`): up to ``max_results``
        targets whose confidence reaches ``threshold`` (default ``config.query.threshold``). Empty text, a
        threshold outside [0, 1] or max_results outside [1, 100] -> ValueError.

        Before the language field has trained, keyframes with measured depth still give an answer from
        their own crop embeddings (``source="views"``, `core.language.view_evidence`)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"query text must be a non-empty string, got {text!r}")
        if isinstance(negatives, str):
            raise ValueError(f"negatives must be a sequence of strings, got the string {negatives!r}")
        text = text.strip()
        negs = negative_texts(negatives)
        qcfg = self.config.query
        competitors = list(dict.fromkeys([*qcfg.vocabulary, *negs[len(CANONICAL_NEGATIVES):]]))
        with self.lock:
            field_ready = self.ready()
            ready_ids = self._ready_ids()
            frames = self.store.frames()
            views_only = (not field_ready and len(ready_ids) >= self.config.ingest.min_keyframes
                          and not candidates.needs_rendered_depth(frames))
            step = self.train_step
            if not field_ready and not views_only:
                pending = len(self._pending)
                return _empty_result(
                    f"no model yet: {len(ready_ids)} keyframes with features "
                    f"(need {self.config.ingest.min_keyframes}), {pending} pending, "
                    f"step {step}", step)
            embeds = self._text_embeds([text, *negs, *competitors])
            # While training runs, the worker makes the rendered grids (`_refresh_candidates`) and a query
            # leaves out keyframes it has not reached; an idle engine (a loaded map) renders them here.
            # (a step call in flight counts: a worker waiting for the lock behind a query storm is training,
            # and a query that then merged or rendered under the lock would hold it off longer still)
            training = (self._steps_in_flight > 0
                        or time.perf_counter() - self._last_train_time < TRAINING_ACTIVE_S)
            points, rgb, views = self._candidate_points(render_missing=not training, merge=not training)
            cset = self.candidates.current
            fracs = self.config.pyramid.tile_fracs
            scale_range = None if cset.footprint is None else cset.footprint * np.array([fracs[0], fracs[-1]])
            if self.scene_box is not None:
                # Outside the box the fields are coarse (contracted space) and rendered depth there is
                # mostly floaters: such points are not scored.
                lo = torch.tensor(self.scene_box.min_xyz, device=points.device)
                hi = torch.tensor(self.scene_box.max_xyz, device=points.device)
                inside = ((points >= lo) & (points <= hi)).all(dim=1)
                views = torch.where(inside, views, torch.zeros_like(views))
            kfs = [(i, self.store.get(i)) for i in ready_ids]
            n_neg, ccfg, pyramid = len(negs), self.config.candidates, self.pyramid
            refine = self._refine_fn(cset, kfs, embeds[0], embeds[1:1 + len(CANONICAL_NEGATIVES)])
            # The scoring below reads a copy of the language field and this keyframe set (their pyramid
            # entries stay until the query ends, `_evict`), so it runs outside the lock: training, frames
            # and other queries go on meanwhile. A field that cannot be copied is read under the lock.
            language = None if views_only else self._serving_language()
            hold = language is None and not views_only
            if hold:
                self.lock.acquire()  # held on through the scoring (released in the finally below)
            with self._readers_lock:
                self._readers += 1
        try:
            def run(from_views: bool, report_rejected: bool = True) -> QueryResult:
                if from_views:
                    embed_fn = view_evidence.views_embed_fn(cset, kfs, pyramid, ccfg,
                                                            index_cache=self._view_index)
                    rel_fn = view_evidence.views_relevancy_fn(cset, kfs, pyramid, ccfg, embeds[0],
                                                              embeds[1:1 + n_neg], qcfg.temperature,
                                                              index_cache=self._view_index)
                else:
                    source = language
                    if source is None:
                        self.model.eval()
                        source = self.model
                    embed_fn = multiscale_embed_fn(source, qcfg.scales_m, cache=self._grid_features,
                                                   version=(step, self._training_calls))
                    rel_fn = None
                return locate(points, rgb, views, embed_fn, embeds[0], embeds[1:1 + n_neg], qcfg, threshold,
                              with_cloud, scale_range=scale_range, query_text=text,
                              competitor_embeds=embeds[1 + n_neg:], competitor_names=competitors,
                              canonical_count=len(CANONICAL_NEGATIVES),
                              view_fn=view_evidence.view_fn(cset, kfs, pyramid, ccfg,
                                                            index_cache=self._view_index),
                              refine_fn=refine,
                              relevancy_fn=rel_fn, max_results=max_results,
                              report_rejected=report_rejected)

            result = run(views_only)
            from_views = views_only
            if not result.found and not views_only and qcfg.views_fallback:
                # The field may not have learnt an object its keyframes' crops show (few rays on a small
                # or dark object): the views are searched on their own, with the same existence tests
                # (only a found answer is used: candidates that cannot reach the threshold are not scored).
                alt = run(True, report_rejected=False)
                if alt.found:
                    result, from_views = alt, True
        finally:
            with self._readers_lock:
                self._readers -= 1
            if hold:
                self.lock.release()
        message = result.message
        if views_only:
            message += " [from keyframe views only: the language field has not trained yet]"
        else:
            if from_views:
                message += " [from keyframe views: the language field does not show it]"
            conv = self.convergence()
            if not conv.usable:
                message += (f" [map still converging: progress {100 * conv.progress:.0f} %, step "
                            f"{step}]")
        return dataclasses.replace(result, model_step=step, message=message,
                                   source="views" if from_views else "field")

    def warm_up_queries(self) -> float:
        """Build what an idle map's queries reuse (`GridFeatureCache`: the language grids' features and
        multiscale embeddings of the candidate points; `view_evidence.ViewIndexCache`: which keyframe sees
        them where) with one query for a canonical phrase, answer discarded, so that the first real query
        after a load does not pay for them (seconds otherwise). Returns the seconds it took; 0 without a
        model."""
        if not self.ready():
            return 0.0
        t = time.perf_counter()
        self.query(CANONICAL_NEGATIVES[0], with_cloud=False)  # stands out nowhere: the views pass runs too
        return time.perf_counter() - t

    def _serving_language(self) -> LanguageSnapshot | None:
        """The copy of the language field that queries read outside the lock (`LanguageSnapshot`), made
        again once the weights may have changed; None when the field cannot be copied. Caller holds the
        lock. Each copy is new, never refilled: a query still reading the previous one keeps it whole."""
        key = (id(self.model), self.train_step, self._training_calls)
        if self._serving_key != key:
            self._serving = LanguageSnapshot.of(self.model)
            self._serving_key = key
        return self._serving

    def _refine_fn(self, cset, kfs, text: torch.Tensor, canon: torch.Tensor):
        """`view_evidence.refine_fn` within the scene box; None when switched off. It runs with measured
        depth too: a cluster of measured surface points is centred on the side the cameras saw, 0.1-0.2 m
        off a table object's centre, and the views' agreement places it within a few centimetres (RGB-D
        rooms in bench/RESULTS.md, eighth landing)."""
        qcfg = self.config.query
        if qcfg.refine_radius_m <= 0:
            return None
        box = None if self.scene_box is None else (np.asarray(self.scene_box.min_xyz, dtype=np.float64),
                                                   np.asarray(self.scene_box.max_xyz, dtype=np.float64))
        return view_evidence.refine_fn(cset, kfs, self.pyramid, self.config.candidates, text, canon,
                                       qcfg.temperature, qcfg.refine_radius_m, qcfg.refine_step_m, box=box,
                                       window_m=qcfg.triangulate_window_m,
                                       ground_z=self.config.scene.ground_z_m)

    def _candidate_points(self, render_missing: bool = True, merge: bool = True) -> tuple[torch.Tensor, ...]:
        """Query candidates (`core.language.candidates`): points (P, 3) float32 world, rgb (P, 3) uint8,
        views (P,) int64 on the device. render_missing=False / merge=False (a query during training):
        keyframes whose rendered grid the training worker has not made yet are left out instead of rendered
        now, and the set the worker merged last serves (`_refresh_candidates`)."""
        return self.candidates.get(self._kf_version, self.store.ids(), self.store.frames(), self.train_step,
                                   self.model, render_missing, merge)

    # ------------------------------------------------------------------ journal (core/journal.py)
    def attach_journal(self, journal) -> None:
        """Record into ``journal`` from now on (None: stop recording). What the engine holds already is
        written first (keyframes, features, model), except what ``journal.resume`` put into this engine."""
        if journal is None:
            with self.lock:
                self.journal = None
            return
        journal.begin(self)
        with self.lock:
            self.journal = journal
            snap = journal.snapshot(self)
        self._journal_call(journal.write_snapshot, snap)
        self._enforce_journal_budget()

    def checkpoint_journal(self, force: bool = False) -> bool:
        """Checkpoint the model into the attached journal when ``interval_s`` has passed since the last one
        (or now, ``force``): copied under the lock, written off it. True when one was written."""
        journal = self.journal
        if journal is None or self.trainer is None or not (force or journal.checkpoint_due()):
            return False
        with self.lock:
            if self.journal is not journal or self.model is None:
                return False
            gen, state = journal.generation, journal.model_state_of(self)
            journal.mark_checkpoint_time()
        ok = self._journal_call(journal.write_checkpoint, gen, state)
        self._enforce_journal_budget()
        return ok

    def _journal_call(self, fn, *args) -> bool:
        """A journal write; a failing disk is reported (last_error), never fatal to ingest or training."""
        try:
            fn(*args)
            return True
        except OSError as exc:
            self._last_error = f"journal: {type(exc).__name__}: {exc}"
            return False

    def _enforce_journal_budget(self) -> None:
        """Evict keyframes (the store's own rule) while the journal exceeds ``max_mb``; never below
        ``min_keyframes``, which would stop training (reported in last_error instead)."""
        journal = self.journal
        while journal is not None and journal.over_budget():
            with self.lock:
                if self.journal is not journal:
                    return
                if len(self.store) <= max(1, self.config.ingest.min_keyframes):
                    self._last_error = (f"journal: {journal.bytes_used} bytes exceed journal_max_mb "
                                        f"({journal.config.max_mb} MiB) with {len(self.store)} keyframes "
                                        f"left; raise journal_max_mb")
                    return
                victim = self.store.evict_redundant()
                self._evict(victim)
                # Under the lock (rare; two unlinks): budget checks from two threads must not both evict.
                self._journal_call(journal.remove, journal.generation, [victim])

    # ------------------------------------------------------------------ maps on disk
    def save(self, path) -> None:
        """Write a map directory (``core/checkpoint.py``), a consistent snapshot taken under the lock."""
        with self.lock:
            checkpoint.save_engine(self, path)

    @classmethod
    def load(cls, path, device: str = "auto") -> LERFEngine:
        """A new engine from a map directory or a journal (`core/journal.py`: only its valid entries);
        ValueError naming the file, nothing half-loaded."""
        if journal_mod.is_journal(path):
            return journal_mod.load_engine(cls, path, device)[0]
        return checkpoint.load_engine(cls, path, device)

    # ------------------------------------------------------------------ status
    def status(self) -> EngineStatus:
        with self.lock:
            alloc = peak = reserved = 0.0
            if self.device.type == "cuda":
                alloc = torch.cuda.memory_allocated(self.device) / 2**20
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                reserved = torch.cuda.memory_reserved(self.device) / 2**20
            return EngineStatus(
                step=self.train_step, keyframes=len(self.store), keyframes_pending=len(self._pending),
                losses=dict(self._losses), rays_per_s=self._rays_per_s, gpu_mem_allocated_mb=alloc,
                gpu_mem_peak_mb=peak, last_error=self._last_error, ready=self.ready(),
                keyframes_outside_box=self.keyframes_outside_box(),
                scene_box=None if self.scene_box is None else (self.scene_box.min_xyz,
                                                               self.scene_box.max_xyz),
                scene_box_source=self.box_source,
                clip_encoder=self.clip_encoder.name, dino_encoder=self.dino_encoder.name,
                demo_encoders=is_demo_encoder(self.clip_encoder) or is_demo_encoder(self.dino_encoder),
                convergence=self.convergence(),
                nonfinite_steps=0 if self.trainer is None else self.trainer.nonfinite_steps,
                restores=0 if self.trainer is None else self.trainer.restores,
                oom_events=self._oom_events, rays_per_step=self._rays_per_step,
                journal_bytes=0 if self.journal is None else self.journal.bytes_used,
                journal_skipped=0 if self.journal is None else self.journal.skipped,
                gpu_mem_reserved_mb=reserved, device=str(self.device),
                keyframes_by_camera=dict(collections.Counter(f.camera for f in self.store.frames())),
                backends="" if self.model is None else describe_backends(self.model))


def _empty_result(message: str, step: int) -> QueryResult:
    return QueryResult(found=False, message=message, location_world=None, relevancy=0.0, scale_m=0.0,
                       cloud_xyz=np.zeros((0, 3), np.float32), cloud_relevancy=np.zeros(0, np.float32),
                       cloud_rgb=np.zeros((0, 3), np.uint8), model_step=step)
