"""Query.srv's result codes and target arrays over real DDS (loopback only), from this process to a
``lerf_node`` process (via the launcher) that gets no camera.

The map with two instances of a colour is made here in a few seconds: the demo room with its blue cylinder
painted red, 12 keyframes with measured depth and their features, no training. Such a map answers from the
keyframes' own crop embeddings (the engine's "views" source, model_step 0), which is enough to check the
interface; the trained-field path is covered by test_ros_integration.py. The status rate is set to its
slowest (one message per 10 s) so that a TrainingStatus within a few seconds of a call is the one published
after the call. Tests run in file order: nothing loaded, then pause + load_map, then queries.
"""

import dataclasses
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from lerf_ros.srv import Query
from ros_harness import Client, build_views_map, launcher

from lerf_ros.core.presets import make_preset
from lerf_ros.sim.scene import SyntheticRoom

pytestmark = pytest.mark.slow

NAMESPACE = "targets"
KEYFRAMES = 12
RED = (200, 30, 30)
THRESHOLD = make_preset("tiny").query.threshold
MARGIN_M = 0.05
# The CPU preset (demo colour encoders), and the slowest status rate the parameter allows.
NODE_SETS = ("preset:=tiny", "device:=cpu", "status_rate_hz:=0.1")


def two_red_room() -> SyntheticRoom:
    room = SyntheticRoom(0)
    room.objects = tuple(dataclasses.replace(o, name="red cylinder", colour_name="red", rgb=RED)
                         if o.name == "blue cylinder" else o for o in room.objects)
    return room


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    import rclpy

    work = tmp_path_factory.mktemp("query_targets")
    room = two_red_room()
    keyframes = build_views_map(room, work / "map", KEYFRAMES)
    rclpy.init()
    node = launcher(work / "lerf_node.log", *NODE_SETS, namespace=NAMESPACE)
    client = Client("query_targets_client", namespace=NAMESPACE)
    try:
        client.status(timeout=120.0, child=node)  # the node is up (and discovered)
        yield {"client": client, "node": node, "room": room, "map": work / "map", "keyframes": keyframes,
               "work": work}
    finally:
        client.close()
        code = node.stop()
        rclpy.try_shutdown()
        assert code == 0, node.log()


def _location(reply) -> np.ndarray:
    p = reply.location.point
    return np.array([p.x, p.y, p.z])


def _xyz(v) -> np.ndarray:
    return np.array([v.x, v.y, v.z])


def _assert_answers_nothing(reply):
    assert not reply.found and len(reply.targets) == 0
    assert reply.location.header.frame_id == "map"
    assert np.isnan(_location(reply)).all()
    assert reply.cloud.width == 0 and len(reply.cloud.fields) == 5


def test_query_before_any_frames_is_not_ready_and_publishes_status(session):
    client, node = session["client"], session["node"]
    reply, status = client.after_call_status(lambda: client.query("red", max_results=3, child=node),
                                             child=node)
    assert reply.result == Query.Response.RESULT_NOT_READY, reply.message
    _assert_answers_nothing(reply)
    assert reply.model_step == 0 and reply.relevancy == 0.0 and reply.confidence == 0.0
    assert status.keyframes == 0 and status.state_name == "waiting"


def test_pause_and_load_map_publish_status(session):
    from lerf_ros.srv import MapPath
    from std_srvs.srv import SetBool

    client, node = session["client"], session["node"]
    # Paused first, so the loaded map is not trained: its answers stay the keyframes' own (model_step 0).
    reply, _ = client.after_call_status(
        lambda: client.call(SetBool, "/lerf/pause", SetBool.Request(data=True), child=node), child=node)
    assert reply.success
    # The pause reply's status may still say "waiting"; the state watch publishes the change at once.
    client.wait_status(lambda s: s.state_name == "paused", 3.0, "state paused", node)
    reply, status = client.after_call_status(
        lambda: client.call(MapPath, "/lerf/load_map", MapPath.Request(path=str(session["map"])), child=node),
        child=node)
    assert reply.success, reply.message
    assert status.keyframes == session["keyframes"] == KEYFRAMES and status.step == 0
    # load_map starts a fresh worker on the new map, paused from its start (it takes no step).
    client.wait_status(lambda s: s.state_name == "paused" and s.keyframes == KEYFRAMES, 3.0,
                       "the loaded map, paused", node)


@pytest.mark.parametrize(
    ("text", "threshold", "max_results", "field"),
    [("red", 0.0, 0, "max_results"), ("red", 0.0, 101, "max_results"), ("red", 1.5, 3, "threshold"),
     ("red", float("nan"), 3, "threshold"), ("  ", 0.0, 3, "text")],
    ids=["max_results=0", "max_results=101", "threshold=1.5", "threshold=nan", "blank-text"],
)
def test_invalid_requests_are_refused_with_their_code(session, text, threshold, max_results, field):
    client, node = session["client"], session["node"]
    # The loaded map would find "red": the refusal comes from the request alone.
    reply = client.query(text, threshold=threshold, max_results=max_results, child=node)
    assert reply.result == Query.Response.RESULT_INVALID_REQUEST, reply.message
    assert reply.message.startswith(field + ":"), reply.message
    _assert_answers_nothing(reply)
    assert reply.model_step == 0
    assert node.alive


def test_two_instances_of_a_colour_give_targets_best_first(session):
    client, node, room = session["client"], session["node"], session["room"]
    reply, _ = client.after_call_status(lambda: client.query("red", max_results=3, child=node), child=node)
    assert reply.result == Query.Response.RESULT_FOUND and reply.found, reply.message
    assert reply.model_step == 0  # answered from the keyframes' views, and not mistaken for "not ready"
    assert 2 <= len(reply.targets) <= 3
    assert reply.location.header.frame_id == "map"
    np.testing.assert_array_equal(_xyz(reply.targets[0].location), _location(reply))
    assert reply.confidence == pytest.approx(reply.targets[0].confidence)
    assert reply.relevancy == pytest.approx(reply.targets[0].relevancy)
    ranks = [(t.confidence, t.relevancy) for t in reply.targets]
    assert ranks == sorted(ranks, reverse=True), ranks
    reds = [room.object("red box"), room.object("red cylinder")]
    hit = set()
    for t in reply.targets:
        loc, center, extent = _xyz(t.location), _xyz(t.box_center), _xyz(t.extent)
        assert t.confidence >= THRESHOLD and 0.5 < t.relevancy <= 1.0 and t.point_count >= 3
        assert 0.0 < t.scale and (math.isnan(t.view_support) or 0.0 <= t.view_support <= 1.0)
        # The location lies in its own box, which is a patch of one red object's surface.
        assert np.all(np.abs(loc - center) <= extent / 2 + 1e-6), (loc, center, extent)
        owner = [o for o in reds if np.all(center - extent / 2 >= o.box_min - MARGIN_M)
                 and np.all(center + extent / 2 <= o.box_max + MARGIN_M)]
        assert len(owner) == 1, (loc, center, extent)
        assert np.all(extent >= 0.0) and np.all(extent <= owner[0].size + MARGIN_M)
        assert extent.max() >= 0.05, extent  # a patch, not a single voxel
        hit.add(owner[0].name)
    assert hit == {"red box", "red cylinder"}

    one = client.query("red", max_results=1, child=node)
    assert one.result == Query.Response.RESULT_FOUND and len(one.targets) == 1
    np.testing.assert_allclose(_location(one), _location(reply), atol=1e-9)


def test_absent_colour_is_not_found(session):
    client, node = session["client"], session["node"]
    reply = client.query("blue cylinder", max_results=3, child=node)  # painted red in this room
    assert reply.result == Query.Response.RESULT_NOT_FOUND, reply.message
    assert not reply.found and len(reply.targets) == 0 and np.isnan(_location(reply)).all()
    assert reply.confidence < THRESHOLD


def test_save_map_publishes_status(session):
    from lerf_ros.srv import MapPath

    client, node = session["client"], session["node"]
    path = session["work"] / "saved"
    reply, status = client.after_call_status(
        lambda: client.call(MapPath, "/lerf/save_map", MapPath.Request(path=str(path)), child=node),
        child=node)
    assert reply.success, reply.message
    assert status.keyframes == KEYFRAMES and (path / "config.json").is_file()
