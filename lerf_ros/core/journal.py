"""Crash-safe recording: the journal an engine writes as it learns, resumed after a crash.

A journal directory holds:

``journal.json``    manifest: format + version, the `EngineConfig` as a dict, the encoder names, and the
                    SHA-256 of that content. It makes the directory a journal (``is_journal``) and gives
                    ``load_engine`` the config to build an engine from (a journal is also a map).
``kf-<id>.entry``   one keyframe, written when ``add_frame`` accepts it, before it returns: the keyframe
                    store's arrays (``KeyframeStore.to_arrays`` layout) for this keyframe alone; depth only
                    when measured.
``ft-<id>.entry``   its language targets once computed: one-keyframe ``state_dict``s of the CLIP pyramid
                    and the DINO cache, and the content hash of the image they were computed from.
``model.entry``     the model + optimiser checkpoint, every ``interval_s`` of training: weights, trainer
                    state (step, optimisers, convergence), the scene box and what it came from, and the
                    keyframe ids held when it was taken.
``kf-<id>.gone``    empty marker: keyframe <id> was evicted after the last checkpoint, so that an entry
                    file the checkpoint lists can be told missing (lost) from evicted. Pruned at the next
                    checkpoint.

Every ``*.entry`` is a header (magic, payload length, SHA-256 of the payload) and the payload (npz, or a
torch file read with ``weights_only``). Writes are atomic: the bytes go to a ``*.tmp`` file, which is
fsync'ed (``checkpoint.write_synced``) and renamed over the entry under the journal's lock, only if the
entry is still wanted (not evicted, no reset since), then the directory is fsync'ed.

Resume (``Journal.resume``) reads every entry and uses only what validates: a truncated, bit-flipped,
half-written (``*.tmp``), foreign or missing entry is skipped and counted in ``ResumeReport.skipped``
(``"file: reason"``), never fatal and never used. A keyframe whose features are skipped is computed again;
a skipped checkpoint means training starts again from step 0 on the resumed keyframes. What does not fit the
engine at all (other encoders, another model config, more keyframes than ``max_keyframes``) is a ValueError
naming the file, and the engine is left empty.

The engine (``LERFEngine.attach_journal``) calls the journal from narrow hooks: keyframe accepted, keyframes
evicted, features ready, after a ``step`` call (checkpoint when ``interval_s`` has passed), reset. It takes
what they write under its lock (references to immutable keyframes, copies of tensors) and writes after
releasing it. The disk limit ``max_mb`` is met by evicting keyframes with the store's own rule
(``KeyframeStore.evict_redundant``), as ``max_keyframes`` is.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .frames.frame import Frame
from .frames.keyframes import KeyframeStore, pad_keyframe_arrays
from .language.dense_features import DenseFeatureCache
from .language.pyramid import ClipPyramid

FORMAT_NAME = "lerf_ros-journal"
FORMAT_VERSION = 1
MANIFEST = "journal.json"
MODEL = "model.entry"
#: Entry header: magic + 8-byte little-endian payload length + 64 hex digits of the payload's SHA-256.
MAGIC = b"LRFJ1\n"
_HEADER = len(MAGIC) + 8 + 64
_ENTRY_RE = re.compile(r"^(kf|ft)-(\d{9})\.entry$")
_GONE_RE = re.compile(r"^kf-(\d{9})\.gone$")
#: Temporary files of this journal's writes (``<name>.<thread>.tmp``); nothing else is ever deleted here.
_TMP_RE = re.compile(r"^(journal\.json|model\.entry|(kf|ft)-\d{9}\.entry)\.\d+\.tmp$")


@dataclass(frozen=True)
class JournalConfig:
    """dir: the journal directory (created when missing); interval_s: training time between model
    checkpoints, s; max_mb: disk bound of the journal, MiB (keyframes are evicted to meet it)."""

    dir: str
    interval_s: float = 30.0
    max_mb: float = 2048.0

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir.strip():
            raise ValueError(f"JournalConfig.dir must be a non-empty path, got {self.dir!r}")
        for key in ("interval_s", "max_mb"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"JournalConfig.{key} must be a finite number > 0, got {v!r}")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)


@dataclass(frozen=True)
class ResumeReport:
    """What ``Journal.resume`` gave the engine: keyframes, how many of them with features, the resumed
    training step (0 = no checkpoint), and ``skipped``: "file: reason" for every entry not used."""

    keyframes: int = 0
    features: int = 0
    step: int = 0
    skipped: tuple[str, ...] = ()

    def summary(self) -> str:
        text = (f"{self.keyframes} keyframes ({self.features} with features), "
                f"{'model at step ' + str(self.step) if self.step else 'no model checkpoint'}")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} damaged entries: " + "; ".join(self.skipped[:5])
            if len(self.skipped) > 5:
                text += f"; ... ({len(self.skipped) - 5} more)"
        return text


def kf_name(kf_id: int) -> str:
    return f"kf-{int(kf_id):09d}.entry"


def ft_name(kf_id: int) -> str:
    return f"ft-{int(kf_id):09d}.entry"


def gone_name(kf_id: int) -> str:
    return f"kf-{int(kf_id):09d}.gone"


def is_journal(path) -> bool:
    """A directory with a journal manifest, or with journal entries (whose manifest is then missing)."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        return True
    return root.is_dir() and any(_ENTRY_RE.match(p.name) or p.name == MODEL for p in root.iterdir())


# ---------------------------------------------------------------------- entry files
def pack(payload: bytes) -> bytes:
    """An entry file's bytes: header (magic, length, SHA-256) + payload."""
    return MAGIC + len(payload).to_bytes(8, "little") + checkpoint.sha256_hex(payload).encode() + payload


def unpack(blob: bytes, file) -> bytes:
    """The payload of an entry file's bytes; ValueError naming ``file`` and what is wrong."""
    if len(blob) < _HEADER or not blob.startswith(MAGIC):
        raise ValueError(f"{file}: not a journal entry (no header; {len(blob)} bytes)")
    n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
    payload = blob[_HEADER:]
    if len(payload) < n:
        raise ValueError(f"{file}: truncated ({len(payload)} of {n} payload bytes)")
    if len(payload) > n:
        raise ValueError(f"{file}: {len(payload) - n} bytes past the end of the entry")
    if checkpoint.sha256_hex(payload) != blob[len(MAGIC) + 8:_HEADER].decode("ascii", "replace"):
        raise ValueError(f"{file}: checksum mismatch (corrupted)")
    return payload


def entry_arrays(kf_id: int, frame: Frame) -> dict[str, np.ndarray]:
    """One keyframe in the ``KeyframeStore.to_arrays`` layout (N = 1); ``depth_m`` only when measured."""
    intr = frame.intrinsics
    arrays = {
        "ids": np.array([kf_id], dtype=np.int64),
        "images": np.asarray(frame.image, dtype=np.uint8)[None],
        "T_world_cam": np.asarray(frame.T_world_cam, dtype=np.float64)[None],
        "stamps_ns": np.array([frame.stamp_ns], dtype=np.int64),
        "intrinsics": np.array([[intr.width, intr.height, intr.fx, intr.fy, intr.cx, intr.cy]], np.float64),
        "has_depth": np.array([frame.depth_m is not None]),
        "next_id": np.array(kf_id + 1, dtype=np.int64),
        "cameras": np.array([frame.camera], dtype=str),
    }
    if frame.depth_m is not None:
        arrays["depth_m"] = np.asarray(frame.depth_m, dtype=np.float32)[None]
    return arrays


def _read_keyframe(blob: bytes, file: Path, kf_id: int, config) -> dict[str, np.ndarray]:
    """Validated one-keyframe arrays of a ``kf-<id>.entry`` (ValueError naming the file otherwise)."""
    arrays = checkpoint.read_npz(unpack(blob, file), file)
    images, has_depth = arrays.get("images"), arrays.get("has_depth")
    if images is None or has_depth is None or images.ndim != 4 or has_depth.shape != (1,):
        raise ValueError(f"{file}: not a keyframe entry (arrays {sorted(arrays)})")
    if "depth_m" not in arrays and not bool(has_depth[0]):
        arrays["depth_m"] = np.zeros(images.shape[:3], np.float32)
    ids = arrays.get("ids")
    if ids is None or ids.shape != (1,) or int(ids[0]) != kf_id:
        raise ValueError(f"{file}: holds keyframe ids {None if ids is None else ids.tolist()}, not [{kf_id}]")
    try:
        KeyframeStore.from_arrays(config, arrays)  # shapes, dtypes, ids, a valid frame
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc
    return arrays


def _check_model(obj, file: Path) -> dict:
    """Structure of a ``model.entry``; the weights' fit to the model is checked when they are loaded."""
    keys = ("model", "trainer", "step", "scene_box", "box_source", "box_refits", "box_checked_step",
            "keyframe_ids", "next_id")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise ValueError(f"{file}: not a model checkpoint")
    if not isinstance(obj["model"], dict) or not obj["model"] or \
            not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise ValueError(f"{file}: no model state dict")
    box = np.asarray(obj["scene_box"], dtype=np.float64)
    if box.shape != (2, 3) or not np.all(np.isfinite(box)) or not np.all(box[1] > box[0]):
        raise ValueError(f"{file}: invalid scene_box {obj['scene_box']}")
    if not isinstance(obj["trainer"], dict) or int(obj["trainer"].get("step_count", -1)) != int(obj["step"]):
        raise ValueError(f"{file}: trainer state does not match step {obj['step']}")
    obj["backends"] = checkpoint.check_backends(obj.get("backends"), file)  # None: written before recorded
    return obj


def _cache_meta(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "keyframes"}


def read_manifest(root: Path) -> dict:
    """The validated manifest of journal ``root``; ValueError naming the file otherwise."""
    file = root / MANIFEST
    if not file.is_file():
        raise ValueError(f"{file}: missing (not a lerf_ros journal, or its manifest was deleted)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON (truncated or foreign file): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{file}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {manifest.get('version')!r}, this code reads "
                         f"version {FORMAT_VERSION}")
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    if manifest.get("sha256") != checkpoint.sha256_hex(json.dumps(body, sort_keys=True).encode()):
        raise ValueError(f"{file}: checksum mismatch (corrupted or edited)")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("encoders"), dict):
        raise ValueError(f"{file}: missing config or encoders")
    return manifest


def load_engine(cls, path, device: str = "auto"):
    """A journal as a map: (a new ``cls`` engine with everything valid in it, its `ResumeReport`). The
    engine is built from the journal's recorded config; ValueError naming the file when the manifest is
    bad or the entries do not fit it. Reads only: the journal is not changed."""
    root = Path(path)
    manifest = read_manifest(root)
    engine = checkpoint.engine_for_config(cls, manifest["config"], device, root / MANIFEST)
    report = Journal(JournalConfig(str(root))).resume(engine)
    return engine, report


# ---------------------------------------------------------------------- the journal
class Journal:
    """One journal directory (module docstring): resume from it, then record an engine into it.

    Thread-safe: the engine's ingest thread (keyframes), training thread (features, checkpoints) and
    service threads (reset, attach) call it at once; ``_lock`` guards the bookkeeping and every rename
    and deletion, never a serialisation or fsync.
    """

    def __init__(self, config: JournalConfig):
        self.config = config
        self.root = Path(config.dir)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # files the journal vouches for (valid, or written by it) -> bytes
        self._gone: set[int] = set()  # keyframes evicted in this generation: late writes for them dropped
        self._generation = 0  # bumped by clear(): writes snapshotted before it are dropped
        self._last_checkpoint = time.monotonic()
        self._resumed_into = None  # weakref to the engine resume() filled
        self._unused: list[int] = []  # keyframes the checkpoint lists that resume could not use
        self._meta: dict[str, dict] = {}  # the caches' state metadata (encoder, settings), set by begin()
        self.skipped = 0  # entries skipped by resume()
        self.write_errors = 0

    # ------------------------------------------------------------------ figures
    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    @property
    def bytes_used(self) -> int:
        """Bytes of the journal's files on disk (manifest, entries, checkpoint)."""
        with self._lock:
            return sum(self._sizes.values())

    def over_budget(self) -> bool:
        return self.bytes_used > self.config.max_bytes

    def checkpoint_due(self) -> bool:
        with self._lock:
            return time.monotonic() - self._last_checkpoint >= self.config.interval_s

    # ------------------------------------------------------------------ resume
    def resume(self, engine) -> ResumeReport:
        """Fill a fresh ``engine`` with everything valid in the journal (module docstring); the files are
        only read. An empty report when the directory is not a journal."""
        if not is_journal(self.root):
            return ResumeReport()
        if len(engine.store) or engine.model is not None:
            raise ValueError("a journal is resumed into a fresh engine only (no keyframes, no model)")
        skipped: list[str] = []
        try:
            manifest = read_manifest(self.root)
        except ValueError as exc:  # entries carry their own checks: resumed without it
            skipped.append(str(exc).replace(str(self.root) + os.sep, ""))
        else:
            checkpoint.check_encoders(engine, manifest["encoders"], self.root / MANIFEST)
        try:
            report, data, valid, ckpt = self._read(engine, skipped)
            files = {"manifest": self.root / MANIFEST, "weights": self.root / MODEL,
                     "keyframes": self.root / "kf-*.entry", "features": self.root / "ft-*.entry"}
            checkpoint.fill_engine(engine, data, files)
            if ckpt is not None:
                engine.box_source = str(ckpt["box_source"])
                engine._box_refits = int(ckpt["box_refits"])
                engine._box_checked_step = int(ckpt["box_checked_step"])
        except Exception:
            engine._reset_state()  # nothing half-loaded
            raise
        with self._lock:
            self._sizes = valid
            listed = set() if ckpt is None else {int(i) for i in ckpt["keyframe_ids"]}
            self._unused = sorted(listed - set(engine.store.ids()))
            self._resumed_into = weakref.ref(engine)
            self.skipped += len(report.skipped)
        return report

    def _read(self, engine, skipped: list[str]):
        """(report, MapData, {valid file: bytes}, checkpoint or None) from the
        directory's entries; ``skipped`` collects "file: reason" of the entries not used."""
        cfg = engine.config.keyframes
        keyframes: dict[int, dict] = {}
        features: dict[int, dict] = {}
        seen_ids, seen_kf, gone = set(), set(), set()
        valid: dict[str, int] = {}
        ckpt = None
        names = sorted(os.listdir(self.root))
        for name in names:
            file = self.root / name
            m = _ENTRY_RE.match(name)
            if _TMP_RE.match(name):
                skipped.append(f"{name}: half-written (its write was interrupted)")
            elif m is not None:
                kf_id = int(m.group(2))
                seen_ids.add(kf_id)
                if m.group(1) == "kf":
                    seen_kf.add(kf_id)
                try:
                    blob = file.read_bytes()
                    if m.group(1) == "kf":
                        keyframes[kf_id] = _read_keyframe(blob, file, kf_id, cfg)
                    else:
                        features[kf_id] = checkpoint.torch_load(unpack(blob, file), file)
                    valid[name] = len(blob)
                except Exception as exc:  # foreign content may raise anything: the entry is skipped, named
                    skipped.append(_short(exc, self.root))
            elif _GONE_RE.match(name):
                gone.add(int(_GONE_RE.match(name).group(1)))
            elif name == MODEL:
                try:
                    blob = file.read_bytes()
                    ckpt = _check_model(checkpoint.torch_load(unpack(blob, file), file), file)
                    valid[name] = len(blob)
                except Exception as exc:  # as above
                    skipped.append(_short(exc, self.root))
            elif name == MANIFEST:
                valid[name] = file.stat().st_size
        clip, dino, good_features = self._check_features(engine, keyframes, features, valid, skipped)
        ids = sorted(keyframes)
        if ckpt is not None:
            missing = sorted(set(int(i) for i in ckpt["keyframe_ids"]) - seen_kf - gone)
            skipped.extend(f"{kf_name(i)}: missing (listed by the checkpoint, not evicted)" for i in missing)
        next_id = max([*(i + 1 for i in seen_ids | gone), 0, int(ckpt["next_id"]) if ckpt else 0])
        data = checkpoint.MapData(
            config=engine.config.to_dict(),
            encoders={"clip": engine.clip_encoder.name, "dino": engine.dino_encoder.name},
            step=0 if ckpt is None else int(ckpt["step"]),
            scene_box=None if ckpt is None else np.asarray(ckpt["scene_box"], np.float64),
            model_state={} if ckpt is None else ckpt["model"],
            trainer_state=None if ckpt is None else ckpt["trainer"],
            backends=None if ckpt is None else ckpt["backends"],
            keyframes=_stack([keyframes[i] for i in ids], next_id),
            features={"hashes": {}, "caches": {"clip": clip, "dino": dino}},
        )
        report = ResumeReport(len(ids), good_features, data.step, tuple(skipped))
        return report, data, valid, ckpt

    def _check_features(self, engine, keyframes, features, valid, skipped):
        """Merged cache states of the feature entries that are valid for a valid keyframe (each one loaded
        alone into a scratch cache: shapes, finiteness, encoder and crop settings)."""
        scratch_clip, scratch_dino = _scratch_caches(engine)
        clip = {**_cache_meta(scratch_clip.state_dict()), "keyframes": {}}
        dino = {**_cache_meta(scratch_dino.state_dict()), "keyframes": {}}
        for kf_id, obj in sorted(features.items()):
            name = ft_name(kf_id)
            try:
                if kf_id not in keyframes:
                    raise ValueError(f"{name}: no valid keyframe entry {kf_name(kf_id)} for it")
                if not isinstance(obj, dict) or not {"id", "frame_hash", "clip", "dino"} <= set(obj):
                    raise ValueError(f"{name}: not a features entry")
                if obj["frame_hash"] != checkpoint.frame_hash(keyframes[kf_id]["images"][0]):
                    raise ValueError(f"{name}: computed from other image content than {kf_name(kf_id)} holds")
                for state, cache in ((obj["clip"], scratch_clip), (obj["dino"], scratch_dino)):
                    if not isinstance(state, dict) or list(dict(state.get("keyframes", {}))) != [kf_id]:
                        raise ValueError(f"{name}: does not hold features of keyframe {kf_id} alone")
                    cache.load_state_dict(state)
            except Exception as exc:  # as in _read: a foreign entry is skipped, named
                valid.pop(name, None)
                text = str(exc)
                skipped.append(text if text.startswith(name) else f"{name}: {text}")
                continue
            clip["keyframes"][kf_id] = obj["clip"]["keyframes"][kf_id]
            dino["keyframes"][kf_id] = obj["dino"]["keyframes"][kf_id]
        return clip, dino, len(clip["keyframes"])

    # ------------------------------------------------------------------ recording
    def begin(self, engine) -> None:
        """Make the directory ``engine``'s journal, before the engine records into it: the manifest is
        written; unless ``resume`` filled this very engine, older entries are deleted first."""
        self.root.mkdir(parents=True, exist_ok=True)
        clip, dino = _scratch_caches(engine)
        self._meta = {"clip": _cache_meta(clip.state_dict()), "dino": _cache_meta(dino.state_dict())}
        resumed = self._resumed_into is not None and self._resumed_into() is engine
        if not resumed:
            self.clear()
        with self._lock:  # before any hook writes: the temporary files left by a killed process
            for name in os.listdir(self.root):
                if _TMP_RE.match(name):
                    (self.root / name).unlink(missing_ok=True)
        body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": engine.config.to_dict(),
                "encoders": {"clip": engine.clip_encoder.name, "dino": engine.dino_encoder.name}}
        body["sha256"] = checkpoint.sha256_hex(json.dumps(body, sort_keys=True).encode())
        self._commit(self.generation, None, MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())
        with self._lock:
            self._last_checkpoint = time.monotonic()
            self._resumed_into = None

    def snapshot(self, engine) -> dict:
        """What ``write_snapshot`` writes for ``engine`` (the caller holds ``engine.lock``): its keyframes
        and features that the journal does not already hold valid, and its model unless the journal's
        checkpoint is current."""
        with self._lock:
            have = set(self._sizes)
            gen = self._generation
        ids = engine.store.ids()
        return {
            "generation": gen,
            "keyframes": [(i, engine.store.get(i)) for i in ids if kf_name(i) not in have],
            "features": [self.features_of(engine, i) for i in ids
                         if ft_name(i) not in have and engine.pyramid.ready(i) and engine.dense.ready(i)],
            "model": None if engine.model is None or MODEL in have else self.model_state_of(engine),
        }

    def write_snapshot(self, snap: dict) -> None:
        """Write a ``snapshot``; then delete the entries the journal does not vouch for (damaged ones that
        resume skipped) and mark the keyframes it could not use as gone, so they are counted once."""
        gen = snap["generation"]
        for kf_id, frame in snap["keyframes"]:
            self.write_keyframe(gen, kf_id, frame)
        for feats in snap["features"]:
            self.write_features(gen, feats)
        if snap["model"] is not None:
            self.write_checkpoint(gen, snap["model"])
        with self._lock:
            if gen != self._generation:
                return
            for name in os.listdir(self.root):
                if (_ENTRY_RE.match(name) or name == MODEL) and name not in self._sizes:
                    (self.root / name).unlink(missing_ok=True)
            for kf_id in self._unused:
                (self.root / gone_name(kf_id)).touch()
            self._unused = []
        checkpoint.fsync_dir(self.root)

    def features_of(self, engine, kf_id: int) -> dict:
        """Keyframe ``kf_id``'s features as a features entry (the caller holds ``engine.lock``; tensors
        copied): one-keyframe cache states in their ``state_dict`` layout, and the image they belong to."""
        pyr, dense = engine.pyramid, engine.dense
        return {
            "id": int(kf_id),
            "image": engine.store.get(kf_id).image,
            "clip": {"size": list(pyr.store.layout(kf_id)), "key": pyr.key(kf_id) or "",
                     "grid": pyr.store.grid(kf_id).cpu()},
            "dino": {"layout": list(dense.store.layout(kf_id)), "grid": dense.store.grid(kf_id).cpu()},
        }

    @staticmethod
    def model_state_of(engine) -> dict:
        """The checkpoint of ``engine``'s model and trainer (the caller holds ``engine.lock``; copied)."""
        box = engine.scene_box
        return {
            "model": checkpoint.detached_copy(engine.model.state_dict()),
            "trainer": checkpoint.detached_copy(engine.trainer.state_dict()),
            "backends": checkpoint.module_backends(engine.model),
            "step": int(engine.train_step),
            "scene_box": [[float(v) for v in box.min_xyz], [float(v) for v in box.max_xyz]],
            "box_source": engine.box_source,
            "box_refits": int(engine._box_refits),
            "box_checked_step": int(engine._box_checked_step),
            "keyframe_ids": [int(i) for i in engine.store.ids()],
            "next_id": int(engine.store._next_id),
        }

    def write_keyframe(self, gen: int, kf_id: int, frame: Frame) -> None:
        self._commit(gen, kf_id, kf_name(kf_id), pack(checkpoint.npz_bytes(entry_arrays(kf_id, frame))))

    def write_features(self, gen: int, feats: dict) -> None:
        kf_id = feats["id"]
        obj = {"id": kf_id, "frame_hash": checkpoint.frame_hash(feats["image"]),
               "clip": {**self._meta["clip"], "keyframes": {kf_id: feats["clip"]}},
               "dino": {**self._meta["dino"], "keyframes": {kf_id: feats["dino"]}}}
        self._commit(gen, kf_id, ft_name(kf_id), pack(checkpoint.torch_bytes(obj)))

    def write_checkpoint(self, gen: int, state: dict) -> None:
        """Write ``model_state_of``'s checkpoint; then markers of keyframes evicted before it are dropped."""
        self._commit(gen, None, MODEL, pack(checkpoint.torch_bytes(state)))
        keep = set(state["keyframe_ids"])
        with self._lock:
            if gen != self._generation:
                return
            for name in os.listdir(self.root):
                m = _GONE_RE.match(name)
                if m is not None and int(m.group(1)) not in keep:
                    (self.root / name).unlink(missing_ok=True)

    def mark_checkpoint_time(self) -> None:
        """Start the next ``interval_s`` now (the engine calls this when it snapshots a checkpoint)."""
        with self._lock:
            self._last_checkpoint = time.monotonic()

    def _commit(self, gen: int, kf_id: int | None, name: str, data: bytes) -> None:
        """Atomic write of ``name``: the bytes are written and fsync'ed to a temporary file off the lock;
        the rename happens under it, only if the write is still wanted."""
        tmp = self.root / f"{name}.{threading.get_ident()}.tmp"
        try:
            checkpoint.write_synced(tmp, data)
            with self._lock:
                if gen != self._generation or (kf_id is not None and kf_id in self._gone):
                    tmp.unlink(missing_ok=True)
                    return
                os.replace(tmp, self.root / name)
                self._sizes[name] = len(data)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.write_errors += 1
            raise
        checkpoint.fsync_dir(self.root)

    def remove(self, gen: int, kf_ids) -> None:
        """Keyframes evicted from the engine: their entries are deleted and late writes for them dropped."""
        if not kf_ids:
            return
        with self._lock:
            if gen != self._generation:
                return
            for kf_id in kf_ids:
                self._gone.add(int(kf_id))
                for name in (kf_name(kf_id), ft_name(kf_id)):
                    (self.root / name).unlink(missing_ok=True)
                    self._sizes.pop(name, None)
                (self.root / gone_name(kf_id)).touch()

    def clear(self) -> None:
        """Forget everything but the manifest (the engine was reset, or another map takes the journal over):
        entries, checkpoint and markers are deleted; writes snapshotted before are dropped."""
        with self._lock:
            self._generation += 1
            self._gone = set()
            self._unused = []
            if self.root.is_dir():
                # The checkpoint first: a crash half-way must not leave another map's model on keyframes.
                (self.root / MODEL).unlink(missing_ok=True)
                for name in os.listdir(self.root):
                    if _ENTRY_RE.match(name) or _GONE_RE.match(name) or _TMP_RE.match(name):
                        (self.root / name).unlink(missing_ok=True)
            self._sizes = {k: v for k, v in self._sizes.items() if k == MANIFEST}
            self._last_checkpoint = time.monotonic()
        checkpoint.fsync_dir(self.root)


def _stack(entries: list[dict], next_id: int) -> dict[str, np.ndarray]:
    """One-keyframe arrays (``entry_arrays`` layout) -> the store's arrays of them all (keyframes of other
    image sizes, from other cameras, padded as ``KeyframeStore.to_arrays`` pads them)."""
    if not entries:
        return {"ids": np.zeros(0, np.int64), "images": np.zeros((0, 1, 1, 3), np.uint8),
                "T_world_cam": np.zeros((0, 4, 4)), "stamps_ns": np.zeros(0, np.int64),
                "intrinsics": np.zeros((0, 6)), "depth_m": np.zeros((0, 1, 1), np.float32),
                "has_depth": np.zeros(0, bool), "next_id": np.array(next_id, dtype=np.int64)}
    keys = ("ids", "T_world_cam", "stamps_ns", "intrinsics", "has_depth")
    out = {k: np.concatenate([e[k] for e in entries]) for k in keys}
    # Entries written before keyframes named their camera have none: the default camera ("").
    out["cameras"] = np.array([str(e["cameras"][0]) if "cameras" in e else "" for e in entries], dtype=str)
    out["images"] = [e["images"][0] for e in entries]
    out["depth_m"] = [e["depth_m"][0] for e in entries]
    out["next_id"] = np.array(next_id, dtype=np.int64)
    return pad_keyframe_arrays(out)


def _scratch_caches(engine) -> tuple[ClipPyramid, DenseFeatureCache]:
    """Empty caches like ``engine``'s: their state metadata, and a place to validate one entry's features."""
    return (ClipPyramid(engine.clip_encoder, engine.config.pyramid, engine.device),
            DenseFeatureCache(engine.dino_encoder, engine.device))


def _short(exc: Exception, root: Path) -> str:
    """An error message with the journal directory left out of file names ("kf-000000003.entry: ...")."""
    return str(exc).replace(str(root) + os.sep, "")
