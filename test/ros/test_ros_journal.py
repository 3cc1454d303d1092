"""The trainer node with ``journal_dir`` (``core/journal.py``), in-process: it resumes the journal at start
(in the frame the journal recorded), reports the journal's bytes and skipped entries in TrainingStatus,
checkpoints on a clean shutdown, refuses a journal it cannot continue naming the parameter; ``load_map``
accepts a journal, and the node's journal then records the loaded map; in ``lerf_node`` a resumed journal wins
over ``map_path``."""

import pytest
import rclpy
from rclpy.parameter import Parameter
from std_srvs.srv import SetBool

from lerf_ros.core import journal
from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.presets import make_preset
from lerf_ros.ros import map_io
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.params import ParameterError
from lerf_ros.ros.trainer_node import TrainerNode
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory


@pytest.fixture(scope="module")
def frames():
    room = SyntheticRoom(0)
    return make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))


def _trainer(ros, name, journal_dir, **values):
    overrides = {"preset": "tiny", "device": "cpu", "journal_dir": str(journal_dir), **values}
    node = TrainerNode(EngineSlot(), node_name=name,
                       parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    ros.append(node)
    assert node._on_pause(SetBool.Request(data=True), SetBool.Response()).success  # the test trains
    return node


def _record(engine, frames, steps=2):
    for frame in frames:
        assert engine.add_frame(frame).keyframe
    while engine.train_step < steps or engine._pending:
        engine.step(1)


def test_the_trainer_resumes_its_journal_in_its_frame_and_reports_it(tmp_path, frames, ros):
    root = tmp_path / "journal"
    first = _trainer(ros, "journal_first", root, world_frame="odom")
    assert first.resumed == journal.ResumeReport() and first.journal is not None
    _record(first.engine, frames[:4])
    status = first.status_msg()
    assert status.journal_bytes == first.journal.bytes_used > 0 and status.journal_skipped == 0
    first.shutdown()  # a clean stop checkpoints the model: no training is lost
    step = first.engine.train_step
    blob = bytearray((root / journal.kf_name(1)).read_bytes())
    blob[-3] ^= 0x01
    (root / journal.kf_name(1)).write_bytes(bytes(blob))

    second = _trainer(ros, "journal_second", root, world_frame="map")
    assert (second.resumed.keyframes, second.resumed.step) == (3, step)
    assert second.engine.store.ids() == [0, 2, 3]
    status = second.status_msg()
    assert status.journal_skipped == 2  # the keyframe and the features that belong to it
    assert status.keyframes == 3 and status.step >= step  # (its worker may train before the pause)
    assert status.header.frame_id == "odom"  # the journal's frame, as a loaded map's
    assert status.journal_bytes == second.journal.bytes_used


def test_a_journal_the_configuration_cannot_continue_stops_start_up(tmp_path, frames, ros):
    root = tmp_path / "journal"
    first = _trainer(ros, "journal_writer", root)
    _record(first.engine, frames[:4], steps=0)
    with pytest.raises(ParameterError, match="more than max_keyframes=3") as info:
        _trainer(ros, "journal_too_small", root, max_keyframes=3, min_keyframes=2)
    assert info.value.name == "journal_dir" and "move it away" in str(info.value)


def test_load_map_accepts_a_journal_and_the_journal_records_the_loaded_map(tmp_path, frames, ros):
    from lerf_ros.srv import MapPath

    other = tmp_path / "other"
    engine = LERFEngine(make_preset("tiny"), "cpu")
    engine.attach_journal(journal.Journal(journal.JournalConfig(str(other))))
    _record(engine, frames[2:7], steps=3)
    engine.checkpoint_journal(force=True)
    map_io.write_map_info(other, {"world_frame": "odom"})

    root = tmp_path / "journal"
    node = _trainer(ros, "journal_loader", root)
    _record(node.engine, frames[:3], steps=0)
    reply = node._on_load(MapPath.Request(path=str(other)), MapPath.Response())
    assert reply.success and "loaded 5 keyframes, step 3" in reply.message, reply.message
    assert node.status_msg().header.frame_id == "odom"
    # The node's journal now holds the loaded map, not what it recorded before.
    back = LERFEngine(make_preset("tiny"), "cpu")
    report = journal.Journal(journal.JournalConfig(str(root))).resume(back)
    assert (report.keyframes, report.step, report.skipped) == (5, 3, ())
    assert map_io.read_world_frame(root) == "odom"


def test_in_lerf_node_a_resumed_journal_wins_over_map_path(tmp_path, frames):
    # lerf_node restarted after a crash with map_path still set: the journal (the map and what was
    # recorded since) is resumed, the map is not loaded over it.
    from lerf_ros.ros.main import build_nodes, destroy_nodes

    engine = LERFEngine(make_preset("tiny"), "cpu")
    _record(engine, frames[:3], steps=1)
    engine.save(tmp_path / "map")
    root = tmp_path / "journal"
    recorded = LERFEngine(make_preset("tiny"), "cpu")
    recorded.attach_journal(journal.Journal(journal.JournalConfig(str(root))))
    _record(recorded, frames[:6], steps=2)
    recorded.checkpoint_journal(force=True)
    args = ["--ros-args", "-p", "preset:=tiny", "-p", "device:=cpu", "-p", f"journal_dir:={root}",
            "-p", f"map_path:={tmp_path / 'map'}"]
    rclpy.init(args=args)
    nodes = []
    try:
        nodes = build_nodes("both")
        trainer, query = nodes
        assert (trainer.resumed.keyframes, trainer.resumed.step) == (6, 2)
        assert len(trainer.engine.store) == 6 and query.slot is trainer.slot
    finally:
        destroy_nodes(nodes)
        rclpy.try_shutdown()
