"""The no-`ros2 launch` starter: params YAML parsing, overrides, validation; the launch file's arguments."""

import ast
import pathlib
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
    assert trainer["image_topic"] == "/camera/color/image_raw"
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


def _launch_tree():
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def test_launch_file_parses_and_declares_the_launchers_arguments():
    tree = _launch_tree()
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    names = None
    for node in tree.body:
        targets = [getattr(t, "id", "") for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "LAUNCH_ARGUMENTS" in targets:
            names = ast.literal_eval(node.value)
    assert names == launcher.LAUNCH_ARGUMENTS
    yaml_names = set()
    for body in launcher.parse_params_yaml(CONFIG.read_text()).values():
        yaml_names |= set(body)
    for name in names:
        assert name in params.SPECS, name  # every launch argument is a node parameter ...
        assert name in yaml_names, name  # ... whose default lives in config/lerf.yaml
        assert params.SPECS[name].type is str  # (the launch file passes them as strings)
    # It starts the combined executable with the YAML.
    src = LAUNCH.read_text()
    assert 'executable="lerf_node"' in src and '"lerf.yaml"' in src


def test_launch_defaults_come_from_the_yaml():
    # Run the launch file's own YAML reader (it needs no `launch` package) on the shipped config.
    tree = _launch_tree()
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_yaml_defaults")
    namespace = {}
    module = ast.fix_missing_locations(
        ast.Module(body=[ast.Import(names=[ast.alias("yaml")]), func], type_ignores=[]))
    exec(compile(module, str(LAUNCH), "exec"), namespace)
    defaults = namespace["_yaml_defaults"](str(CONFIG))
    trainer = launcher.effective_params(str(CONFIG), [], params.TRAINER_NODE_NAME)
    query = launcher.effective_params(str(CONFIG), [], params.QUERY_NODE_NAME)
    for name in launcher.LAUNCH_ARGUMENTS:
        expected = trainer.get(name, query.get(name))
        assert defaults[name] == expected, name


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
