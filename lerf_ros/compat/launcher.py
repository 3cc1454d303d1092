"""Start the lerf nodes from the ros2 params YAML when ``ros2 launch`` is not installed.

    python -m lerf_ros.compat.launcher --params config/lerf.yaml [--set name:=value ...] [--mode both]
                                      [--namespace ns]

Does what ``launch/lerf.launch.py`` does: one process, both nodes sharing one model (``--mode both``), or
one of them alone (``trainer`` / ``query``), with the YAML passed to rcl as ``--params-file``. The
``--set`` overrides go into a second, generated params file. rcl merges params files per node key (a
later file replaces values under the same key) but orders the keys by first appearance, so a plain
``-p`` (which joins the ``/**`` key) loses to a node section placed after ``/**`` in the user's YAML. The
generated file therefore repeats each override under every key form that addresses the nodes (``/**``,
``/**/name``, ``/ns/name``), and ``--set`` wins whatever the user's YAML uses.
Before any DDS traffic it reads the YAML itself (``node_name: {ros__parameters: {...}}`` and the ``/**``
wildcard), applies the overrides and validates them against the parameter table, so a bad value stops
start-up with the parameter's name and exit status 2. The ROS-free parsing functions are tested alone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

#: Launch arguments of launch/lerf.launch.py, which are parameter names; kept equal by a test.
LAUNCH_ARGUMENTS = ("image_topic", "camera_info_topic", "depth_topic", "world_frame", "preset", "device",
                    "clip_encoder", "dino_encoder", "clip_checkpoint", "dino_checkpoint",
                    "map_path")


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


def effective_params(params_file: str, sets: Sequence[str], node_name: str) -> dict[str, Any]:
    """What node ``node_name`` (``name`` or ``/ns/name``) will see: matching YAML entries, then ``--set``."""
    return _effective(params_file, sets, node_name)


def _effective(params_file: str, sets: Sequence[str], node_name: str) -> dict[str, Any]:
    with open(params_file, encoding="utf-8") as f:
        parsed = parse_params_yaml(f.read())
    values = params_for_node(parsed, node_name)
    for item in sets:
        name, value = parse_set(item)
        values[name] = value
    return values


def validate(params_file: str, sets: Sequence[str], roles: Sequence[str], namespace: str = "") -> None:
    """Raise ParameterError (naming the parameter) if a node of ``roles`` would refuse its parameters."""
    from lerf_ros.ros import params

    prefix = "/" + namespace.strip("/") if namespace.strip("/") else ""
    for role in roles:
        node_name = params.TRAINER_NODE_NAME if role == params.TRAINER else params.QUERY_NODE_NAME
        values = effective_params(params_file, sets, f"{prefix}/{node_name}")
        own = {k: v for k, v in values.items() if k in params.SPECS and role in params.SPECS[k].nodes}
        unknown = sorted(k for k in values if k not in params.SPECS)
        if unknown:
            raise params.ParameterError(unknown[0], values[unknown[0]], "unknown parameter")
        params.resolve(own)


def overrides_yaml(sets: Sequence[str], namespace: str = "") -> str:
    """A params YAML carrying the ``--set`` values for both nodes under every key that addresses them."""
    from lerf_ros.ros.params import QUERY_NODE_NAME, TRAINER_NODE_NAME

    values = dict(parse_set(item) for item in sets)
    prefix = "/" + namespace.strip("/") if namespace.strip("/") else ""
    keys = ["/**"]
    for node in (TRAINER_NODE_NAME, QUERY_NODE_NAME):
        keys += [f"/**/{node}", f"{prefix}/{node}"]
    return yaml.safe_dump({key: {"ros__parameters": dict(values)} for key in keys}, sort_keys=False)


def ros_args(params_file: str, overrides_file: str | None = None, namespace: str = "") -> list[str]:
    """The rcl command line: the user's params file, then the overrides file, then the namespace."""
    args = ["--ros-args", "--params-file", os.path.abspath(params_file)]
    if overrides_file:
        args += ["--params-file", os.path.abspath(overrides_file)]
    if namespace.strip("/"):
        args += ["-r", f"__ns:=/{namespace.strip('/')}"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, help="ros2 params YAML, e.g. config/lerf.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:=VALUE",
                        help="override a parameter for every node (repeatable)")
    parser.add_argument("--mode", choices=("both", "trainer", "query"), default="both",
                        help="both nodes sharing one model (default), or one alone")
    parser.add_argument("--namespace", default="", help="push the nodes (and their relative topics) into it")
    parser.add_argument("--check", action="store_true", help="validate the parameters and exit")
    args = parser.parse_args(argv)

    from lerf_ros.ros.params import QUERY, TRAINER, ParameterError

    roles = {"both": (TRAINER, QUERY), "trainer": (TRAINER,), "query": (QUERY,)}[args.mode]
    try:
        validate(args.params, args.set, roles, args.namespace)
    except (ParameterError, ValueError, OSError) as exc:
        print(f"lerf launcher: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"lerf launcher: parameters in {args.params} are valid for {', '.join(roles)}")
        return 0
    import tempfile

    from lerf_ros.ros import main as ros_main

    overrides = None
    try:
        if args.set:
            with tempfile.NamedTemporaryFile("w", prefix="lerf_overrides_", suffix=".yaml",
                                             delete=False) as f:
                f.write(overrides_yaml(args.set, args.namespace))
                overrides = f.name
        return ros_main.run(args.mode, ["lerf_launcher", *ros_args(args.params, overrides, args.namespace)])
    finally:
        if overrides:
            os.unlink(overrides)


if __name__ == "__main__":
    sys.exit(main())
