"""The no-`ros2 launch` starter: params YAML parsing, overrides, validation; the launch arguments (nav2-style:
namespace, use_sim_time, params_file, log_level) of both it and launch/lerf.launch.py, good and bad."""

import pathlib
import sys
import textwrap

import pytest

from lerf_ros.compat import launcher
from lerf_ros.ros import params

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "lerf.yaml"
LAUNCH = ROOT / "launch" / "lerf.launch.py"

YAML = textwrap.dedent("""
    /**:
      ros__parameters:
        world_frame: map
        preset: tiny
    lerf_trainer:
      ros__parameters:
        queue_size: 4
        world_frame: odom
    robot1:
      lerf_query:
        ros__parameters:
          max_query_chars: 50
    other_node:
      ros__parameters:
        queue_size: 99
""")


def test_parse_wildcard_node_and_namespaced_entries():
    parsed = launcher.parse_params_yaml(YAML)
    assert parsed["/**"] == {"world_frame": "map", "preset": "tiny"}
    assert parsed["/lerf_trainer"] == {"queue_size": 4, "world_frame": "odom"}
    assert parsed["/robot1/lerf_query"] == {"max_query_chars": 50}
    # The node's own entry wins over the wildcard; other nodes' entries are not applied.
    assert launcher.params_for_node(parsed, "lerf_trainer") == {"world_frame": "odom", "preset": "tiny",
                                                                "queue_size": 4}
    assert launcher.params_for_node(parsed, "lerf_query") == {"world_frame": "map", "preset": "tiny"}


@pytest.mark.parametrize("text", ["- a\n- b\n", "node: 3\n", "node:\n  something: {}\n",
                                  "node:\n  ros__parameters: [1, 2]\n"])
def test_parse_rejects_malformed_yaml(text):
    with pytest.raises(ValueError):
        launcher.parse_params_yaml(text)


def test_set_values_are_typed_like_rcl_does():
    assert launcher.parse_set("queue_size:=3") == ("queue_size", 3)
    assert launcher.parse_set("tf_timeout_s:=0.5") == ("tf_timeout_s", 0.5)
    assert launcher.parse_set("map_path:=") == ("map_path", "")
    assert launcher.parse_set("clip_encoder:=a.b:make") == ("clip_encoder", "a.b:make")
    with pytest.raises(ValueError, match="name:=value"):
        launcher.parse_set("queue_size=3")


def test_ros_args_pass_the_files_and_namespace():
    args = launcher.ros_args("config/lerf.yaml", "/tmp/o.yaml", "robot1")
    assert args == ["--ros-args", "--params-file", str(CONFIG), "--params-file", "/tmp/o.yaml",
                    "-r", "__ns:=/robot1"]
    assert launcher.ros_args(str(CONFIG)) == ["--ros-args", "--params-file", str(CONFIG)]


def test_overrides_yaml_addresses_every_precedence_level():
    parsed = launcher.parse_params_yaml(launcher.overrides_yaml(["preset:=lite", "map_path:="], "robot1"))
    assert set(parsed) == {"/**", "/**/lerf_trainer", "/robot1/lerf_trainer", "/**/lerf_query",
                           "/robot1/lerf_query"}
    assert all(body == {"preset": "lite", "map_path": ""} for body in parsed.values())


@pytest.mark.parametrize("namespace", ["", "robot1"])
def test_set_beats_every_kind_of_yaml_entry_in_rcl(tmp_path, namespace):
    # What rcl itself does with the launcher's command line (the node is never spun).
    import rclpy
    from rclpy.node import Node

    user = tmp_path / "user.yaml"
    user.write_text("/**:\n  ros__parameters: {queue_size: 2, tf_timeout_s: 0.4}\n"
                    "/**/lerf_trainer:\n  ros__parameters: {queue_size: 3}\n"
                    "lerf_trainer:\n  ros__parameters: {queue_size: 4}\n")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(launcher.overrides_yaml(["queue_size:=9"], namespace))
    rclpy.init(args=["test", *launcher.ros_args(str(user), str(overrides), namespace)])
    try:
        node = Node(params.TRAINER_NODE_NAME, automatically_declare_parameters_from_overrides=True)
        assert node.get_parameter("queue_size").value == 9
        assert node.get_parameter("tf_timeout_s").value == 0.4  # not overridden: the user's value
        assert node.get_namespace() == ("/" + namespace if namespace else "/")
        node.destroy_node()
    finally:
        rclpy.try_shutdown()


def test_effective_params_of_the_shipped_config(tmp_path):
    trainer = launcher.effective_params(str(CONFIG), ["preset:=lite"], params.TRAINER_NODE_NAME)
    assert trainer["preset"] == "lite"  # --set wins over the YAML
    assert trainer["image_topic"] == "camera/color/image_raw"  # relative: a namespace moves it
    query = launcher.effective_params(str(CONFIG), [], params.QUERY_NODE_NAME)
    assert query["map_path"] == "" and query["world_frame"] == "map"
    # Every name in the shipped YAML is a parameter, and its value passes validation.
    shipped = launcher.parse_params_yaml(CONFIG.read_text())
    assert set(shipped) == {"/**"}  # see the YAML's header: node sections would beat launch arguments
    for name, value in shipped["/**"].items():
        assert name in params.SPECS, name
        params.check_value(params.SPECS[name], value)


def test_check_mode_accepts_the_shipped_config_and_rejects_bad_values(capsys):
    assert launcher.main(["--params", str(CONFIG), "--check"]) == 0
    assert launcher.main(["--params", str(CONFIG), "--set", "device:=tpu", "--check"]) == 2
    assert "'device'" in capsys.readouterr().err
    assert launcher.main(["--params", str(CONFIG), "--set", "queue_size:=0", "--mode", "trainer"]) == 2
    assert "'queue_size'" in capsys.readouterr().err
    assert launcher.main(["--params", str(CONFIG), "--set", "bogus:=1", "--check"]) == 2
    assert launcher.main(["--params", "/nonexistent/lerf.yaml", "--check"]) == 2


class _Stub:
    """Records its constructor's arguments (stands in for launch / launch_ros classes)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration(_Stub):
    def perform(self, context):
        return context[self.args[0]]


def _load_launch_file(monkeypatch):
    """launch/lerf.launch.py imported with stand-ins for launch, launch_ros and ament_index_python (not
    installable here): what it declares and the Node it builds are checked, not ros2 launch itself."""
    import importlib.util
    import types

    stubs = {
        "launch": {"LaunchDescription": _Stub},
        "launch.actions": {"DeclareLaunchArgument": _Stub, "OpaqueFunction": _Stub},
        "launch.substitutions": {"LaunchConfiguration": _LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": _Stub},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda package: str(ROOT)},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("lerf_launch_under_test", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_launch(monkeypatch, *cli):
    """``ros2 launch lerf_ros lerf.launch.py *cli`` with the stand-ins: (declared defaults, Node kwargs)."""
    module = _load_launch_file(monkeypatch)
    description = module.generate_launch_description()
    *declared, setup = description.args[0]
    defaults = {d.args[0]: d.kwargs["default_value"] for d in declared}
    monkeypatch.setattr(sys, "argv", ["/opt/ros/jazzy/bin/ros2", "launch", "lerf_ros", "lerf.launch.py",
                                      *cli])
    given = dict(item.split(":=", 1) for item in cli)
    context = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    [node] = setup.kwargs["function"](context)
    return defaults, node.kwargs


def test_launch_file_declares_the_launchers_arguments_with_their_defaults(monkeypatch):
    defaults, node = _run_launch(monkeypatch)
    assert tuple(defaults) == launcher.ALL_LAUNCH_ARGUMENTS
    assert defaults["params_file"] == str(CONFIG) and defaults["use_sim_time"] == "false"
    assert (defaults["namespace"], defaults["log_level"]) == ("", "info")
    for name in launcher.LAUNCH_ARGUMENTS:
        assert defaults[name] == launcher.FROM_PARAMS_FILE, name
        # Passed as strings; the boolean ones (autostart) and the lists (cameras) checked and converted by
        # plan_launch.
        want = bool if name in launcher.BOOL_ARGUMENTS else list if name in launcher.LIST_ARGUMENTS else str
        assert name in params.SPECS and params.SPECS[name].type is want, name
    # Nothing given: the shipped YAML's values reach the nodes; only use_sim_time (false) is overridden.
    assert node["executable"] == "lerf_node" and node["namespace"] == ""
    assert node["ros_arguments"] == ["--log-level", "info"]
    params_file, overrides = node["parameters"]
    assert params_file == str(CONFIG)
    parsed = launcher.parse_params_yaml(pathlib.Path(overrides).read_text())
    assert all(body == {"use_sim_time": False} for body in parsed.values())
    trainer = launcher.effective_params(params_file, parsed["/**"], params.TRAINER_NODE_NAME)
    assert trainer["preset"] == "default" and trainer["image_topic"] == "camera/color/image_raw"


def test_launch_file_arguments_reach_the_node(monkeypatch, tmp_path):
    user = tmp_path / "robot.yaml"
    user.write_text("/**/lerf_trainer:\n  ros__parameters: {image_topic: head/image, preset: tiny}\n")
    _, node = _run_launch(monkeypatch, "namespace:=robot1", "use_sim_time:=True", "log_level:=DEBUG",
                          f"params_file:={user}", "image_topic:=front/image", "depth_topic:=")
    assert node["namespace"] == "/robot1" and node["ros_arguments"] == ["--log-level", "debug"]
    params_file, overrides = node["parameters"]
    assert params_file == str(user)
    parsed = launcher.parse_params_yaml(pathlib.Path(overrides).read_text())
    assert parsed["/robot1/lerf_trainer"] == {"image_topic": "front/image", "depth_topic": "",
                                              "use_sim_time": True}
    # What rcl gives the trainer from both files (merged per key, keys in order of first appearance): the
    # arguments beat the user's node section, the rest of it stays.
    merged = {key: dict(body) for key, body in launcher.parse_params_yaml(user.read_text()).items()}
    for key, body in parsed.items():
        merged.setdefault(key, {}).update(body)
    trainer = launcher.params_for_node(merged, "/robot1/lerf_trainer")
    assert trainer["image_topic"] == "front/image" and trainer["preset"] == "tiny"
    assert trainer["use_sim_time"] is True


def test_launch_file_cameras_reach_the_node_as_a_list(monkeypatch):
    for cli in ("cameras:=[head_camera, wrist_camera]", "cameras:=head_camera,wrist_camera"):
        _, node = _run_launch(monkeypatch, cli)
        text = pathlib.Path(node["parameters"][1]).read_text()
        assert "&id" not in text  # no YAML aliases: rcl's params parser does not read them
        for body in launcher.parse_params_yaml(text).values():
            assert body["cameras"] == ["head_camera", "wrist_camera"]


@pytest.mark.parametrize(
    ("cli", "needle"),
    [(["use_sim_time:=maybe"], "'use_sim_time' = 'maybe': expected true or false"),
     (["bogus:=1"], "'bogus' = '1': unknown launch argument"),
     (["params_file:=/nonexistent/lerf.yaml"], "'params_file' = '/nonexistent/lerf.yaml': no such file"),
     (["log_level:=loud"], "'log_level' = 'loud'"),
     (["namespace:=1robot"], "'namespace' = '1robot'"),
     (["device:=tpu"], "parameter 'device' = 'tpu'"),
     (["cameras:=[head_camera, 2nd_camera]"], "'2nd_camera' is not a ROS namespace")],
    ids=["sim-time-not-bool", "unknown", "params-file-missing", "log-level", "namespace", "parameter",
         "camera-namespace"])
def test_launch_file_refuses_bad_arguments_naming_them(monkeypatch, cli, needle):
    with pytest.raises(ValueError) as info:
        _run_launch(monkeypatch, *cli)
    assert needle in str(info.value)


def test_an_included_launch_file_leaves_its_callers_arguments_alone():
    argv = ["ros2", "launch", "robot_bringup", "bringup.launch.py", "map:=x", "use_sim_time:=true"]
    assert launcher.launch_file_arguments(argv, "lerf.launch.py") == []
    argv = ["ros2", "launch", "/ws/install/share/lerf_ros/launch/lerf.launch.py", "--debug", "a:=1"]
    assert launcher.launch_file_arguments(argv, "lerf.launch.py") == ["a:=1"]


def test_launcher_takes_the_launch_files_arguments(capsys, tmp_path):
    plan = launcher.plan_launch(
        launcher.parse_launch_arguments(["namespace:=/robot1/", "use_sim_time:=true", "log_level:=warn",
                                         "image_topic:=front/image"]),
        (params.TRAINER, params.QUERY), default_params=str(CONFIG))
    assert (plan.namespace, plan.use_sim_time, plan.log_level) == ("/robot1", True, "warn")
    assert plan.parameters == {"image_topic": "front/image", "use_sim_time": True}
    assert launcher.ros_args(plan.params_file, "/tmp/o.yaml", plan.namespace, plan.log_level)[-4:] == [
        "-r", "__ns:=/robot1", "--log-level", "warn"]
    assert launcher.main(["namespace:=robot1", "use_sim_time:=false", "--check"]) == 0
    not_yaml = tmp_path / "not.yaml"
    not_yaml.write_text("- a\n- b\n")
    for argv, needle in [(["use_sim_time:=maybe"], "'use_sim_time' = 'maybe'"),
                         (["bogus_argument:=1"], "unknown launch argument"),
                         ([f"params_file:={not_yaml}"], f"'params_file' = '{not_yaml}': not a ros2 params"),
                         (["params_file:=/nonexistent/x.yaml"], "'/nonexistent/x.yaml': no such file"),
                         (["use_sim_time"], "expected name:=value"),
                         (["--params", str(CONFIG), f"params_file:={not_yaml}"], "given twice"),
                         (["--set", "use_sim_time:=1"], "parameter 'use_sim_time' = 1: expected bool")]:
        assert launcher.main([*argv, "--check"]) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_a_bad_launch_argument_stops_the_process_with_status_2():
    import subprocess

    cmd = [sys.executable, "-m", "lerf_ros.compat.launcher", "use_sim_time:=maybe"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "launch argument 'use_sim_time' = 'maybe'" in out.stderr


@pytest.mark.parametrize(
    ("key", "fq_name", "expected"),
    [("/**", "/lerf_trainer", True), ("/**", "/a/b/lerf_trainer", True),
     ("lerf_trainer", "/lerf_trainer", True), ("lerf_trainer", "/bad/lerf_trainer", False),
     ("/**/lerf_trainer", "/lerf_trainer", True), ("/**/lerf_trainer", "/bad/lerf_trainer", True),
     ("/**/lerf_trainer", "/bad/lerf_query", False), ("/bad/*", "/bad/lerf_query", True),
     ("/bad/*", "/other/lerf_query", False), ("/bad/lerf_trainer", "/bad/lerf_trainer", True)],
)
def test_key_matching_follows_rcl(key, fq_name, expected):
    # Checked against rclpy: with "/**", "/**/lerf_trainer" and "lerf_trainer" entries, a node
    # /bad/lerf_trainer gets the first two only, /lerf_trainer all three.
    assert launcher.key_matches(key, fq_name) is expected


def test_node_entries_apply_by_name_and_namespace():
    parsed = launcher.parse_params_yaml(YAML.replace("lerf_trainer:", "/**/lerf_trainer:"))
    assert launcher.params_for_node(parsed, "/robot1/lerf_trainer")["queue_size"] == 4
    assert launcher.params_for_node(parsed, "/robot1/lerf_query") == {"world_frame": "map", "preset": "tiny",
                                                                      "max_query_chars": 50}
    assert launcher.params_for_node(parsed, "/robot2/lerf_query") == {"world_frame": "map", "preset": "tiny"}


def test_node_process_refuses_a_bad_parameter_that_only_rclpy_sees(tmp_path):
    # An int where a double is declared passes YAML typing but not rclpy's: the node itself must stop
    # start-up with exit status 2 and name the parameter (the launcher's pre-check is bypassed here).
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lerf_ros.ros.main", "--ros-args", "--params-file", str(CONFIG),
           "-p", "tf_timeout_s:=1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tf_timeout_s" in out.stderr and "invalid parameter" in out.stderr


def test_node_process_refuses_an_encoder_that_does_not_import():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lerf_ros.compat.launcher", "--params", str(CONFIG), "--mode", "trainer",
           "--set", "clip_encoder:=no_such_package.encoders:make"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot start" in out.stderr and "no_such_package" in out.stderr


PRECEDENCE_YAML = ("lerf_trainer:\n  ros__parameters: {q: 4}\n"
                   "/**/lerf_trainer:\n  ros__parameters: {q: 3, r: 3}\n"
                   "/**:\n  ros__parameters: {q: 2, r: 2, s: 2}\n")


@pytest.mark.parametrize("namespace", ["", "ns"])
def test_precedence_is_key_order_as_in_rclpy(tmp_path, namespace):
    # rclpy applies matching entries in key order, whatever their kind: here /** comes last and wins.
    import rclpy
    from rclpy.node import Node

    fq = f"/{namespace}/lerf_trainer" if namespace else "/lerf_trainer"
    expected = launcher.params_for_node(launcher.parse_params_yaml(PRECEDENCE_YAML), fq)
    assert expected == {"q": 2, "r": 2, "s": 2}
    path = tmp_path / "p.yaml"
    path.write_text(PRECEDENCE_YAML)
    rclpy.init(args=["test", *launcher.ros_args(str(path), None, namespace)])
    try:
        node = Node("lerf_trainer", automatically_declare_parameters_from_overrides=True)
        assert {k: node.get_parameter(k).value for k in "qrs"} == expected
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    # The usual order (/** first) lets the node section win.
    usual = {"/**": {"q": 2}, "/**/lerf_trainer": {"q": 3}}
    assert launcher.params_for_node(usual, fq) == {"q": 3}
