"""Start the lerf nodes from the ros2 params YAML when ``ros2 launch`` is not installed.

    python -m lerf_ros.compat.launcher [namespace:=NS] [use_sim_time:=true|false] [params_file:=FILE]
                                      [log_level:=LEVEL] [image_topic:=...] [NAME:=VALUE ...]
                                      [--params FILE] [--namespace NS] [--set name:=value ...]
                                      [--mode both|trainer|query] [--check]

Takes the arguments of ``launch/lerf.launch.py`` (``LAUNCH_OPTIONS`` + ``LAUNCH_ARGUMENTS``, written
``name:=value`` as for ``ros2 launch``) and does what it does: one process, both nodes sharing one model
(``--mode both``), or one of them alone (``trainer`` / ``query``), with the params file passed to rcl as
``--params-file``. ``plan_launch`` checks the arguments for both: an unknown name, ``use_sim_time`` that
is not true / false, a ``log_level`` rcl does not know, a bad ``namespace``, a ``params_file`` that does
not exist or is not a params YAML, or a parameter value the nodes would refuse stops start-up with exit
status 2 and a message naming the argument (or parameter), before any DDS traffic.

Parameter arguments and ``use_sim_time`` (which, as in nav2, always overrides the params file's) go into
a second, generated params file. rcl merges params files per node key (a later file replaces values under
the same key) but orders the keys by first appearance, so a plain ``-p`` (which joins the ``/**`` key)
loses to a node section placed after ``/**`` in the user's YAML. The generated file therefore repeats each
override under every key form that addresses the nodes (``/**``, ``/**/name``, ``/ns/name``), and the
overrides win whatever the user's YAML uses. ``--set`` overrides any parameter (typed as YAML types it)
and comes last. The ROS-free functions here are tested alone; the launch file uses the same ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: Launch arguments that set the node parameter of the same name (string parameters passed as given;
#: those in ``BOOL_ARGUMENTS`` as true / false).
LAUNCH_ARGUMENTS = ("image_topic", "camera_info_topic", "depth_topic", "cameras", "world_frame", "preset",
                    "device", "clip_encoder", "dino_encoder", "clip_checkpoint", "dino_checkpoint",
                    "map_path", "autostart")
#: Boolean parameter arguments: "true" / "false" (any case), anything else is refused.
BOOL_ARGUMENTS = ("autostart",)
#: List-of-names parameter arguments: a YAML list ("[head_camera, wrist_camera]") or comma-separated names.
LIST_ARGUMENTS = ("cameras",)
#: nav2-style launch arguments that are not node parameters of ours.
LAUNCH_OPTIONS = ("namespace", "use_sim_time", "params_file", "log_level")
ALL_LAUNCH_ARGUMENTS = LAUNCH_OPTIONS + LAUNCH_ARGUMENTS
#: rcl's --log-level severities.
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
#: Default of a parameter launch argument: not given, so the params file's value (or the declared
#: default) stays. A real value could not mean this: "" is a valid depth_topic, for one.
FROM_PARAMS_FILE = "<from params_file>"
_NAMESPACE_RE = re.compile(r"^/?([A-Za-z_][A-Za-z0-9_]*)(/[A-Za-z_][A-Za-z0-9_]*)*/?$")
_BOOLS = {"true": True, "false": False}


class LaunchArgumentError(ValueError):
    """A launch argument that stops start-up; the message names the argument."""

    def __init__(self, name: str, value: Any, reason: str):
        super().__init__(f"launch argument '{name}' = {value!r}: {reason}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class LaunchPlan:
    """Checked launch arguments: what to start the node process with."""

    params_file: str  # absolute path of a readable params YAML
    namespace: str  # "" or "/robot1" (absolute)
    use_sim_time: bool
    log_level: str  # one of LOG_LEVELS
    parameters: dict[str, Any]  # node parameter overrides: given parameter arguments, use_sim_time, --set


def default_params_file() -> str | None:
    """config/lerf.yaml of this source checkout (where no ``ros2 launch`` means no share directory)."""
    path = Path(__file__).resolve().parents[2] / "config" / "lerf.yaml"
    return str(path) if path.is_file() else None


def launch_defaults(params_file: str | None) -> dict[str, str]:
    """Every launch argument's default, as the strings ``ros2 launch --show-args`` shows."""
    return {"namespace": "", "use_sim_time": "false", "params_file": params_file or "", "log_level": "info",
            **{name: FROM_PARAMS_FILE for name in LAUNCH_ARGUMENTS}}


def describe(name: str) -> str:
    """The launch argument's description (``ros2 launch lerf_ros lerf.launch.py --show-args``)."""
    return {
        "namespace": "Namespace of both nodes: moves their relative topics and services (camera/..., "
                     "lerf/...); TF stays on /tf and /tf_static",
        "use_sim_time": "true: stamps and timers follow /clock (a bag played with --clock, a simulator); "
                        "overrides the params file's use_sim_time",
        "params_file": "ros2 params YAML for both nodes (default: the package's config/lerf.yaml)",
        "log_level": f"rcl log level, one of {', '.join(LOG_LEVELS)}",
        "cameras": "camera namespaces of the trainer, e.g. [head_camera, wrist_camera] or "
                   "head_camera,wrist_camera: NS/color/image_raw, NS/color/camera_info and (optional) "
                   "NS/aligned_depth_to_color/image_raw each, into one map (not given: the value in "
                   "params_file; unset there: the one camera of image_topic / camera_info_topic)",
        "autostart": "true: both nodes configure and activate themselves; false: they stay unconfigured "
                     "until a lifecycle manager (nav2 lifecycle_manager) brings them up (not given: the "
                     "value in params_file, true by default)",
    }.get(name, f"node parameter '{name}' (not given: the value in params_file)")


def parse_launch_arguments(items: Sequence[str]) -> dict[str, str]:
    """``["name:=value", ...]`` -> {name: value} (strings, as ``ros2 launch`` passes them).

    Raises LaunchArgumentError for an item that is not ``name:=value``, a name that is not one of
    ``ALL_LAUNCH_ARGUMENTS`` (``ros2 launch`` itself would ignore it silently) or a name given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep or not name:
            raise LaunchArgumentError(item, item, "expected name:=value")
        if name not in ALL_LAUNCH_ARGUMENTS:
            raise LaunchArgumentError(name, value, "unknown launch argument; known: "
                                      + ", ".join(ALL_LAUNCH_ARGUMENTS))
        if name in out:
            raise LaunchArgumentError(name, value, f"given twice (also {out[name]!r})")
        out[name] = value
    return out


def launch_file_arguments(argv: Sequence[str], launch_file: str) -> list[str]:
    """The ``name:=value`` items after ``launch_file`` on a ``ros2 launch`` command line; [] when that
    command line starts another launch file (this one is included: its caller's arguments are not ours)."""
    for i, item in enumerate(argv):
        if os.path.basename(item) == launch_file:
            return [a for a in argv[i + 1:] if ":=" in a]
    return []


def _namespace(value: str) -> str:
    if value in ("", "/"):
        return ""
    if not _NAMESPACE_RE.match(value):
        raise LaunchArgumentError("namespace", value, "not a ROS namespace (names of letters, digits and "
                                  "'_' not starting with a digit, separated by '/')")
    return "/" + value.strip("/")


def _names(name: str, value: str) -> list[str]:
    """A list launch argument: "[a, b]" (YAML) or "a,b" -> ["a", "b"]; the names are checked with the node
    parameter (``params.resolve``)."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LaunchArgumentError(name, value, f"not a YAML list: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise LaunchArgumentError(name, value,
                                      "expected a list of names, e.g. [head_camera, wrist_camera]")
        return items
    return [v.strip() for v in text.split(",") if v.strip()]


def _params_file(value: str) -> str:
    if not value:
        raise LaunchArgumentError("params_file", value, "not given, and no config/lerf.yaml to default to")
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise LaunchArgumentError("params_file", str(path), "no such file")
    try:
        parse_params_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        raise LaunchArgumentError("params_file", str(path), f"not a ros2 params YAML: {exc}") from exc
    return str(path)


def plan_launch(values: Mapping[str, str], roles: Sequence[str], sets: Mapping[str, Any] | None = None,
                default_params: str | None = None) -> LaunchPlan:
    """Check launch arguments (name -> string; missing ones take ``launch_defaults``) and the parameters
    the nodes of ``roles`` would get; raise LaunchArgumentError or ParameterError naming the culprit.

    ``sets``: further parameter overrides (``--set``), applied last.
    """
    unknown = sorted(set(values) - set(ALL_LAUNCH_ARGUMENTS))
    if unknown:
        raise LaunchArgumentError(unknown[0], values[unknown[0]], "unknown launch argument")
    given = {**launch_defaults(default_params), **values}
    namespace = _namespace(given["namespace"])
    sim = given["use_sim_time"]
    if sim.strip().lower() not in _BOOLS:
        raise LaunchArgumentError("use_sim_time", sim, "expected true or false")
    level = given["log_level"]
    if level.strip().lower() not in LOG_LEVELS:
        raise LaunchArgumentError("log_level", level, f"expected one of {', '.join(LOG_LEVELS)}")
    params_file = _params_file(given["params_file"])
    parameters: dict[str, Any] = {name: given[name] for name in LAUNCH_ARGUMENTS
                                  if given[name] != FROM_PARAMS_FILE}
    for name in BOOL_ARGUMENTS:
        if name in parameters:
            if parameters[name].strip().lower() not in _BOOLS:
                raise LaunchArgumentError(name, parameters[name], "expected true or false")
            parameters[name] = _BOOLS[parameters[name].strip().lower()]
    for name in LIST_ARGUMENTS:
        if name in parameters:
            parameters[name] = _names(name, parameters[name])
    parameters["use_sim_time"] = _BOOLS[sim.strip().lower()]
    parameters.update(sets or {})
    validate(params_file, parameters, roles, namespace)
    return LaunchPlan(params_file, namespace, bool(parameters["use_sim_time"]), level.strip().lower(),
                      parameters)


def key_matches(key: str, fq_name: str) -> bool:
    """Whether params-YAML key ``key`` addresses the node ``fq_name`` (``/ns/name``), as rcl decides.

    Keys without a leading slash are absolute (``lerf_trainer`` = ``/lerf_trainer``); ``/**`` matches any
    run of namespaces (also none), ``*`` one name token.
    """
    pattern = "/" + key.strip().lstrip("/")
    fq = "/" + fq_name.lstrip("/")
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("/**", i):
            regex += "(/[^/]+)*"
            i += 3
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return re.fullmatch(regex, fq) is not None


def parse_params_yaml(text: str) -> dict[str, dict[str, Any]]:
    """ros2 params YAML -> {node key: {parameter: value}}.

    Accepts top-level ``node: {ros__parameters: {...}}`` and one level of namespace nesting
    (``ns: {node: {ros__parameters: ...}}``, keyed as ``/ns/node``). Keys are made absolute as rcl does
    (``lerf_trainer`` -> ``/lerf_trainer``, ``**`` -> ``/**``). Raises ValueError on anything else.
    """
    data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"params YAML must be a mapping of node names, got {type(data).__name__}")
    out: dict[str, dict[str, Any]] = {}

    def visit(prefix: str, key: str, body: Any, depth: int) -> None:
        if not isinstance(body, dict):
            raise ValueError(f"params YAML entry {key!r} must be a mapping, got {body!r}")
        full = "/" + (f"{prefix}/{key}" if prefix else key).strip().lstrip("/")
        if "ros__parameters" in body:
            params = body["ros__parameters"] or {}
            if not isinstance(params, dict):
                raise ValueError(f"{full}.ros__parameters must be a mapping, got {params!r}")
            out.setdefault(full, {}).update(params)
            return
        if depth > 0:
            raise ValueError(f"params YAML entry {full!r} has no ros__parameters")
        for sub, sub_body in body.items():
            visit("/" + key.strip("/"), str(sub), sub_body, depth + 1)

    for key, body in data.items():
        visit("", str(key), body, 0)
    return out


def params_for_node(parsed: Mapping[str, Mapping[str, Any]], node_name: str) -> dict[str, Any]:
    """Parameters that rcl would give node ``node_name`` (``name`` or ``/ns/name``).

    As rclpy does (checked in the tests): every entry whose key matches the node, in the order the keys
    appear, a later entry overriding an earlier one whatever their kinds (``/**``, ``/**/name``, exact).
    """
    merged: dict[str, Any] = {}
    for key, params in parsed.items():
        if key_matches(key, node_name):
            merged.update(params)
    return merged


def parse_set(item: str) -> tuple[str, Any]:
    """``name:=value`` -> (name, value) with the value typed as YAML would type it (rcl does the same)."""
    if ":=" not in item:
        raise ValueError(f"--set expects name:=value, got {item!r}")
    name, raw = item.split(":=", 1)
    if not name:
        raise ValueError(f"--set expects name:=value, got {item!r}")
    value = yaml.safe_load(raw) if raw != "" else ""
    return name.strip(), value


def effective_params(params_file: str, sets: Sequence[str] | Mapping[str, Any],
                     node_name: str) -> dict[str, Any]:
    """What node ``node_name`` (``name`` or ``/ns/name``) will see: matching YAML entries, then the
    overrides (``["name:=value", ...]`` typed as YAML types them, or a mapping of typed values)."""
    with open(params_file, encoding="utf-8") as f:
        parsed = parse_params_yaml(f.read())
    values = params_for_node(parsed, node_name)
    values.update(_as_mapping(sets))
    return values


def _as_mapping(sets: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    return dict(sets) if isinstance(sets, Mapping) else dict(parse_set(item) for item in sets)


def validate(params_file: str, overrides: Sequence[str] | Mapping[str, Any], roles: Sequence[str],
             namespace: str = "") -> None:
    """Raise ParameterError (naming the parameter) if a node of ``roles`` would refuse its parameters."""
    from lerf_ros.ros import params

    prefix = "/" + namespace.strip("/") if namespace.strip("/") else ""
    for role in roles:
        node_name = params.TRAINER_NODE_NAME if role == params.TRAINER else params.QUERY_NODE_NAME
        values = effective_params(params_file, overrides, f"{prefix}/{node_name}")
        unknown = sorted(k for k in values if k not in params.SPECS and k not in params.ROS_PARAMETERS)
        if unknown:
            raise params.ParameterError(unknown[0], values[unknown[0]], "unknown parameter")
        for name, kind in params.ROS_PARAMETERS.items():
            if name in values and not isinstance(values[name], kind):
                raise params.ParameterError(name, values[name], f"expected {kind.__name__}")
        own = {k: v for k, v in values.items() if k in params.SPECS and role in params.SPECS[k].nodes}
        params.resolve(own)


def overrides_yaml(values: Sequence[str] | Mapping[str, Any], namespace: str = "") -> str:
    """A params YAML carrying ``values`` (``name:=value`` items or a mapping) for both nodes under every
    key that addresses them."""
    from lerf_ros.ros.params import QUERY_NODE_NAME, TRAINER_NODE_NAME

    values = _as_mapping(values)
    prefix = "/" + namespace.strip("/") if namespace.strip("/") else ""
    keys = ["/**"]
    for node in (TRAINER_NODE_NAME, QUERY_NODE_NAME):
        keys += [f"/**/{node}", f"{prefix}/{node}"]
    # A copy per key: a list shared between keys would be dumped as a YAML alias (&id001 / *id001), which
    # rcl's params parser does not read.
    return yaml.safe_dump({key: {"ros__parameters": copy.deepcopy(values)} for key in keys}, sort_keys=False)


def ros_args(params_file: str, overrides_file: str | None = None, namespace: str = "",
             log_level: str | None = None) -> list[str]:
    """The rcl command line: the user's params file, then the overrides file, the namespace, the log level."""
    args = ["--ros-args", "--params-file", os.path.abspath(params_file)]
    if overrides_file:
        args += ["--params-file", os.path.abspath(overrides_file)]
    if namespace.strip("/"):
        args += ["-r", f"__ns:=/{namespace.strip('/')}"]
    if log_level:
        args += ["--log-level", log_level]
    return args


def _arguments(args: argparse.Namespace) -> dict[str, str]:
    """The launch arguments of the command line: ``name:=value`` items, ``--params`` and ``--namespace``."""
    given = parse_launch_arguments(args.arguments)
    for name, value in (("params_file", args.params), ("namespace", args.namespace)):
        if value is None:
            continue
        if name in given and given[name] != value:
            raise LaunchArgumentError(name, value, f"given twice (also {given[name]!r})")
        given[name] = value
    return given


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arguments", nargs="*", metavar="NAME:=VALUE",
                        help="launch arguments of launch/lerf.launch.py: " + ", ".join(ALL_LAUNCH_ARGUMENTS))
    parser.add_argument("--params", "--params-file", default=None,
                        help="ros2 params YAML (= params_file:=FILE; default: config/lerf.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:=VALUE",
                        help="override any parameter for every node, typed as YAML (repeatable; wins)")
    parser.add_argument("--mode", choices=("both", "trainer", "query"), default="both",
                        help="both nodes sharing one model (default), or one alone")
    parser.add_argument("--namespace", default=None,
                        help="push the nodes (and their relative topics) into it (= namespace:=NS)")
    parser.add_argument("--check", action="store_true", help="validate the arguments and exit")
    args = parser.parse_intermixed_args(argv)  # launch arguments may come before or after options

    from lerf_ros.ros.params import QUERY, TRAINER, ParameterError

    roles = {"both": (TRAINER, QUERY), "trainer": (TRAINER,), "query": (QUERY,)}[args.mode]
    try:
        plan = plan_launch(_arguments(args), roles, _as_mapping(args.set), default_params_file())
    except (ParameterError, ValueError, OSError) as exc:  # LaunchArgumentError is a ValueError
        print(f"lerf launcher: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"lerf launcher: parameters in {plan.params_file} are valid for {', '.join(roles)}")
        return 0
    import tempfile

    from lerf_ros.ros import main as ros_main

    with tempfile.NamedTemporaryFile("w", prefix="lerf_overrides_", suffix=".yaml", delete=False) as f:
        f.write(overrides_yaml(plan.parameters, plan.namespace))
    try:
        return ros_main.run(args.mode, ["lerf_launcher", *ros_args(plan.params_file, f.name, plan.namespace,
                                                                   plan.log_level)])
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    _code = main()
    from lerf_ros.ros.main import exit_process  # ends the process even if finalisation would hang

    exit_process(_code)
