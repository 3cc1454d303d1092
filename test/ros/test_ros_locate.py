"""lerf_ros/action/Locate over real DDS (loopback only): this process is the planner, a standalone query node
process (via the launcher) serves ``lerf/locate`` beside ``lerf/query`` from a saved map.

The map is made here in seconds: the demo room, 8 keyframes with measured depth and their features, no
training, so it answers from the keyframes' own crop embeddings (model_step 0) with the demo colour encoder:
"green sphere" is in the room, "purple" is not. Tests run in file order; the last one stops the node while
a goal runs.
"""

import math
import pathlib
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from action_msgs.msg import GoalStatus
from action_msgs.srv import CancelGoal
from lerf_ros.action import Locate
from lerf_ros.srv import Query
from ros_harness import Client, build_views_map, launcher

from lerf_ros.sim.scene import SyntheticRoom

pytestmark = pytest.mark.slow

NAMESPACE = "locate"
KEYFRAMES = 8
MARGIN_M = 0.05
PRESENT, ABSENT = "green sphere", "purple"


class Planner(Client):
    """The harness client plus a Locate action client."""

    def __init__(self, name: str, namespace: str, child):
        super().__init__(name, namespace)
        from rclpy.action import ActionClient

        self.child = child
        self.action = ActionClient(self.node, Locate, f"{self.prefix}/lerf/locate")
        self.wait_for(self.action.server_is_ready, 60.0, "the lerf/locate action server", child)

    def send(self, text: str, timeout_s: float, **fields):
        """(goal handle, feedback list) once the server has accepted or rejected the goal."""
        feedback: list = []
        goal = Locate.Goal(text=text, timeout_s=float(timeout_s), threshold=fields.pop("threshold", 0.0),
                           max_results=fields.pop("max_results", 1), **fields)
        future = self.action.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback))
        handle = self.wait_for(lambda: future.result() if future.done() else None, 30.0, "goal response",
                               self.child)
        return handle, feedback

    def result(self, handle, timeout: float):
        future = handle.get_result_async()
        return self.wait_for(lambda: future.result() if future.done() else None, timeout, "goal result",
                             self.child)

    def close(self) -> None:
        self.action.destroy()
        super().close()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    import rclpy

    work = tmp_path_factory.mktemp("locate")
    room = SyntheticRoom(0)
    build_views_map(room, work / "map", KEYFRAMES)
    rclpy.init()
    node = launcher(work / "query_node.log", "device:=cpu", f"map_path:={work / 'map'}", mode="query",
                    namespace=NAMESPACE)
    planner = None
    try:
        planner = Planner("locate_planner", NAMESPACE, node)
        yield {"planner": planner, "node": node, "room": room}
    finally:
        if planner is not None:
            planner.close()
        code = node.stop()
        rclpy.try_shutdown()
        assert code == 0, node.log()


def _xyz(v) -> np.ndarray:
    return np.array([v.x, v.y, v.z])


def test_an_object_in_the_room_is_found_with_feedback(session):
    planner, room = session["planner"], session["room"]
    handle, feedback = planner.send(PRESENT, timeout_s=30.0, max_results=2)
    assert handle.accepted
    reply = planner.result(handle, 60.0)
    result = reply.result
    assert reply.status == GoalStatus.STATUS_SUCCEEDED, result.message
    assert result.result == Locate.Result.RESULT_FOUND and result.found
    assert 1 <= len(result.targets) <= 2 and result.attempts >= 1
    assert result.location.header.frame_id == "map"
    location = _xyz(result.location.point)
    np.testing.assert_array_equal(location, _xyz(result.targets[0].location))
    sphere = room.object(PRESENT)
    assert np.all(location >= sphere.box_min - MARGIN_M) and np.all(location <= sphere.box_max + MARGIN_M), \
        (location, sphere.box_min, sphere.box_max)
    assert result.confidence == pytest.approx(result.targets[0].confidence)
    # Feedback goes out before the result; the topic may deliver it just after.
    last = planner.wait_for(lambda: feedback and feedback[-1].found and feedback[-1], 5.0,
                            "feedback with the found target", session["node"])
    assert last.last_result == Locate.Result.RESULT_FOUND and last.attempts == result.attempts
    np.testing.assert_allclose(_xyz(last.best_location.point), location)
    assert last.confidence == pytest.approx(result.confidence)
    assert last.best_location.header.frame_id == "map"


def test_an_absent_name_ends_not_found_at_its_timeout(session):
    planner = session["planner"]
    timeout_s = 2.0
    start = time.monotonic()
    handle, feedback = planner.send(ABSENT, timeout_s=timeout_s)
    assert handle.accepted
    reply = planner.result(handle, 30.0)
    took = time.monotonic() - start
    result = reply.result
    assert reply.status == GoalStatus.STATUS_ABORTED, result.message
    assert result.result == Locate.Result.RESULT_NOT_FOUND and not result.found and result.targets == []
    assert math.isnan(result.location.point.x)
    assert result.message.startswith(f"timeout: not found within {timeout_s:g} s"), result.message
    assert took >= timeout_s and result.attempts >= 2
    planner.wait_for(lambda: len(feedback) >= result.attempts, 5.0, "one feedback per query", session["node"])
    assert [f.attempts for f in feedback] == list(range(1, result.attempts + 1))
    assert all(not f.found and f.last_result == Locate.Result.RESULT_NOT_FOUND for f in feedback)
    assert all(math.isnan(f.best_location.point.x) for f in feedback)
    assert feedback[-1].elapsed_s < timeout_s + 0.5


@pytest.mark.parametrize(
    ("text", "timeout_s", "fields"),
    [("", 5.0, {}), ("   ", 5.0, {}), (PRESENT, 0.0, {}), (PRESENT, -1.0, {}), (PRESENT, math.nan, {}),
     (PRESENT, 5.0, {"max_results": 0}), (PRESENT, 5.0, {"threshold": 1.5})],
    ids=["empty-text", "blank-text", "timeout=0", "timeout<0", "timeout=nan", "max_results=0", "threshold>1"],
)
def test_bad_goals_are_rejected(session, text, timeout_s, fields):
    handle, feedback = session["planner"].send(text, timeout_s, **fields)
    assert not handle.accepted
    assert feedback == [] and session["node"].alive


def test_goals_cancelled_midway_end_canceled_while_queries_still_answer(session):
    planner, node = session["planner"], session["node"]
    first, feedback_a = planner.send(ABSENT, timeout_s=60.0)
    second, feedback_b = planner.send(ABSENT, timeout_s=60.0)
    assert first.accepted and second.accepted
    third, _ = planner.send(ABSENT, timeout_s=60.0)
    assert not third.accepted  # two goals run at once at most
    planner.wait_for(lambda: feedback_a and feedback_b, 30.0, "feedback from both goals", node)
    # lerf/query is served beside the running goals.
    answer = planner.query(PRESENT, child=node, timeout=30.0)
    assert answer.result == Query.Response.RESULT_FOUND, answer.message

    start = time.monotonic()
    for handle in (first, second):
        future = handle.cancel_goal_async()
        response = planner.wait_for(lambda f=future: f.result() if f.done() else None, 10.0, "cancel reply",
                                    node)
        assert response.return_code == CancelGoal.Response.ERROR_NONE
        assert len(response.goals_canceling) == 1
    for handle in (first, second):
        reply = planner.result(handle, 10.0)
        assert reply.status == GoalStatus.STATUS_CANCELED, reply.result.message
        assert reply.result.result == Locate.Result.RESULT_NOT_FOUND and reply.result.attempts >= 1
        assert reply.result.message.startswith("cancelled after")
    assert time.monotonic() - start < 10.0  # far from the 60 s timeout: the cancel ended them
    handle, _ = planner.send(ABSENT, timeout_s=1.0)  # both slots are free again
    assert handle.accepted
    assert planner.result(handle, 30.0).status == GoalStatus.STATUS_ABORTED


def test_stopping_the_node_with_a_goal_running_does_not_hang(session):
    planner, node = session["planner"], session["node"]
    handle, feedback = planner.send(ABSENT, timeout_s=120.0)
    assert handle.accepted
    planner.wait_for(lambda: feedback, 30.0, "feedback", node)
    start = time.monotonic()
    code = node.stop(timeout=15.0)  # SIGINT; SIGKILL (code -9) if it has not exited by then
    assert code == 0, node.log()
    assert time.monotonic() - start < 15.0
    assert "locate 'purple': aborted" in node.log(20000), node.log()
