"""Map directory save / load with validation.

A map directory holds:

``config.json``    manifest: format name + version, the `EngineConfig` as a dict, the encoder names, the
                   training step, the scene box, and the SHA-256 + size of every other file.
``weights.pt``     ``torch.save`` of {"model": model state dict, "trainer": trainer state dict, "backends":
                   {module path: "tcnn" | "torch" | "triton"} of each hash grid and MLP}. Loading converts
                   the weights into the layouts of the modules this machine builds (``fields/layouts.py``);
                   maps without "backends" (written before they were recorded) are read by their keys.
``keyframes.npz``  the keyframe store's arrays (``KeyframeStore.to_arrays``): at least ids (K,) int64 and
                   images (K, H, W, 3) uint8; the rest is validated by the store when it is rebuilt.
``features.pt``    {"hashes": {kf_id: frame content hash}, "caches": {"clip": pyramid state, "dino": dense
                   cache state}}; the states carry their encoder name and crop settings and refuse to load
                   under another encoder; the hashes tie each keyframe's features to its image content.
``candidates.npz`` optional: the query candidate set (``core/language/candidates.py``): points (P, 3) float64,
                   rgb (P, 3) uint8, views (P,) int64 and the key (keyframe-set hash @ model step) it is
                   valid for; reused after load when the key still matches, so a map without measured
                   depth does not re-render every keyframe on its first query.

Files are written to ``*.tmp`` and renamed, the manifest last, so an interrupted save never leaves a
manifest pointing at half-written files. `load_map` checks everything (manifest, version, presence,
size, checksum, array shapes, feature keys) before returning, and raises ValueError naming the file on
any mismatch; the caller builds its engine only from a fully validated `MapData`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fields.layouts import LayoutError, convert_state, module_backends, torch_fallbacks
from .language.candidates import CandidateSet

FORMAT_NAME = "lerf_ros-map"
FORMAT_VERSION = 1
MANIFEST = "config.json"
WEIGHTS = "weights.pt"
KEYFRAMES = "keyframes.npz"
FEATURES = "features.pt"
CANDIDATES = "candidates.npz"
_KEYFRAME_ARRAYS = ("ids", "images")
_LOG = logging.getLogger(__name__)


@dataclass
class MapData:
    """Everything a map directory holds, validated (see the module docstring for shapes)."""

    config: dict
    encoders: dict[str, str]
    step: int
    scene_box: np.ndarray | None  # (2, 3) float64 min / max corners, world frame, metres; None = no model
    model_state: dict[str, torch.Tensor]
    trainer_state: dict | None
    keyframes: dict[str, np.ndarray]
    features: dict[str, dict]
    candidates: dict[str, np.ndarray] | None = None  # `CandidateSet.to_arrays()`; None = not saved
    backends: dict[str, str] | None = None  # path -> backend (`layouts.module_backends`); None: old map


def frame_hash(image: np.ndarray, depth: np.ndarray | None = None) -> str:
    """Content hash of a keyframe (image bytes, shape, and depth if any): the feature-cache key."""
    h = hashlib.sha1()
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    if depth is not None:
        h.update(np.ascontiguousarray(depth, dtype=np.float32).tobytes())
    return h.hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a process killed mid-write) sees the old file or the
    new one, never a part: written to ``<name>.tmp``, flushed and fsync'ed, renamed over ``path``, and the
    directory fsync'ed so the rename itself survives a power cut. ``core/journal.py`` uses the two halves
    (``write_synced`` + its own rename) to decide under its lock whether the file is still wanted."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the first half of `write_atomic`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames / unlinks in directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def read_npz(blob: bytes, file: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz file's bytes; ValueError naming ``file`` when they cannot be read. Arrays of
    Python objects (which only a pickle can hold) are refused as foreign: no lerf_ros file has them."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy's advice to allow pickles is the wrong one for a map
            raise ValueError(f"{file}: holds Python object arrays, not plain arrays: not a lerf_ros "
                             f"file (corrupted or replaced)") from None
        raise ValueError(f"{file}: cannot be read as npz: {exc}") from exc
    except Exception as exc:  # zip / format errors of a foreign file
        raise ValueError(f"{file}: cannot be read as npz: {exc}") from exc


def save_map(path: str | os.PathLike, data: MapData) -> None:
    """Write ``data`` as a map directory at ``path`` (created if needed; existing map files replaced)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    missing = [k for k in _KEYFRAME_ARRAYS if k not in data.keyframes]
    if missing:
        raise ValueError(f"keyframes lack arrays {missing}")
    blobs = {
        WEIGHTS: torch_bytes({"model": data.model_state, "trainer": data.trainer_state,
                              "backends": data.backends}),
        KEYFRAMES: npz_bytes(data.keyframes),
        FEATURES: torch_bytes(data.features),
    }
    if data.candidates is not None:
        blobs[CANDIDATES] = npz_bytes(data.candidates)
    elif (root / CANDIDATES).exists():
        (root / CANDIDATES).unlink()  # an older save's set, not valid for this one
    for name, blob in blobs.items():
        write_atomic(root / name, blob)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": data.config,
        "encoders": dict(data.encoders),
        "step": int(data.step),
        "scene_box": None if data.scene_box is None else np.asarray(data.scene_box, np.float64).tolist(),
        "files": {name: {"sha256": sha256_hex(b), "bytes": len(b)} for name, b in blobs.items()},
    }
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def _read_manifest(root: Path) -> dict:
    file = root / MANIFEST
    if not root.is_dir():
        raise ValueError(f"map directory {str(root)!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{file}: missing (not a lerf_ros map directory?)")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON (truncated or foreign file): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{file}: not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"{file}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {manifest.get('version')!r}, this code reads "
                         f"version {FORMAT_VERSION}")
    for key in ("config", "encoders", "step", "scene_box", "files"):
        if key not in manifest:
            raise ValueError(f"{file}: missing field {key!r}")
    if manifest["scene_box"] is not None:
        box = np.asarray(manifest["scene_box"], dtype=np.float64)
        if box.shape != (2, 3) or not np.all(np.isfinite(box)) or not np.all(box[1] > box[0]):
            raise ValueError(f"{file}: invalid scene_box {manifest['scene_box']}")
    return manifest


def _read_checked(root: Path, manifest: dict, name: str) -> bytes:
    file = root / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise ValueError(f"{root / MANIFEST}: does not list {name}")
    if not file.is_file():
        raise ValueError(f"{file}: missing")
    blob = file.read_bytes()
    if len(blob) != entry["bytes"]:
        raise ValueError(f"{file}: {len(blob)} bytes, manifest says {entry['bytes']} (truncated?)")
    if sha256_hex(blob) != entry["sha256"]:
        raise ValueError(f"{file}: checksum mismatch (corrupted or replaced)")
    return blob


def torch_load(blob: bytes, file: Path):
    """``torch.load`` of a file's bytes with ``weights_only`` (tensors and plain containers, no code);
    ValueError naming ``file`` when they cannot be read."""
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a foreign file all mean the same to the caller
        raise ValueError(f"{file}: cannot be read as a torch file: {exc}") from exc


def _check_keyframes(kf: dict[str, np.ndarray], file: Path) -> None:
    missing = [k for k in _KEYFRAME_ARRAYS if k not in kf]
    if missing:
        raise ValueError(f"{file}: missing arrays {missing}")
    k = kf["ids"].shape[0] if kf["ids"].ndim == 1 else -1
    img = kf["images"]
    if k < 0 or img.dtype != np.uint8 or img.ndim != 4 or img.shape[0] != k or img.shape[3] != 3:
        raise ValueError(f"{file}: images {img.dtype} {img.shape} do not match {k} keyframe ids")
    if len(set(kf["ids"].tolist())) != k:
        raise ValueError(f"{file}: duplicate keyframe ids")


def _check_features(features, kf: dict[str, np.ndarray], file: Path) -> None:
    """Structure + content hashes: features of keyframe i must come from the image keyframes.npz holds."""
    if not isinstance(features, dict) or not isinstance(features.get("hashes"), dict) \
            or not isinstance(features.get("caches"), dict):
        raise ValueError(f"{file}: expected {{'hashes': ..., 'caches': ...}}")
    hashes = {int(k): v for k, v in features["hashes"].items()}
    for row, kf_id in enumerate(kf["ids"].tolist()):
        if int(kf_id) not in hashes:
            raise ValueError(f"{file}: no content hash for keyframe {kf_id}")
        if hashes[int(kf_id)] != frame_hash(kf["images"][row]):
            raise ValueError(f"{file}: features of keyframe {kf_id} were computed from other image "
                             f"content than {KEYFRAMES} holds")


def load_map(path: str | os.PathLike) -> MapData:
    """Read and fully validate a map directory; raise ValueError naming the offending file."""
    root = Path(path)
    manifest = _read_manifest(root)
    weights = torch_load(_read_checked(root, manifest, WEIGHTS), root / WEIGHTS)
    if not isinstance(weights, dict) or not isinstance(weights.get("model"), dict):
        raise ValueError(f"{root / WEIGHTS}: no model state dict")
    backends = check_backends(weights.get("backends"), root / WEIGHTS)
    keyframes = read_npz(_read_checked(root, manifest, KEYFRAMES), root / KEYFRAMES)
    _check_keyframes(keyframes, root / KEYFRAMES)
    features = torch_load(_read_checked(root, manifest, FEATURES), root / FEATURES)
    _check_features(features, keyframes, root / FEATURES)
    cands = None
    if CANDIDATES in manifest["files"]:
        cands = read_npz(_read_checked(root, manifest, CANDIDATES), root / CANDIDATES)
        try:
            CandidateSet.from_arrays(cands)
        except ValueError as exc:
            raise ValueError(f"{root / CANDIDATES}: {exc}") from exc
    return MapData(
        config=manifest["config"],
        encoders=dict(manifest["encoders"]),
        step=int(manifest["step"]),
        scene_box=None if manifest["scene_box"] is None else np.asarray(manifest["scene_box"], np.float64),
        model_state=weights["model"],
        trainer_state=weights.get("trainer"),
        keyframes=keyframes,
        features=features,
        candidates=cands,
        backends=backends,
    )


def check_backends(backends, file) -> dict[str, str] | None:
    """A map's backend record: None (not recorded) or {module path: backend name}; ValueError naming
    ``file`` otherwise."""
    if backends is None:
        return None
    if not isinstance(backends, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in backends.items()):
        raise ValueError(f"{file}: backends must map module paths to backend names, got {backends!r:.200}")
    return dict(backends)


def check_state_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], file: str) -> None:
    """Raise ValueError if ``state`` does not fit ``model`` exactly (names and shapes)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{file}: weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{file}: {k} has shape {tuple(state[k].shape)}, model expects "
                             f"{tuple(v.shape)}")


# ---------------------------------------------------------------------- engine <-> map directory
def detached_copy(obj):
    """A deep copy of nested dicts / lists / tuples of tensors (to host memory) and arrays: a snapshot
    taken under the engine lock that later training steps cannot change (``ros/map_io.py``, the journal)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, Mapping):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detached_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detached_copy(v) for v in obj)
    return obj  # numbers, strings, None: immutable


def feature_caches(engine) -> dict:
    """The map's feature caches of ``engine`` (caller holds ``engine.lock``): {"clip", "dino"} states of
    the stored keyframes only (the engine keeps an evicted keyframe's pyramid entry until the queries
    reading it end, `LERFEngine._evict`, and a map must not hold it). Both save paths use it
    (`save_engine`, ``ros/map_io.snapshot_map``)."""
    return {"clip": engine.pyramid.state_dict(engine.store.ids()), "dino": engine.dense.state_dict()}


def save_engine(engine, path: str | os.PathLike) -> None:
    """Snapshot an `LERFEngine` (caller holds ``engine.lock``) into a map directory.

    With a model, the query candidate set is computed if not current (renders the keyframes without
    measured depth, once) and saved, so the loaded map's first query need not do it.
    """
    arrays = engine.store.to_arrays()
    ids = arrays["ids"].tolist()
    hashes = {int(i): frame_hash(img) for i, img in zip(ids, arrays["images"], strict=True)}
    box = engine.scene_box
    cands = None
    if engine.model is not None and len(engine.store):
        engine._candidate_points()
        cands = engine.candidates.current.to_arrays()
    save_map(path, MapData(
        config=engine.config.to_dict(),
        encoders={"clip": engine.clip_encoder.name, "dino": engine.dino_encoder.name},
        step=engine.train_step,
        scene_box=None if box is None else np.array([box.min_xyz, box.max_xyz]),
        model_state={} if engine.model is None else {k: v.detach().cpu() for k, v in
                                                     engine.model.state_dict().items()},
        trainer_state=None if engine.trainer is None else engine.trainer.state_dict(),
        keyframes=arrays,
        features={"hashes": hashes, "caches": feature_caches(engine)},
        candidates=cands,
        backends=None if engine.model is None else module_backends(engine.model),
    ))


def load_engine(cls, path: str | os.PathLike, device: str = "auto"):
    """Build ``cls`` (an `LERFEngine`) from a map directory; every piece is validated on the new engine
    before it is returned, so a bad map raises ValueError naming the file and nothing is half-loaded."""
    root = Path(path)
    data = load_map(root)
    engine = engine_for_config(cls, data.config, device, root / MANIFEST)
    check_encoders(engine, data.encoders, root / MANIFEST)
    fill_engine(engine, data, {"manifest": root / MANIFEST, "weights": root / WEIGHTS,
                               "keyframes": root / KEYFRAMES, "features": root / FEATURES})
    return engine


def engine_for_config(cls, config_dict: dict, device: str, file) -> object:
    """``cls(EngineConfig.from_dict(config_dict), device)``; a bad config is a ValueError naming ``file``."""
    from .presets import EngineConfig

    try:
        config = EngineConfig.from_dict(config_dict)
    except ValueError as exc:
        raise ValueError(f"{file}: bad engine config: {exc}") from exc
    return cls(config, device)


def check_encoders(engine, encoders: dict, file) -> None:
    """Features made by other encoders than ``engine``'s mean nothing to it: ValueError naming ``file``."""
    for key, enc in (("clip", engine.clip_encoder), ("dino", engine.dino_encoder)):
        if encoders.get(key) != enc.name:
            raise ValueError(f"{file}: map was built with {key} encoder "
                             f"{encoders.get(key)!r}, the configured one is {enc.name!r}")


def fill_engine(engine, data: MapData, files: dict) -> None:
    """Give a freshly built ``engine`` the keyframes, features and model of ``data`` (validated ``MapData``:
    from a map directory, or assembled by ``core/journal.py``). ``files`` names what each piece came from
    ("manifest", "weights", "keyframes", "features") for the errors. A ValueError can leave the engine
    partly filled: the caller discards it (``load_engine``) or resets it (``Journal.resume``)."""
    from .fields.scene_box import SceneBox
    from .frames.keyframes import KeyframeStore

    config = engine.config
    try:
        store = KeyframeStore.from_arrays(config.keyframes, data.keyframes)
    except ValueError as exc:
        raise ValueError(f"{files['keyframes']}: {exc}") from exc
    caches = data.features["caches"]
    for key, cache in (("clip", engine.pyramid), ("dino", engine.dense)):
        if key not in caches:
            raise ValueError(f"{files['features']}: no {key} features")
        try:
            cache.load_state_dict(caches[key])
        except ValueError as exc:
            raise ValueError(f"{files['features']}: {exc}") from exc
        stray = sorted(set(cache.store.ids()) - set(store.ids()))
        for kf_id in stray:  # maps saved while a query read an evicted keyframe's crops hold its features
            cache.remove(kf_id)
        if stray:
            _LOG.warning(f"{files['features']}: dropped the {key} features of {len(stray)} keyframe(s) the "
                         f"map does not hold {stray[:5]} (saved while a query read an evicted keyframe)")
    if data.model_state:
        if data.scene_box is None:
            raise ValueError(f"{files['manifest']}: weights present but no scene_box")
        engine.scene_box = SceneBox(tuple(data.scene_box[0]), tuple(data.scene_box[1]))
        state = portable_state(engine, data, files["weights"])
        check_state_shapes(engine.model, state.state, str(files["weights"]))
        engine.model.load_state_dict(state.state)
        if data.trainer_state is not None:
            try:
                engine.trainer.load_state_dict(restart_moments(engine, data.trainer_state, state.converted))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ValueError(f"{files['weights']}: optimiser state does not fit: {exc}") from exc
    engine.store = store
    engine._pending.extend(i for i in store.ids() if not (engine.pyramid.ready(i) and engine.dense.ready(i)))
    engine._kf_version += 1
    if data.candidates is not None and engine.model is not None:
        # Ignored (recomputed on the first query) unless the key matches these keyframes at this step.
        engine.candidates.adopt(CandidateSet.from_arrays(data.candidates), engine._kf_version, store.ids(),
                                store.frames(), engine.train_step)


def portable_state(engine, data: MapData, file):
    """Build ``engine``'s model for ``data`` and return the map's weights in its layouts
    (`layouts.ConvertedState`). MLPs that tinycudann would hold under "auto" but cannot represent (a
    map trained with PyTorch MLPs: biases) are built with PyTorch instead, with a warning; a module the
    config pins to a backend it cannot be converted to is a ValueError naming ``file`` and the module."""
    engine._build_model()
    keep = torch_fallbacks(engine.model, data.model_state, data.backends)
    if keep:
        _LOG.warning("%s: MLPs %s were trained with PyTorch biases that tinycudann's FullyFusedMLP cannot "
                     "hold; they stay PyTorch MLPs (the hash grids use this machine's backend)", file,
                     ", ".join(keep))
        engine._build_model(torch_modules=keep)
    try:
        return convert_state(engine.model, data.model_state, data.backends)
    except LayoutError as exc:
        raise ValueError(f"{file}: {exc}") from exc


def restart_moments(engine, trainer_state: dict, converted: tuple[str, ...]) -> dict:
    """``trainer_state`` with the Adam moments of the optimiser groups that hold a converted module
    emptied (they were shaped for the other layout): those groups restart their moments, keeping their
    hyper-parameters; everything else (steps, schedule, scaler, convergence) loads as saved."""
    if not converted or not isinstance(trainer_state, dict) or "optimizers" not in trainer_state:
        return trainer_state
    moved = {id(p) for path in converted for p in engine.model.get_submodule(path).parameters()}
    fresh = engine.trainer.state_dict()["optimizers"]
    optimizers = dict(trainer_state["optimizers"])
    for name, params in engine.model.param_groups().items():
        if name not in optimizers or name not in fresh or not any(id(p) in moved for p in params):
            continue
        saved, now = optimizers[name], fresh[name]
        groups = now["param_groups"]
        if len(saved.get("param_groups", ())) == len(groups):
            groups = [{**s, "params": n["params"]}
                      for s, n in zip(saved["param_groups"], groups, strict=True)]
        optimizers[name] = {"state": {}, "param_groups": groups}
        _LOG.info("optimiser group %r: Adam moments restart (%s converted)", name, ", ".join(converted))
    return {**trainer_state, "optimizers": optimizers}
