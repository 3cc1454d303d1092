"""The journal (``core/journal.py``): round trip of keyframes, features and model; atomicity; damaged entries
skipped, counted and never used; eviction and the disk bound; reset; config validation.

Tiny preset, 48 x 36 px frames of the synthetic room; the SIGKILL test is ``test_journal_kill.py``."""

import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch

from lerf_ros.core import checkpoint, journal
from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.frames.keyframes import KeyframeStore
from lerf_ros.core.journal import Journal, JournalConfig
from lerf_ros.core.presets import make_preset
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory


def _config(**keyframes):
    cfg = make_preset("tiny")
    kf = dataclasses.replace(cfg.keyframes, min_translation_m=0.02, blur_threshold=0.0, **keyframes)
    return dataclasses.replace(cfg, keyframes=kf)


@pytest.fixture(scope="module")
def frames():
    room = SyntheticRoom(0)
    out = make_frames(room, orbit_trajectory(room, 12), default_intrinsics(48, 36))
    # Every third frame without depth: the entry stores depth only when measured.
    return [dataclasses.replace(f, depth_m=None) if i % 3 == 2 else f for i, f in enumerate(out)]


def _recorded(root, frames, n=6, steps=3, config=None, **journal_kwargs):
    """An engine recording into a journal at ``root``: ``n`` frames, features, ``steps`` training steps and
    a checkpoint (when ``steps``)."""
    engine = LERFEngine(config or _config(), "cpu")
    jr = Journal(JournalConfig(str(root), **journal_kwargs))
    assert jr.resume(engine) == journal.ResumeReport()
    engine.attach_journal(jr)
    for frame in frames[:n]:
        assert engine.add_frame(frame).keyframe
    while engine.train_step < steps or engine._pending:
        engine.step(1)
    if steps:
        assert engine.checkpoint_journal(force=True)
    return engine, jr


def _resumed(root, config=None):
    engine = LERFEngine(config or _config(), "cpu")
    jr = Journal(JournalConfig(str(root)))
    return engine, jr, jr.resume(engine)


def _disk_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.suffix in (".entry", ".json")
               and p.name != "training_info.json")


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


def test_round_trip_of_keyframes_features_and_model(tmp_path, frames):
    engine, jr = _recorded(tmp_path, frames)
    back, _, report = _resumed(tmp_path)
    assert (report.keyframes, report.features, report.step, report.skipped) == (6, 6, engine.train_step, ())
    _assert_same(engine.store.to_arrays(), back.store.to_arrays(), "keyframes")
    assert [f.depth_m is None for f in back.store.frames()] == [i % 3 == 2 for i in range(6)]
    _assert_same(engine.pyramid.state_dict(), back.pyramid.state_dict(), "clip")
    _assert_same(engine.dense.state_dict(), back.dense.state_dict(), "dino")
    _assert_same(engine.model.state_dict(), back.model.state_dict(), "model")
    _assert_same(engine.trainer.state_dict(), back.trainer.state_dict(), "trainer")
    assert (back.scene_box, back.box_source, back.train_step) == (engine.scene_box, engine.box_source,
                                                                  engine.train_step)
    assert not back._pending  # every keyframe resumed with its features
    # The bytes figure is what the files take on disk; the status reports it.
    assert jr.bytes_used == _disk_bytes(tmp_path) == engine.status().journal_bytes
    # The resumed engine trains on, and new keyframes get ids after the old ones.
    back.step(1)
    assert back.train_step == engine.train_step + 1
    assert back.add_frame(frames[6]).keyframe_id == 6


def test_a_journal_is_a_map(tmp_path, frames):
    engine, _ = _recorded(tmp_path, frames, n=4)
    loaded = LERFEngine.load(tmp_path, "cpu")  # config from the journal's manifest
    assert (len(loaded.store), loaded.train_step) == (4, engine.train_step)
    assert loaded.config == engine.config
    before = sorted(os.listdir(tmp_path))
    journal.load_engine(LERFEngine, tmp_path, "cpu")
    assert sorted(os.listdir(tmp_path)) == before  # read only


def test_keyframes_without_features_and_a_missing_checkpoint(tmp_path, frames):
    engine = LERFEngine(_config(), "cpu")
    engine.attach_journal(Journal(JournalConfig(str(tmp_path))))
    for frame in frames[:3]:
        engine.add_frame(frame)
    engine.step(0)  # features of the first two keyframes (pyramid_keyframes_per_step = 2), no training
    back, _, report = _resumed(tmp_path)
    assert (report.keyframes, report.features, report.step, report.skipped) == (3, 2, 0, ())
    assert list(back._pending) == [2] and back.model is None


def test_an_interrupted_write_leaves_a_tmp_file_that_is_never_loaded(tmp_path, frames):
    _recorded(tmp_path, frames, n=3, steps=0)
    # What a write killed before its rename leaves: the bytes of a valid entry, under the temporary name.
    good = (tmp_path / journal.kf_name(1)).read_bytes()
    tmp = tmp_path / f"{journal.kf_name(7)}.12345.tmp"
    tmp.write_bytes(good)
    (tmp_path / f"{journal.MODEL}.999.tmp").write_bytes(b"half a checkpoint")
    back, jr, report = _resumed(tmp_path)
    assert back.store.ids() == [0, 1, 2]
    half = "half-written (its write was interrupted)"
    assert sorted(report.skipped) == [f"{journal.kf_name(7)}.12345.tmp: {half}",
                                      f"{journal.MODEL}.999.tmp: {half}"]
    assert jr.skipped == 2
    back.attach_journal(jr)  # recording again: the leftovers are removed
    assert not list(tmp_path.glob("*.tmp"))
    assert _resumed(tmp_path)[2].skipped == ()


def _flip(path, offset=-20):
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x40
    path.write_bytes(bytes(blob))


def test_damaged_entries_are_skipped_counted_and_never_used(tmp_path, frames):
    engine, _ = _recorded(tmp_path, frames, n=6)
    _flip(tmp_path / journal.kf_name(1))  # a flipped bit
    blob = (tmp_path / journal.kf_name(2)).read_bytes()
    (tmp_path / journal.kf_name(2)).write_bytes(blob[: len(blob) // 2])  # truncated
    (tmp_path / journal.kf_name(3)).unlink()  # missing (the checkpoint lists it)
    _flip(tmp_path / journal.ft_name(4), offset=len(journal.MAGIC) + 8 + 3)  # a flipped checksum digit
    # A checksum-valid entry that is not a keyframe: an object array (only a pickle can hold one).
    buf = io.BytesIO()
    np.savez(buf, ids=np.array([5]), images=np.array([{"x": 1}], dtype=object))
    (tmp_path / journal.kf_name(5)).write_bytes(journal.pack(buf.getvalue()))
    back, jr, report = _resumed(tmp_path)
    assert back.store.ids() == [0, 4]
    assert list(back._pending) == [4]  # its features were damaged: computed again
    assert report.step == engine.train_step  # the model is intact
    reasons = dict(r.split(": ", 1) for r in report.skipped)
    # Each damaged keyframe takes its features with it (they belong to no valid keyframe).
    assert set(reasons) == {journal.kf_name(i) for i in (1, 2, 3, 5)} \
        | {journal.ft_name(i) for i in range(1, 6)}
    assert reasons[journal.kf_name(1)] == "checksum mismatch (corrupted)"
    assert reasons[journal.kf_name(2)].startswith("truncated (")
    assert reasons[journal.kf_name(3)] == "missing (listed by the checkpoint, not evicted)"
    assert reasons[journal.ft_name(4)] == "checksum mismatch (corrupted)"
    assert "Python object arrays" in reasons[journal.kf_name(5)]
    assert "allow_pickle" not in " ".join(report.skipped)
    assert reasons[journal.ft_name(1)] == f"no valid keyframe entry {journal.kf_name(1)} for it"
    assert jr.skipped == len(report.skipped) == 9
    # Recording again removes the damaged entries and marks the missing one: nothing is counted twice.
    back.attach_journal(jr)
    assert not (tmp_path / journal.kf_name(1)).exists() and (tmp_path / "kf-000000003.gone").exists()
    assert _resumed(tmp_path)[2].skipped == ()


def test_a_damaged_checkpoint_restarts_training_on_the_resumed_keyframes(tmp_path, frames):
    _recorded(tmp_path, frames, n=4)
    _flip(tmp_path / journal.MODEL)
    back, _, report = _resumed(tmp_path)
    assert (report.keyframes, report.features, report.step) == (4, 4, 0)
    assert report.skipped == (f"{journal.MODEL}: checksum mismatch (corrupted)",)
    assert back.model is None and back.train_step == 0


def test_a_bad_manifest_is_skipped_on_resume_and_refused_as_a_map(tmp_path, frames):
    _recorded(tmp_path, frames, n=3, steps=0)
    (tmp_path / journal.MANIFEST).write_text('{"format": "lerf_ros-journal"')
    back, _, report = _resumed(tmp_path)
    assert len(back.store) == 3 and report.skipped[0].startswith(f"{journal.MANIFEST}: not valid JSON")
    with pytest.raises(ValueError, match=r"journal\.json: not valid JSON"):
        LERFEngine.load(tmp_path, "cpu")
    (tmp_path / journal.MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"journal\.json: missing"):
        LERFEngine.load(tmp_path, "cpu")


def test_a_journal_of_other_encoders_is_refused_and_the_engine_left_empty(tmp_path, frames):
    _recorded(tmp_path, frames, n=3)
    body = json.loads((tmp_path / journal.MANIFEST).read_text())
    body["encoders"]["dino"] = "another-dino"
    del body["sha256"]
    body["sha256"] = checkpoint.sha256_hex(json.dumps(body, sort_keys=True).encode())
    (tmp_path / journal.MANIFEST).write_text(json.dumps(body))
    engine = LERFEngine(_config(), "cpu")
    with pytest.raises(ValueError, match=r"journal\.json: map was built with dino encoder 'another-dino'"):
        Journal(JournalConfig(str(tmp_path))).resume(engine)
    assert len(engine.store) == 0 and engine.model is None


def test_a_journal_with_more_keyframes_than_max_keyframes_is_refused_whole(tmp_path, frames):
    _recorded(tmp_path, frames, n=5)
    engine = LERFEngine(_config(max_keyframes=3), "cpu")
    with pytest.raises(ValueError, match="more than max_keyframes=3"):
        Journal(JournalConfig(str(tmp_path))).resume(engine)
    assert len(engine.store) == 0 and engine.model is None and not engine._pending  # nothing half-loaded


def test_eviction_deletes_the_entries(tmp_path, frames):
    engine, jr = _recorded(tmp_path, frames, n=8, steps=0, config=_config(max_keyframes=5))
    ids = engine.store.ids()
    assert len(ids) == 5
    on_disk = sorted(int(p.name[3:12]) for p in tmp_path.glob("kf-*.entry"))
    assert on_disk == ids
    assert sorted(int(p.name[3:12]) for p in tmp_path.glob("ft-*.entry")) == ids
    assert jr.bytes_used == _disk_bytes(tmp_path)
    back, _, report = _resumed(tmp_path, _config(max_keyframes=5))
    assert back.store.ids() == ids and report.skipped == ()


def test_max_mb_evicts_like_max_keyframes_and_the_bytes_figure_is_right(tmp_path, frames):
    # Without training the journal holds the manifest and one equal-sized entry per keyframe (all with
    # depth here), so the limit is a keyframe count: the engine must keep the keyframes a store bounded
    # to that count keeps (most redundant evicted, never the newest).
    with_depth = [f for f in frames if f.depth_m is not None]
    _recorded(tmp_path / "probe", with_depth, n=1, steps=0, config=_config())
    entry = (tmp_path / "probe" / journal.kf_name(0)).stat().st_size
    manifest = (tmp_path / "probe" / journal.MANIFEST).stat().st_size
    keep = 5
    max_mb = (manifest + keep * entry + entry // 2) / 2**20
    engine = LERFEngine(_config(), "cpu")
    jr = Journal(JournalConfig(str(tmp_path / "j"), max_mb=max_mb))
    engine.attach_journal(jr)
    reference = KeyframeStore(dataclasses.replace(engine.config.keyframes, max_keyframes=keep))
    for frame in with_depth:
        engine.add_frame(frame)
        reference.add(frame)
        assert jr.bytes_used <= jr.config.max_bytes
        assert jr.bytes_used == _disk_bytes(tmp_path / "j") == engine.status().journal_bytes
    assert len(with_depth) > keep
    assert engine.store.ids() == reference.ids()
    assert sorted(int(p.name[3:12]) for p in (tmp_path / "j").glob("kf-*.entry")) == reference.ids()


def test_reset_empties_the_journal(tmp_path, frames):
    engine, jr = _recorded(tmp_path, frames, n=4)
    engine.reset()
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.MANIFEST]
    assert jr.bytes_used == _disk_bytes(tmp_path)
    engine.add_frame(frames[5])  # recording goes on, ids from 0 again
    back, _, report = _resumed(tmp_path)
    assert back.store.ids() == [0] and report.step == 0 and report.skipped == ()
    np.testing.assert_array_equal(back.store.get(0).image, frames[5].image)


def test_a_failing_disk_is_reported_not_fatal(tmp_path, frames):
    engine, jr = _recorded(tmp_path, frames, n=2, steps=0)
    for p in tmp_path.iterdir():
        p.unlink()
    tmp_path.rmdir()
    assert engine.add_frame(frames[2]).keyframe  # accepted all the same, kept in memory
    assert engine.status().last_error.startswith("journal: FileNotFoundError") and jr.write_errors == 1


@pytest.mark.parametrize("kwargs", [
    {"dir": ""}, {"dir": "   "}, {"interval_s": 0.0}, {"interval_s": -1.0}, {"interval_s": math.nan},
    {"interval_s": math.inf}, {"max_mb": 0}, {"max_mb": -5.0}, {"max_mb": True}, {"interval_s": "30"},
])
def test_bad_config_values_are_rejected_naming_the_field(kwargs):
    args = {"dir": "/tmp/j", **kwargs}
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"JournalConfig.{field} must be"):
        JournalConfig(**args)


def test_entry_format_detects_every_kind_of_damage():
    blob = journal.pack(b"payload bytes")
    assert journal.unpack(blob, "f") == b"payload bytes"
    with pytest.raises(ValueError, match="f: truncated"):
        journal.unpack(blob[:-3], "f")
    with pytest.raises(ValueError, match="f: 2 bytes past the end"):
        journal.unpack(blob + b"xx", "f")
    with pytest.raises(ValueError, match="f: checksum mismatch"):
        journal.unpack(blob[:-1] + b"X", "f")
    with pytest.raises(ValueError, match="f: not a journal entry"):
        journal.unpack(b"PK\x03\x04" + blob, "f")
    # The header's checksum is the payload's SHA-256, the one checkpoint.py uses for maps.
    assert checkpoint.sha256_hex(b"payload bytes").encode() in blob
