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
    # The node's query_threshold replaced the request's 0; max_results went through unchanged.
    assert engine.calls == [("red box", (), pytest.approx(node._threshold()), False, 7)]
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
