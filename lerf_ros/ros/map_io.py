"""Maps saved and loaded by the nodes: a snapshot under the engine lock written off it, and the world frame.

ROS-free (no rclpy), so it is tested without ``rclpy.init()`` and the CLI can share the sidecar reader.

Saving (``save_map_dir``): ``LERFEngine.save`` holds the engine lock for the whole write (serialising
the weights, hashing, fsync), which stalls queries, frame ingest and status for as long as the disk takes.
Here only ``snapshot_map`` runs under the lock: the candidate set is brought up to date (as
``checkpoint.save_engine`` does) and every tensor and array the map holds is copied to host memory. The
keyframe content hashes, serialisation and writing (``checkpoint.save_map``) run after the lock is
released, on the copies, so training steps taken meanwhile cannot tear the map.
``snapshot_map`` mirrors ``checkpoint.save_engine``'s ``MapData`` (a test compares the two maps); once the
core has ``checkpoint.snapshot_engine(engine) -> MapData`` (caller holds the lock, tensors copied), it is
that call under the lock.

World frame: a map's poses, scene box and answers are in the frame the trainer looked TF up in. The map
directory records it in the sidecar ``training_info.json`` (``MAP_INFO``), the file ``lerf-ros train``
writes too; ``checkpoint.load_map`` reads only the files its manifest lists, so the sidecar does not
disturb validation. A node that loads a map answers in the recorded frame (``answer_frame``); a map without
a record (saved by ``LERFEngine.save`` directly) is taken to be in ``world_frame``.

Journals (``core/journal.py``): ``start_journal`` resumes a node's engine from its ``journal_dir`` and
records into it, with the world frame in the same sidecar; ``load_map_or_journal`` loads either kind of
directory for ``load_map``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lerf_ros.core import checkpoint, journal
from lerf_ros.core.journal import ResumeReport

#: Sidecar beside the map files: {"world_frame": ..., ...}; shared with ``lerf-ros train``.
MAP_INFO = "training_info.json"
_FRAME_RE = re.compile(r"^[A-Za-z0-9_.\-][A-Za-z0-9_/.\-]*$")  # a tf2 frame id: no leading '/'


_copy = checkpoint.detached_copy


def snapshot_map(engine) -> checkpoint.MapData:
    """The ``checkpoint.MapData`` that ``checkpoint.save_engine`` would write, as copies that training
    cannot change. Holds ``engine.lock`` only while copying; keyframe hashes are computed after."""
    with engine.lock:
        candidates = None
        if engine.model is not None and len(engine.store):
            engine._candidate_points()  # as save_engine: a loaded map's first query need not render them
            candidates = _copy(engine.candidates.current.to_arrays())
        keyframes = engine.store.to_arrays()  # new arrays (np.array over the stored frames)
        box = engine.scene_box
        data = checkpoint.MapData(
            config=engine.config.to_dict(),
            encoders={"clip": engine.clip_encoder.name, "dino": engine.dino_encoder.name},
            step=int(engine.train_step),
            scene_box=None if box is None else np.array([box.min_xyz, box.max_xyz], dtype=np.float64),
            model_state={} if engine.model is None else _copy(engine.model.state_dict()),
            trainer_state=None if engine.trainer is None else _copy(engine.trainer.state_dict()),
            backends=None if engine.model is None else checkpoint.module_backends(engine.model),
            keyframes=keyframes,
            features={"hashes": {}, "caches": _copy(checkpoint.feature_caches(engine))},
            candidates=candidates,
        )
    ids = keyframes["ids"].tolist()
    data.features["hashes"] = {int(i): checkpoint.frame_hash(image)
                               for i, image in zip(ids, keyframes["images"], strict=True)}
    return data


@dataclass(frozen=True)
class SavedMap:
    path: str
    keyframes: int
    step: int
    world_frame: str


def write_map_info(path: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """Write the sidecar (atomically: a reader sees the old file or the new one)."""
    file = Path(path) / MAP_INFO
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(dict(info), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)


#: The files of a map directory; a directory holding only these may be replaced as a whole.
MAP_FILES = frozenset({checkpoint.MANIFEST, checkpoint.WEIGHTS, checkpoint.KEYFRAMES, checkpoint.FEATURES,
                       checkpoint.CANDIDATES, MAP_INFO})


def save_map_dir(engine, path: str | os.PathLike, world_frame: str, saved_by: str = "lerf_node") -> SavedMap:
    """Snapshot ``engine`` under its lock, write the map directory off it, record ``world_frame``.

    The map is written into a staging directory beside ``path`` (``.<name>.saving``, same file system) and
    only a complete one is moved in (``_move_in``): a save that fails (a full disk, a file-size limit, a
    read-only directory) removes the staging directory and leaves the map that was at ``path`` as it was,
    still loadable. Raises OSError / ValueError from ``checkpoint.save_map`` or the moves.
    """
    data = snapshot_map(engine)
    root = Path(path)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
    keyframes = len(data.keyframes["ids"])
    try:
        checkpoint.save_map(staging, data)  # the slow part: no lock held
        write_map_info(staging, {"world_frame": world_frame, "saved_by": saved_by, "steps": data.step,
                                 "keyframes": keyframes})
        _move_in(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SavedMap(str(root), keyframes, data.step, world_frame)


def _move_in(staging: Path, root: Path) -> None:
    """Put the complete map at ``staging`` in place of ``root``. Renames allocate no file data, so a full
    disk does not stop them. A missing or empty ``root``, or one holding only map files, is swapped as a
    directory (the old one renamed away first, removed last); a directory with other files in it keeps
    them and gets the map files one by one, the manifest last."""
    entries = set(os.listdir(root)) if root.is_dir() else None
    if entries is None and root.exists():
        raise NotADirectoryError(f"{str(root)!r} exists and is not a directory")
    if entries is None:
        os.rename(staging, root)
    elif entries <= MAP_FILES:
        previous = root.with_name(f".{root.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(root, previous)
        os.rename(staging, root)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        (root / MAP_INFO).unlink(missing_ok=True)  # never another map's frame on these files
        if not (staging / checkpoint.CANDIDATES).exists():
            (root / checkpoint.CANDIDATES).unlink(missing_ok=True)
        names = sorted(os.listdir(staging), key=lambda n: (n == checkpoint.MANIFEST, n == MAP_INFO))
        for name in names:
            os.replace(staging / name, root / name)
    checkpoint.fsync_dir(root.parent)


def start_journal(engine, config, world_frame: str) -> tuple[journal.Journal, ResumeReport, str, str]:
    """Resume ``engine`` from the journal ``config.dir`` (when the engine is fresh) and make it record there:
    (the journal, what it resumed, the world frame of the engine's data, a warning or ''). The frame is the
    journal's recorded one when it resumed keyframes, else ``world_frame``. ValueError when the journal
    holds what the engine cannot continue (left empty), OSError when the directory cannot be used."""
    j = journal.Journal(config)
    report = ResumeReport()
    if len(engine.store) == 0 and engine.model is None:
        report = j.resume(engine)
    frame, warning = world_frame, ""
    if report.keyframes:
        frame, warning = answer_frame(read_world_frame(config.dir), world_frame)
    engine.attach_journal(j)
    write_map_info(config.dir, {"world_frame": frame, "saved_by": "journal"})
    return j, report, frame, warning


def load_map_or_journal(cls, path: str | os.PathLike, device: str = "auto") -> tuple[Any, str]:
    """(an engine from the map directory or journal at ``path``, a note on the journal entries it skipped as
    damaged or ''); ValueError naming the file as ``cls.load``."""
    if journal.is_journal(path):
        engine, report = journal.load_engine(cls, path, device)
        skipped = "; ".join(report.skipped[:5])
        return engine, f"journal entries skipped as damaged: {skipped}" if skipped else ""
    return cls.load(path, device), ""


def read_world_frame(path: str | os.PathLike) -> str | None:
    """The world frame a map directory records, or None (no sidecar, unreadable, or not a frame id)."""
    try:
        frame = json.loads((Path(path) / MAP_INFO).read_text(encoding="utf-8")).get("world_frame")
    except (OSError, ValueError, AttributeError):
        return None
    return frame if isinstance(frame, str) and _FRAME_RE.match(frame) else None


def answer_frame(recorded: str | None, world_frame: str) -> tuple[str, str]:
    """(the frame a loaded map is used in, a warning or ''): the recorded frame wins over the parameter."""
    if recorded is None:
        return world_frame, (f"the map does not record its world frame; using world_frame "
                             f"'{world_frame}'")
    if recorded != world_frame:
        return recorded, (f"the map was built in frame '{recorded}' but world_frame is '{world_frame}': its "
                          f"answers (and any further training on it) use '{recorded}'")
    return recorded, ""
