"""The nodes as managed (lifecycle) nodes, driven over real DDS (loopback only) the way a lifecycle manager
drives them: this process calls ``<node>/change_state`` and ``<node>/get_state`` (lifecycle_msgs) of node
processes started by the launcher with ``autostart:=false``.

The query node answers from a map made here in seconds (the demo room, keyframes with their features and no
training: answers come from the keyframes' views with the demo colour encoder).
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from lerf_ros.srv import Query
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from ros_harness import Client, build_views_map, launcher
from std_srvs.srv import SetBool

from lerf_ros.compat import launcher as compat_launcher
from lerf_ros.sim.scene import SyntheticRoom

KEYFRAMES = 8


class Manager(Client):
    """The harness client plus lifecycle calls on one node (``/<namespace>/<node>/...``)."""

    def __init__(self, name: str, namespace: str, node_name: str, child):
        super().__init__(name, namespace)
        self.node_name, self.child = node_name, child

    def state(self) -> str:
        reply = self.call(GetState, f"/{self.node_name}/get_state", GetState.Request(), 30.0, self.child)
        return reply.current_state.label

    def change(self, transition_id: int = 0, label: str = "") -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id, label=label))
        return self.call(ChangeState, f"/{self.node_name}/change_state", request, 60.0, self.child).success


def _ask(manager: Manager, text: str = "green sphere"):
    return manager.query(text, max_results=1, timeout=60.0, child=manager.child)


def test_query_node_transitions_over_dds(tmp_path, ros):
    build_views_map(SyntheticRoom(0), tmp_path / "map", KEYFRAMES)
    child = launcher(tmp_path / "query.log", "device:=cpu", f"map_path:={tmp_path / 'map'}", mode="query",
                     namespace="lc_query", arguments=("autostart:=false",))
    manager = None
    try:
        manager = Manager("lifecycle_manager_q", "lc_query", "lerf_query", child)
        assert manager.state() == "unconfigured"
        assert "autostart is false: unconfigured, waiting for a lifecycle manager" in child.log(20000)
        reply = _ask(manager)
        assert reply.result == Query.Response.RESULT_ERROR and "not active" in reply.message, reply.message

        # Wrong state: activate from unconfigured is refused, the reason logged, the node keeps serving.
        assert manager.change(Transition.TRANSITION_ACTIVATE) is False
        assert manager.state() == "unconfigured"
        manager.wait_for(lambda: "refused: not possible in state 'unconfigured'" in child.log(20000), 10.0,
                         "the refusal in the node's log", child)

        assert manager.change(Transition.TRANSITION_CONFIGURE) is True
        assert manager.state() == "inactive"
        reply = _ask(manager)
        assert reply.result == Query.Response.RESULT_ERROR and "'inactive'" in reply.message, reply.message

        assert manager.change(Transition.TRANSITION_ACTIVATE) is True
        assert manager.state() == "active"
        reply = _ask(manager)
        assert reply.result == Query.Response.RESULT_FOUND and reply.found, reply.message

        assert manager.change(label="deactivate") is True
        assert manager.state() == "inactive"
        reply = _ask(manager)
        assert reply.result == Query.Response.RESULT_ERROR and "not active" in reply.message, reply.message
        # Deactivate again (by label) is not a transition of 'inactive': refused.
        assert manager.change(label="deactivate") is False
        assert manager.state() == "inactive"

        assert manager.change(Transition.TRANSITION_CLEANUP) is True
        assert manager.state() == "unconfigured"
        # And back up: the map is loaded again.
        assert manager.change(Transition.TRANSITION_CONFIGURE) is True
        assert manager.change(Transition.TRANSITION_ACTIVATE) is True
        assert _ask(manager).result == Query.Response.RESULT_FOUND
        assert child.alive, child.log()
    finally:
        if manager is not None:
            manager.close()
        code = child.stop()
    assert code == 0, child.log()


def test_trainer_node_configure_activate_deactivate_over_dds(tmp_path, ros):
    child = launcher(tmp_path / "trainer.log", "device:=cpu", mode="trainer", namespace="lc_trainer",
                     arguments=("autostart:=false",))
    manager = None
    try:
        manager = Manager("lifecycle_manager_t", "lc_trainer", "lerf_trainer", child)
        assert manager.state() == "unconfigured"
        reply = manager.call(SetBool, "/lerf/pause", SetBool.Request(data=True), 30.0, child)
        assert not reply.success and "not configured" in reply.message, reply.message
        assert not manager.statuses  # no engine, nothing to report

        assert manager.change(Transition.TRANSITION_CONFIGURE) is True
        assert manager.state() == "inactive"
        assert "encoders: CLIP" in child.log(20000)  # configure built the engine
        manager.status(30.0, child)  # the status timers run from configure on

        assert manager.change(Transition.TRANSITION_ACTIVATE) is True
        assert manager.state() == "active"
        reply = manager.call(SetBool, "/lerf/pause", SetBool.Request(data=False), 30.0, child)
        assert reply.success and reply.message == "resumed", reply.message
        manager.wait_status(lambda s: s.state_name == "waiting", 10.0, "status 'waiting' (no frames)", child)

        assert manager.change(Transition.TRANSITION_DEACTIVATE) is True
        assert manager.state() == "inactive"
        manager.wait_status(lambda s: s.state_name == "paused", 10.0, "status 'paused' once inactive", child)
        reply = manager.call(SetBool, "/lerf/pause", SetBool.Request(data=False), 30.0, child)
        assert not reply.success and "not active" in reply.message, reply.message
        assert manager.change(Transition.TRANSITION_CONFIGURE) is False  # not a transition of 'inactive'

        assert manager.change(Transition.TRANSITION_CLEANUP) is True
        assert manager.state() == "unconfigured"
        assert child.alive, child.log()
    finally:
        if manager is not None:
            manager.close()
        code = child.stop()
    assert code == 0, child.log()


def test_autostart_launch_argument_is_a_checked_bool():
    plan = compat_launcher.plan_launch({"autostart": "False"}, ("trainer", "query"),
                                       default_params=str(compat_launcher.default_params_file()))
    assert plan.parameters["autostart"] is False
    plan = compat_launcher.plan_launch({}, ("trainer", "query"),
                                       default_params=str(compat_launcher.default_params_file()))
    assert "autostart" not in plan.parameters  # not given: the params file's (true)
    with pytest.raises(compat_launcher.LaunchArgumentError, match="'autostart' = 'maybe': expected true"):
        compat_launcher.plan_launch({"autostart": "maybe"}, ("query",),
                                    default_params=str(compat_launcher.default_params_file()))

