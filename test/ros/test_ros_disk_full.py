"""A disk that refuses writes during ``save_map`` or a journal write (issue 10, item 6): the save fails with
the reason, the map already at the path stays loadable, the journal keeps its good entries, the node stays up.

These tests run as root here, where a read-only directory (chmod) does not stop writes; the refusal comes
from a real file-size limit (``RLIMIT_FSIZE``: writes fail with EFBIG) in a child process, and from ENOSPC
raised by the one function every map and journal write goes through (``checkpoint.write_synced``)."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from rclpy.parameter import Parameter
from std_srvs.srv import SetBool

from lerf_ros.core import checkpoint, journal
from lerf_ros.core.engine import LERFEngine
from lerf_ros.ros import map_io
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.trainer_node import TrainerNode
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

_CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from lerf_ros.core.engine import LERFEngine
    from lerf_ros.core.presets import make_preset
    from lerf_ros.ros import map_io
    from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory

    path = Path(sys.argv[1])
    room = SyntheticRoom(0)
    engine = LERFEngine(make_preset("tiny"), "cpu")
    for frame in make_frames(room, orbit_trajectory(room, 4), default_intrinsics(48, 36)):
        engine.add_frame(frame)
    while engine.train_step < 2:
        engine.step(1)
    first = map_io.save_map_dir(engine, path, "map")
    while engine.train_step < 4:
        engine.step(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # no file beyond 16 KiB from now on
    try:
        map_io.save_map_dir(engine, path, "odom")
    except OSError as exc:
        print("FAILED", exc.errno, exc)
    else:
        print("SAVED")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print("FIRST", first.step)
""")


def test_a_save_beyond_the_file_size_limit_fails_and_keeps_the_map_that_was_there(tmp_path):
    path = tmp_path / "maps" / "kitchen"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    failed = [line for line in lines if line.startswith("FAILED")]
    assert failed and failed[0].split()[1] == str(errno.EFBIG), out.stdout  # "File too large"
    first_step = int(next(line for line in lines if line.startswith("FIRST")).split()[1])
    # The map of the first save, complete and in its frame; nothing of the failed one is left beside it.
    engine = LERFEngine.load(path, device="cpu")
    assert engine.train_step == first_step == 2
    assert map_io.read_world_frame(path) == "map"
    assert sorted(p.name for p in path.parent.iterdir()) == ["kitchen"]


@pytest.fixture(scope="module")
def frames():
    room = SyntheticRoom(0)
    return make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))


def _full_disk(monkeypatch, free_bytes: int):
    """Map / journal file writes from now on have ``free_bytes`` between them: the write that needs more
    writes what fits, then fails with ENOSPC, as every later one does."""
    calls = []

    def write_synced(path, data):
        nonlocal free_bytes
        calls.append(path)
        with open(path, "wb") as f:
            f.write(data[:free_bytes])
        if len(data) > free_bytes:
            free_bytes = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        free_bytes -= len(data)

    monkeypatch.setattr(checkpoint, "write_synced", write_synced)
    return calls


def test_the_node_survives_a_full_disk_during_save_map_and_journal_writes(tmp_path, frames, ros, monkeypatch):
    from lerf_ros.srv import MapPath

    root = tmp_path / "journal"
    node = TrainerNode(EngineSlot(), node_name="disk_full_trainer", parameter_overrides=[
        Parameter("preset", value="tiny"), Parameter("device", value="cpu"),
        Parameter("journal_dir", value=str(root))])
    ros.append(node)
    assert node._on_pause(SetBool.Request(data=True), SetBool.Response()).success  # the test steps itself
    engine = node.engine
    for frame in frames[:4]:
        assert engine.add_frame(frame).keyframe
    while engine.train_step < 2 or engine._pending:
        engine.step(1)
    map_dir = tmp_path / "map"
    reply = node._on_save(MapPath.Request(path=str(map_dir)), MapPath.Response())
    assert reply.success, reply.message

    # Room for the weights (the first and largest file) but not the rest: a save in place would have
    # replaced the weights and left the old manifest pointing at them (a checksum error on load).
    calls = _full_disk(monkeypatch, (map_dir / checkpoint.WEIGHTS).stat().st_size + 1000)
    engine.step(1)
    reply = node._on_save(MapPath.Request(path=str(map_dir)), MapPath.Response())
    assert not reply.success and "No space left on device" in reply.message and str(map_dir) in reply.message
    assert any(path.name.startswith(checkpoint.KEYFRAMES) for path in calls)  # the weights were written
    result = engine.add_frame(frames[4])  # the journal write fails; the keyframe is still taken
    assert result.keyframe and calls
    status = node.status_msg()
    assert "journal" in status.last_error and "No space left on device" in status.last_error
    assert node.journal.write_errors >= 1 and status.keyframes == 5

    monkeypatch.undo()  # space again: the last good state is all there, and the node carries on
    assert LERFEngine.load(map_dir, device="cpu").train_step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal", "map"]
    assert not list(root.glob("*.tmp"))  # the half-written entry was removed
    assert node._on_save(MapPath.Request(path=str(map_dir)), MapPath.Response()).success
    assert LERFEngine.load(map_dir, device="cpu").train_step == engine.train_step == 3
    resumed, report = journal.load_engine(LERFEngine, root, "cpu")
    # The journal holds what was written before the fault, undamaged.
    assert list(report.skipped) == [] and sorted(resumed.store.ids()) == [0, 1, 2, 3]
    assert engine.add_frame(frames[5]).keyframe and (root / journal.kf_name(5)).is_file()
