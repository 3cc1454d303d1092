"""Maps saved and loaded by the nodes (``lerf_ros/ros/map_io.py``): the snapshot is the map
``LERFEngine.save`` writes, the disk write runs with the engine lock free and on a copy that training
cannot change, and the map's world frame is recorded and used (query node, trainer: status, save, reset).

One tiny engine (3 keyframes of 48 x 36 px, one training step) is shared by the module."""

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from rclpy.parameter import Parameter

from lerf_ros.core import checkpoint
from lerf_ros.core.engine import LERFEngine
from lerf_ros.core.presets import make_preset
from lerf_ros.ros import map_io
from lerf_ros.sim.scene import SyntheticRoom, default_intrinsics, make_frames, orbit_trajectory


@pytest.fixture(scope="module")
def engine():
    cfg = make_preset("tiny")
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, min_keyframes=2))
    engine = LERFEngine(cfg, "cpu")
    room = SyntheticRoom(0)
    for frame in make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))[:3]:
        engine.add_frame(frame)
    while engine.train_step < 1:
        engine.step(1)
    return engine


def _assert_same(a, b, where="map"):
    """Nested dicts / lists of tensors, arrays and plain values are equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def test_the_snapshot_writes_the_map_that_engine_save_writes(engine, tmp_path):
    saved = map_io.save_map_dir(engine, tmp_path / "ros", "odom")
    engine.save(tmp_path / "core")
    assert (saved.keyframes, saved.step, saved.world_frame) == (3, engine.train_step, "odom")
    ours, core = checkpoint.load_map(tmp_path / "ros"), checkpoint.load_map(tmp_path / "core")
    for field in dataclasses.fields(checkpoint.MapData):
        _assert_same(getattr(core, field.name), getattr(ours, field.name), field.name)
    assert ours.model_state and ours.candidates is not None  # a trained map: weights and candidates
    # The sidecar records the frame, and the map still loads (validation reads only listed files).
    assert map_io.read_world_frame(tmp_path / "ros") == "odom"
    assert map_io.read_world_frame(tmp_path / "core") is None
    assert LERFEngine.load(tmp_path / "ros", "cpu").train_step == engine.train_step


def test_a_snapshot_while_a_query_reads_an_evicted_keyframe_holds_only_the_stored_ones(tmp_path):
    """`LERFEngine._evict` keeps an evicted keyframe's pyramid entry while a query reads the crops; the
    node's snapshot must leave it out as `engine.save` does, or the map does not load."""
    cfg = make_preset("tiny")
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, min_keyframes=2),
                              keyframes=dataclasses.replace(cfg.keyframes, max_keyframes=2))
    engine = LERFEngine(cfg, "cpu")
    room = SyntheticRoom(0)
    frames = make_frames(room, orbit_trajectory(room, 8), default_intrinsics(48, 36))
    for frame in frames[:2]:
        engine.add_frame(frame)
    while engine.train_step < 1 or engine.status().keyframes_pending:
        engine.step(1)
    with engine._readers_lock:  # a query scoring outside the lock
        engine._readers += 1
    engine.add_frame(frames[2])
    while engine.status().keyframes_pending:
        engine.step(1)
    assert len(engine.pyramid.keyframe_ids()) > len(engine.store.ids())
    map_io.save_map_dir(engine, tmp_path / "ros", "odom")
    engine.save(tmp_path / "core")
    ours, core = checkpoint.load_map(tmp_path / "ros"), checkpoint.load_map(tmp_path / "core")
    assert sorted(ours.features["caches"]["clip"]["keyframes"]) == engine.store.ids()
    _assert_same(core.features, ours.features, "features")
    assert LERFEngine.load(tmp_path / "ros", "cpu").store.ids() == engine.store.ids()


def test_the_write_runs_off_the_engine_lock_on_a_copy_training_cannot_change(engine, tmp_path,
                                                                              monkeypatch):
    writing, release = threading.Event(), threading.Event()
    real_save_map = checkpoint.save_map

    def slow_save_map(path, data):
        writing.set()
        assert release.wait(30.0)
        real_save_map(path, data)

    monkeypatch.setattr(checkpoint, "save_map", slow_save_map)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    step = engine.train_step
    errors = []

    def save():
        try:
            map_io.save_map_dir(engine, tmp_path / "m", "map")
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    try:
        assert writing.wait(30.0), errors
        # While the map is being written, status (and so queries, frames) get the lock at once ...
        status = threading.Thread(target=engine.status)
        status.start()
        status.join(10.0)
        assert not status.is_alive(), "engine.status() blocked while the map was being written"
        # ... and a training step changes the live weights in place, not the ones being written.
        while engine.train_step == step:
            engine.step(1)
    finally:
        release.set()
        saver.join(60.0)
    assert not errors and not saver.is_alive()
    written = checkpoint.load_map(tmp_path / "m")
    assert written.step == step
    for k, v in before.items():
        assert torch.equal(written.model_state[k], v), k
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


def test_a_failed_save_leaves_the_previous_directory_as_it_was(engine, tmp_path, monkeypatch):
    # The map is written into a staging directory and moved in only when complete: a save that fails leaves
    # what was at the path (here only another map's frame record) untouched, and no staging directory.
    root = tmp_path / "m"
    root.mkdir()
    (root / map_io.MAP_INFO).write_text(json.dumps({"world_frame": "old_map"}))

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_map", disk_full)
    with pytest.raises(OSError, match="No space"):
        map_io.save_map_dir(engine, root, "map")
    assert map_io.read_world_frame(root) == "old_map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in root.iterdir()) == [map_io.MAP_INFO]


@pytest.mark.parametrize("text", ["{", '{"world_frame": "/map"}', '{"world_frame": 3}', "[]", '{"x": 1}'])
def test_a_broken_frame_record_counts_as_none(tmp_path, text):
    (tmp_path / map_io.MAP_INFO).write_text(text)
    assert map_io.read_world_frame(tmp_path) is None


def test_answer_frame_prefers_the_recorded_frame_and_warns_on_a_mismatch():
    assert map_io.answer_frame("map", "map") == ("map", "")
    frame, warning = map_io.answer_frame("odom", "map")
    assert frame == "odom" and "'odom'" in warning and "world_frame is 'map'" in warning
    frame, warning = map_io.answer_frame(None, "map")
    assert frame == "map" and "does not record" in warning


# --------------------------------------------------------------------------- the nodes


def test_a_standalone_query_node_answers_in_the_maps_frame(engine, tmp_path, ros):
    from lerf_ros.srv import Query

    from lerf_ros.ros.query_node import QueryNode

    map_io.save_map_dir(engine, tmp_path / "m", "odom")
    node = QueryNode(node_name="map_frame_query", parameter_overrides=[
        Parameter("map_path", value=str(tmp_path / "m")), Parameter("world_frame", value="map"),
        Parameter("device", value="cpu")])
    ros.append(node)
    reply = node._on_query(Query.Request(text="red box", with_cloud=True, max_results=1), Query.Response())
    assert reply.result != Query.Response.RESULT_ERROR, reply.message
    assert reply.location.header.frame_id == reply.cloud.header.frame_id == "odom"


@pytest.mark.parametrize("requested", [0, 1])
def test_the_query_node_alone_uses_every_core_unless_told(engine, tmp_path, ros, monkeypatch, requested):
    """Nothing trains beside a query node on a map: torch_threads 0 gives the queries all the cores (a
    trainer keeps one for its executor); a query node sharing a trainer's engine leaves them as they are."""
    from lerf_ros.core.training import worker
    from lerf_ros.ros.engine_slot import EngineSlot
    from lerf_ros.ros.query_node import QueryNode

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # the process's threads stay as they are
    monkeypatch.setattr(worker, "available_cpus", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a user's cap (test/conftest.py sets one)
    map_io.save_map_dir(engine, tmp_path / "m", "odom")
    alone = QueryNode(node_name=f"threads_query_{requested}", parameter_overrides=[
        Parameter("map_path", value=str(tmp_path / "m")), Parameter("device", value="cpu"),
        Parameter("torch_threads", value=requested)])
    ros.append(alone)
    assert calls == [requested or 6]
    shared = QueryNode(EngineSlot(engine), node_name=f"threads_shared_{requested}", parameter_overrides=[
        Parameter("device", value="cpu"), Parameter("torch_threads", value=requested)])
    ros.append(shared)
    assert calls == [requested or 6]


def test_the_trainer_uses_a_loaded_maps_frame_until_reset(engine, tmp_path, ros):
    from lerf_ros.srv import MapPath
    from std_srvs.srv import SetBool, Trigger

    from lerf_ros.ros.engine_slot import EngineSlot
    from lerf_ros.ros.trainer_node import TrainerNode

    map_io.save_map_dir(engine, tmp_path / "odom_map", "odom")
    fresh = LERFEngine(make_preset("tiny"), "cpu")
    node = TrainerNode(EngineSlot(fresh), node_name="map_frame_trainer", parameter_overrides=[
        Parameter("world_frame", value="map"), Parameter("device", value="cpu"),
        Parameter("preset", value="tiny")])
    ros.append(node)
    assert node._on_pause(SetBool.Request(data=True), SetBool.Response()).success  # no training here
    assert node.status_msg().header.frame_id == "map"
    reply = node._on_load(MapPath.Request(path=str(tmp_path / "odom_map")), MapPath.Response())
    assert reply.success and "frame 'odom'" in reply.message, reply.message
    assert node.status_msg().header.frame_id == "odom"
    # Saved again, the map keeps its frame; the reply says which.
    reply = node._on_save(MapPath.Request(path=str(tmp_path / "again")), MapPath.Response())
    assert reply.success and "saved 3 keyframes" in reply.message and "frame 'odom'" in reply.message
    assert map_io.read_world_frame(tmp_path / "again") == "odom"
    # A reset drops the map: new frames are posed in world_frame again.
    assert node._on_reset(Trigger.Request(), Trigger.Response()).success
    assert node.status_msg().header.frame_id == "map"
