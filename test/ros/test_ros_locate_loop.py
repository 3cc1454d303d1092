"""The Locate action without DDS: the loop (``ros/locate.py``) on a simulated steady clock, goal checking
(``query_node.parse_goal``) and the feedback / result messages (``ros/messages.py``)."""

import math

import numpy as np
import pytest
from geometry_msgs.msg import Point
from lerf_ros.action import Locate
from lerf_ros.msg import Target
from lerf_ros.srv import Query
from std_msgs.msg import Header

from lerf_ros.ros.locate import LOCATE_PERIOD_S, POLL_S, LocateLoop
from lerf_ros.ros.messages import RESULTS, fill_locate_result, locate_feedback
from lerf_ros.ros.query_node import InvalidRequest, parse_goal

FOUND, NOT_FOUND, NOT_READY, ERROR = (RESULTS[k] for k in ("found", "not_found", "not_ready", "error"))


def reply(code: int, confidence: float = 0.0, relevancy: float = 0.0, step: int = 0, message: str = ""):
    r = Query.Response(result=code, found=code == FOUND, confidence=confidence, relevancy=relevancy,
                       model_step=step, message=message or f"code {code}")
    r.location.header = Header(frame_id="map")
    if code == FOUND:
        target = Target(confidence=confidence, relevancy=relevancy, point_count=9)
        target.location = Point(x=1.0, y=2.0, z=0.5)
        r.targets = [target]
        r.location.point = target.location
    else:
        r.location.point = Point(x=math.nan, y=math.nan, z=math.nan)
    return r


class Sim:
    """A steady clock that only moves when a query runs (``took`` s each) or the loop waits."""

    def __init__(self, answers, took: float = 0.1):
        self.now = 100.0
        self.answers = list(answers)
        self.took = took
        self.asked_at: list[float] = []
        self.feedback = []
        self.cancel_after: int | None = None  # cancel once this many feedbacks were sent
        self.stop_after: int | None = None

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        assert 0.0 < seconds <= POLL_S + 1e-9
        self.now += seconds

    def ask(self):
        self.asked_at.append(self.now)
        self.now += self.took
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def _after(self, count: int | None) -> bool:
        return count is not None and len(self.feedback) >= count

    def loop(self) -> LocateLoop:
        return LocateLoop(self.ask, self.feedback.append, cancelled=lambda: self._after(self.cancel_after),
                          stopping=lambda: self._after(self.stop_after), clock=self.clock, wait=self.wait)


def test_succeeds_on_the_first_finding_answer_with_feedback_for_each():
    sim = Sim([reply(NOT_READY), reply(NOT_FOUND, 0.2, 0.6, step=5), reply(FOUND, 0.9, 0.95, step=9)])
    outcome = sim.loop().run(timeout_s=30.0)
    assert outcome.state == "succeeded" and outcome.attempts == 3
    assert outcome.answer.result == FOUND and outcome.answer.model_step == 9
    assert [p.attempts for p in sim.feedback] == [1, 2, 3]
    assert [p.best.confidence for p in sim.feedback] == pytest.approx([0.0, 0.2, 0.9])
    # The next query starts a period after the previous answer ended.
    gaps = np.diff(sim.asked_at)
    np.testing.assert_allclose(gaps, sim.took + LOCATE_PERIOD_S, atol=POLL_S)


def test_best_so_far_keeps_the_most_confident_answer():
    sim = Sim([reply(NOT_FOUND, 0.4, 0.7), reply(NOT_FOUND, 0.1, 0.9), reply(NOT_FOUND, 0.3, 0.6)])
    sim.cancel_after = 3
    sim.loop().run(timeout_s=30.0)
    assert [p.best.confidence for p in sim.feedback] == pytest.approx([0.4, 0.4, 0.4])
    assert [p.last.confidence for p in sim.feedback] == pytest.approx([0.4, 0.1, 0.3])


def test_not_found_until_the_timeout_aborts_at_the_timeout():
    sim = Sim([reply(NOT_FOUND, 0.1, message="nothing stands out")])
    outcome = sim.loop().run(timeout_s=2.0)
    assert outcome.state == "aborted" and outcome.answer.result == NOT_FOUND
    assert outcome.message.startswith("timeout: not found within 2 s")
    assert "nothing stands out" in outcome.message
    assert outcome.attempts == len(sim.asked_at) == 4  # at 0, 0.6, 1.2, 1.8 s
    assert 2.0 <= sim.now - 100.0 <= 2.0 + sim.took + 1e-9
    assert sim.asked_at[-1] - 100.0 < 2.0


def test_a_slow_query_is_followed_by_an_equally_long_pause():
    sim = Sim([reply(NOT_FOUND)], took=2.0)
    sim.loop().run(timeout_s=7.0)
    np.testing.assert_allclose(np.diff(sim.asked_at), [4.0], atol=POLL_S)  # 2 s answer + 2 s pause
    assert len(sim.asked_at) == 2


def test_an_error_aborts_at_once():
    sim = Sim([reply(ERROR, message="encoder failed")])
    outcome = sim.loop().run(timeout_s=30.0)
    assert (outcome.state, outcome.attempts, outcome.message) == ("aborted", 1, "encoder failed")


def test_cancel_ends_the_goal_within_a_poll():
    sim = Sim([reply(NOT_FOUND)])
    sim.cancel_after = 2
    outcome = sim.loop().run(timeout_s=30.0)
    assert outcome.state == "canceled" and outcome.attempts == 2 and outcome.answer.result == NOT_FOUND
    # The cancel became visible when the second answer ended; the loop ended on the next check.
    assert sim.now - (sim.asked_at[-1] + sim.took) <= POLL_S + 1e-9


def test_stopping_node_aborts_running_goal():
    sim = Sim([reply(NOT_READY)])
    sim.stop_after = 1
    outcome = sim.loop().run(timeout_s=30.0)
    assert outcome.state == "aborted" and outcome.attempts == 1
    assert "shutting down" in outcome.message


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.nan])
def test_loop_needs_a_positive_timeout(timeout_s):
    with pytest.raises(ValueError, match="timeout_s"):
        Sim([reply(NOT_FOUND)]).loop().run(timeout_s)


@pytest.mark.parametrize(
    ("goal", "field"),
    [(dict(text="", timeout_s=5.0), "text"), (dict(text="   ", timeout_s=5.0), "text"),
     (dict(text="mug", timeout_s=0.0), "timeout_s"), (dict(text="mug", timeout_s=-2.0), "timeout_s"),
     (dict(text="mug", timeout_s=math.nan), "timeout_s"), (dict(text="mug", timeout_s=math.inf), "timeout_s"),
     (dict(text="mug", timeout_s=5.0, threshold=1.5), "threshold"),
     (dict(text="mug", timeout_s=5.0, max_results=0), "max_results"),
     (dict(text="mug", timeout_s=5.0, max_results=101), "max_results")],
)
def test_parse_goal_refuses_with_the_field_named(goal, field):
    fields = dict(threshold=0.0, max_results=1) | goal
    with pytest.raises(InvalidRequest, match=f"^{field}:"):
        parse_goal(Locate.Goal(**fields), max_chars=200)


def test_parse_goal_accepts_a_valid_goal():
    args = parse_goal(Locate.Goal(text=" red mug ", negatives=["", "blue mug"], timeout_s=12.5, threshold=0.0,
                                  max_results=3), max_chars=200)
    assert args.timeout_s == 12.5
    assert (args.query.text, args.query.negatives, args.query.threshold) == ("red mug", ("blue mug",), None)
    assert args.query.max_results == 3 and args.query.with_cloud is False


def test_feedback_before_and_after_found():
    rejected = reply(NOT_FOUND, 0.3, 0.7, step=4, message="not found: weak")
    msg = locate_feedback(rejected, rejected, attempts=2, elapsed_s=1.5)
    assert not msg.found and msg.confidence == pytest.approx(0.3) and msg.model_step == 4
    assert msg.best_target.relevancy == pytest.approx(0.7) and msg.best_target.point_count == 0
    assert math.isnan(msg.best_location.point.x) and math.isnan(msg.best_target.extent.z)
    assert (msg.last_result, msg.attempts, msg.message) == (NOT_FOUND, 2, "not found: weak")

    hit = reply(FOUND, 0.8, 0.9, step=6)
    msg = locate_feedback(hit, hit, attempts=3, elapsed_s=2.0)
    assert msg.found and msg.best_target.point_count == 9 and msg.confidence == pytest.approx(0.8)
    assert (msg.best_location.point.x, msg.best_location.point.y) == (1.0, 2.0)
    assert msg.best_location.header.frame_id == "map" and msg.last_result == FOUND


def test_result_copies_the_final_answer_or_says_not_ready_without_one():
    hit = reply(FOUND, 0.8, 0.9, step=6)
    result = fill_locate_result(Locate.Result(), hit, 3, "found it", Header(frame_id="map"))
    assert (result.result, result.found, result.attempts, result.model_step) == (FOUND, True, 3, 6)
    assert len(result.targets) == 1 and result.location.point.z == 0.5
    none = fill_locate_result(Locate.Result(), None, 0, "cancelled after 0 queries", Header(frame_id="odom"))
    assert none.result == NOT_READY and not none.found and none.targets == []
    assert none.location.header.frame_id == "odom" and math.isnan(none.location.point.x)
