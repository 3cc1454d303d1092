"""The query node's request checks and result codes, in-process: ``parse_request`` on hand-built requests, and
the service callback called directly with engines that fail in each way (no DDS, no spinning)."""

import math
import threading

import numpy as np
import pytest
import rclpy
from lerf_ros.srv import Query

from lerf_ros.core.language.query import MAX_RESULTS_LIMIT, QueryResult
from lerf_ros.ros.engine_slot import EngineSlot
from lerf_ros.ros.query_node import MAX_NEGATIVES, InvalidRequest, QueryNode, parse_request

MAX_CHARS = 50


def _request(**fields):
    values = {"text": "red box", "threshold": 0.0, "with_cloud": False, "max_results": 3, **fields}
    return Query.Request(**values)


def test_parse_request_normalises_a_good_request():
    args = parse_request(_request(text="  red box ", negatives=["blue box", "  ", ""], threshold=0.75,
                                  with_cloud=True), MAX_CHARS)
    assert (args.text, args.negatives) == ("red box", ("blue box",))
    assert (args.with_cloud, args.max_results) == (True, 3)
    assert args.threshold == pytest.approx(0.75)
    # <= 0: the node's query_threshold parameter decides.
    assert parse_request(_request(threshold=-1.0), MAX_CHARS).threshold is None
    assert parse_request(_request(threshold=0.0), MAX_CHARS).threshold is None
    assert parse_request(_request(threshold=1.0), MAX_CHARS).threshold == 1.0
    for k in (1, MAX_RESULTS_LIMIT):
        assert parse_request(_request(max_results=k), MAX_CHARS).max_results == k


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"max_results": 0}, "max_results"), ({"max_results": MAX_RESULTS_LIMIT + 1}, "max_results"),
     ({"max_results": 2**32 - 1}, "max_results"), ({"threshold": 1.5}, "threshold"),
     ({"threshold": math.nan}, "threshold"), ({"threshold": math.inf}, "threshold"),
     ({"text": ""}, "text"), ({"text": " \t "}, "text"), ({"text": "r" * (MAX_CHARS + 1)}, "text"),
     ({"negatives": ["x"] * (MAX_NEGATIVES + 1)}, "negatives"),
     ({"negatives": ["n" * (MAX_CHARS + 1)]}, "negatives")],
    ids=["k=0", "k=101", "k=uint32max", "thr=1.5", "thr=nan", "thr=inf", "empty", "blank", "long-text",
         "33-negatives", "long-negative"],
)
def test_parse_request_refuses_naming_the_field(fields, field):
    with pytest.raises(InvalidRequest, match=f"^{field}: "):
        parse_request(_request(**fields), MAX_CHARS)


class _Engine:
    """Answers with ``answer`` (a QueryResult) or raises ``error``; records the arguments."""

    def __init__(self, answer=None, error=None):
        self.answer, self.error, self.calls = answer, error, []
        self.lock = threading.RLock()

    def query(self, text, negatives=(), threshold=None, with_cloud=True, max_results=1):
        self.calls.append((text, tuple(negatives), threshold, with_cloud, max_results))
        if self.error is not None:
            raise self.error
        return self.answer


def _not_ready():
    return QueryResult(found=False, message="no model yet: 0 keyframes", location_world=None, relevancy=0.0,
                       scale_m=0.0, cloud_xyz=np.zeros((0, 3), np.float32),
                       cloud_relevancy=np.zeros(0, np.float32), cloud_rgb=np.zeros((0, 3), np.uint8))


@pytest.fixture
def query_node():
    rclpy.init()
    node = None
    calls = []
    try:
        node = QueryNode(EngineSlot(), node_name="query_under_test", after_call=lambda: calls.append(1))
        yield node, calls
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


def _ask(node, **fields):
    return node._on_query(_request(**fields), Query.Response())


def test_each_outcome_has_its_code_and_every_reply_is_followed_by_after_call(query_node):
    node, after = query_node
    node.slot.set(None, "map_path '/nope' does not exist")
    reply = _ask(node)
    assert reply.result == Query.Response.RESULT_ERROR and "/nope" in reply.message
    engine = _Engine(answer=_not_ready())
    node.slot.set(engine)
    reply = _ask(node, threshold=0.0, max_results=7)
    assert reply.result == Query.Response.RESULT_NOT_READY and not reply.found
    # The node's query_threshold replaced the request's 0; max_results went through unchanged; the cloud is
    # always computed (RViz gets it), though this request has with_cloud false.
    assert engine.calls == [("red box", (), pytest.approx(node._threshold()), True, 7)]
    reply = _ask(node, max_results=0)
    assert reply.result == Query.Response.RESULT_INVALID_REQUEST and len(engine.calls) == 1
    for error in (RuntimeError("CUDA out of memory"), ValueError("encode_texts returned non-unit rows"),
                  KeyError("boom")):
        node.slot.set(_Engine(error=error))
        reply = _ask(node)
        assert reply.result == Query.Response.RESULT_ERROR and type(error).__name__ in reply.message
        assert not reply.found and math.isnan(reply.location.point.x) and reply.cloud.width == 0
    assert len(after) == 6


def test_a_failing_after_call_does_not_lose_the_reply(query_node):
    node, _ = query_node

    def broken():
        raise RuntimeError("publisher gone")

    node.after_call = broken
    node.slot.set(_Engine(answer=_not_ready()))
    assert _ask(node).result == Query.Response.RESULT_NOT_READY


class _Recorder:
    """Stands in for a publisher: keeps what would have been published."""

    def __init__(self):
        self.messages = []

    def publish(self, msg):
        self.messages.append(msg)


def _found(n_points=5):
    from lerf_ros.core.language.query import Target

    def target(centre, confidence):
        centre = np.asarray(centre, dtype=np.float64)
        return Target(location_world=centre, box_min=centre - 0.1, box_max=centre + 0.1, relevancy=0.9,
                      confidence=confidence, point_count=40, scale_m=0.25, view_support=float("nan"),
                      competitor="pink", competitor_relevancy=0.5, z_score=9.0)

    targets = (target([0.6, 0.4, 0.2], 0.9), target([-0.6, 0.4, 0.2], 0.8))
    rng = np.random.default_rng(0)
    return QueryResult(found=True, message="found", location_world=targets[0].location_world, relevancy=0.9,
                       scale_m=0.25, cloud_xyz=rng.normal(size=(n_points, 3)).astype(np.float32),
                       cloud_relevancy=np.linspace(0.6, 0.9, n_points, dtype=np.float32),
                       cloud_rgb=np.full((n_points, 3), 200, np.uint8), model_step=300, confidence=0.9,
                       targets=targets)


def test_every_answer_goes_to_rviz_whatever_the_requests_with_cloud(query_node):
    from visualization_msgs.msg import Marker

    from lerf_ros.ros.messages import msg_to_cloud

    node, _ = query_node
    node.cloud_pub, node.marker_pub = clouds, markers = _Recorder(), _Recorder()
    answer = _found()
    engine = _Engine(answer=answer)
    node.slot.set(engine)
    reply = _ask(node, with_cloud=False, max_results=2)
    assert reply.result == Query.Response.RESULT_FOUND and len(reply.targets) == 2
    # The reply leaves the cloud out as asked (an empty cloud that still declares its fields) ...
    assert reply.cloud.width == 0 and len(reply.cloud.fields) == 5
    # ... RViz gets it all the same, with the answer's points.
    [cloud] = clouds.messages
    np.testing.assert_array_equal(msg_to_cloud(cloud)[0], answer.cloud_xyz)
    # One MarkerArray per answer: clear the previous one, then sphere + label per target, best first.
    [array] = markers.messages
    assert [m.action for m in array.markers] == [Marker.DELETEALL] + [Marker.ADD] * 4
    assert [m.type for m in array.markers[1:]] == [Marker.SPHERE, Marker.TEXT_VIEW_FACING] * 2
    spheres = [m for m in array.markers if m.type == Marker.SPHERE]
    assert [s.pose.position.x for s in spheres] == [t.location.x for t in reply.targets] == [0.6, -0.6]
    reply = _ask(node, with_cloud=True, max_results=2)
    assert reply.cloud.width == 5 and [c.width for c in clouds.messages] == [5, 5]
    # An answer without targets clears RViz's markers; a refused request publishes nothing.
    engine.answer = _not_ready()
    _ask(node)
    assert [m.action for m in markers.messages[-1].markers] == [Marker.DELETEALL]
    assert clouds.messages[-1].width == 0
    count = (len(clouds.messages), len(markers.messages))
    assert _ask(node, text=" ").result == Query.Response.RESULT_INVALID_REQUEST
    assert (len(clouds.messages), len(markers.messages)) == count


def test_answers_are_in_the_frame_of_the_maps_data(query_node):
    node, _ = query_node
    node.cloud_pub, node.marker_pub = clouds, markers = _Recorder(), _Recorder()
    # A loaded map recorded 'odom' while the parameter says 'map': the map's frame labels the answer.
    node.slot.set(_Engine(answer=_found()), frame="odom")
    reply = _ask(node, with_cloud=True)
    assert reply.location.header.frame_id == reply.cloud.header.frame_id == "odom"
    assert clouds.messages[-1].header.frame_id == "odom"
    assert {m.header.frame_id for m in markers.messages[-1].markers} == {"odom"}
    node.slot.set(_Engine(answer=_found()))  # a fresh model: the world_frame parameter
    assert _ask(node).location.header.frame_id == node.settings.world_frame == "map"
