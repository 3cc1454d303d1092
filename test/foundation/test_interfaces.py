"""The generated interfaces carry the documented fields and constants; the package layout holds together.

Checks the contract other programs rely on (field names, ROS types and constants of Query, Locate, Target,
MapPath, TrainingStatus and tf2_msgs/TFMessage), that every field in msg/, srv/ and action/ is documented,
that the manifest parses with catkin_pkg, that setup.py and CMakeLists.txt install the same executables, and
that the generated msg/srv part and the source tree resolve together as one `lerf_ros` package from any
working directory.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from catkin_pkg.package import parse_package
from geometry_msgs.msg import TransformStamped
from lerf_ros.action import Locate
from lerf_ros.msg import Target, TrainingStatus
from lerf_ros.srv import MapPath, Query
from rclpy.serialization import deserialize_message, serialize_message
from tf2_msgs.msg import TFMessage

REPO = Path(__file__).resolve().parents[2]


def test_query_fields_and_types():
    assert Query.Request.get_fields_and_field_types() == {
        "text": "string",
        "negatives": "sequence<string>",
        "threshold": "float",
        "with_cloud": "boolean",
        "max_results": "uint32",
    }
    assert Query.Response.get_fields_and_field_types() == {
        "result": "uint8",
        "found": "boolean",
        "message": "string",
        "location": "geometry_msgs/PointStamped",
        "targets": "sequence<lerf_ros/Target>",
        "relevancy": "float",
        "confidence": "float",
        "scale": "float",
        "cloud": "sensor_msgs/PointCloud2",
        "model_step": "uint64",
    }


def test_query_result_constants_match_the_nodes_table():
    from lerf_ros.ros.messages import RESULTS

    names = [name for name in dir(Query.Response) if name.startswith("RESULT_")]
    constants = {name: getattr(Query.Response, name) for name in names}
    assert constants == {"RESULT_FOUND": 1, "RESULT_NOT_FOUND": 2, "RESULT_NOT_READY": 3,
                         "RESULT_INVALID_REQUEST": 4, "RESULT_ERROR": 5}
    assert {f"RESULT_{name.upper()}": code for name, code in RESULTS.items()} == constants


def test_locate_fields_types_and_constants():
    assert Locate.Goal.get_fields_and_field_types() == {
        "text": "string",
        "negatives": "sequence<string>",
        "timeout_s": "float",
        "threshold": "float",
        "max_results": "uint32",
    }
    # The result is Query's reply without the cloud (RViz gets it on lerf/relevancy_cloud), plus attempts.
    query = dict(Query.Response.get_fields_and_field_types())
    del query["cloud"]
    assert Locate.Result.get_fields_and_field_types() == query | {"attempts": "uint32"}
    def constants(cls):
        return {name: getattr(cls, name) for name in dir(cls) if name.startswith("RESULT_")}

    assert constants(Locate.Result) == constants(Query.Response)
    assert Locate.Feedback.get_fields_and_field_types() == {
        "best_target": "lerf_ros/Target",
        "confidence": "float",
        "found": "boolean",
        "best_location": "geometry_msgs/PointStamped",
        "model_step": "uint64",
        "last_result": "uint8",
        "attempts": "uint32",
        "elapsed_s": "float",
        "message": "string",
    }


def test_target_fields_and_types():
    assert Target.get_fields_and_field_types() == {
        "location": "geometry_msgs/Point",
        "box_center": "geometry_msgs/Point",
        "extent": "geometry_msgs/Vector3",
        "relevancy": "float",
        "confidence": "float",
        "point_count": "uint32",
        "scale": "float",
        "view_support": "float",
        "competitor": "string",
    }


def test_map_path_fields_and_types():
    assert MapPath.Request.get_fields_and_field_types() == {"path": "string"}
    assert MapPath.Response.get_fields_and_field_types() == {"success": "boolean", "message": "string"}


def test_training_status_constants_and_fields():
    constants = {
        name: getattr(TrainingStatus, name)
        for name in ("STATE_WAITING", "STATE_TRAINING", "STATE_PAUSED", "STATE_READY", "STATE_ERROR")
    }
    assert constants == {
        "STATE_WAITING": 0, "STATE_TRAINING": 1, "STATE_PAUSED": 2, "STATE_READY": 3, "STATE_ERROR": 4,
    }
    assert TrainingStatus.get_fields_and_field_types() == {
        "header": "std_msgs/Header",
        "state": "uint8",
        "state_name": "string",
        "step": "uint64",
        "keyframes": "uint32",
        "keyframes_pending": "uint32",
        "frames_received": "uint64",
        "frames_dropped": "uint64",
        "frames_without_depth": "uint64",
        "drop_reasons": "sequence<string>",
        "drop_counts": "sequence<uint64>",
        "frames_not_keyframe": "uint64",
        "not_keyframe_reasons": "sequence<string>",
        "not_keyframe_counts": "sequence<uint64>",
        "loss_names": "sequence<string>",
        "loss_values": "sequence<float>",
        "rays_per_second": "float",
        "gpu_memory_allocated_mb": "float",
        "gpu_memory_peak_mb": "float",
        "last_error": "string",
        "usable": "boolean",
        "progress": "float",
        "convergence": "string",
        "heldout_psnr_db": "float",
        "heldout_r2": "float",
        "depth_disagreement": "float",
        "language_loss_slope": "float",
        "convergence_step": "uint64",
        "nonfinite_steps": "uint64",
        "oom_events": "uint64",
        "rays_per_step": "uint32",
        "clip_encoder": "string",
        "dino_encoder": "string",
        "demo_encoders": "boolean",
        "scene_box_source": "string",
        "journal_bytes": "uint64",
        "journal_skipped": "uint64",
        "tf_listener": "string",
        "tf_rejected": "uint64",
        "tf_loops": "uint64",
        "tf_jumps_back": "uint64",
        "tf_parent_changes": "uint64",
        "camera_names": "sequence<string>",
        "camera_frames_received": "sequence<uint64>",
        "camera_frames_dropped": "sequence<uint64>",
        "camera_keyframes": "sequence<uint32>",
        "camera_states": "sequence<string>",
    }
    msg = TrainingStatus(step=2**40, loss_names=["rgb"], loss_values=[0.25])
    assert msg.step == 2**40 and list(msg.loss_values) == [0.25]


def test_tf_message_matches_upstream_definition():
    fields = TFMessage.get_fields_and_field_types()
    assert fields == {"transforms": "sequence<geometry_msgs/TransformStamped>"}
    # The built typesupport serialises and reads back (CDR through the generated C library).
    t = TransformStamped()
    t.header.frame_id, t.child_frame_id = "odom", "base_link"
    t.transform.translation.x, t.transform.rotation.z, t.transform.rotation.w = 1.5, 0.6, 0.8
    back = deserialize_message(serialize_message(TFMessage(transforms=[t, t])), TFMessage)
    assert len(back.transforms) == 2
    assert back.transforms[1].child_frame_id == "base_link"
    assert back.transforms[1].transform.translation.x == 1.5
    assert back.transforms[1].transform.rotation.z == 0.6


def test_query_and_status_serialise_round_trip():
    status = TrainingStatus(state=TrainingStatus.STATE_TRAINING, state_name="training", step=2**33 + 7,
                            drop_reasons=["blurry", "no_transform"], drop_counts=[3, 2**40],
                            loss_names=["rgb", "clip"], loss_values=[0.5, 0.125], last_error="none")
    back = deserialize_message(serialize_message(status), TrainingStatus)
    assert back.step == 2**33 + 7 and list(back.drop_counts) == [3, 2**40]
    assert list(back.loss_values) == [0.5, 0.125] and back.drop_reasons == ["blurry", "no_transform"]
    request = Query.Request(text="red mug", negatives=["blue mug"], threshold=-1.0, with_cloud=True,
                            max_results=7)
    back = deserialize_message(serialize_message(request), Query.Request)
    assert (back.text, back.negatives, back.threshold, back.with_cloud, back.max_results) == (
        "red mug", ["blue mug"], -1, True, 7)
    target = Target(point_count=2**31, competitor="blue", view_support=float("nan"))
    target.location.x, target.extent.z = 1.25, 0.5
    response = Query.Response(result=Query.Response.RESULT_FOUND, found=True, targets=[Target(), target])
    back = deserialize_message(serialize_message(response), Query.Response)
    assert back.result == Query.Response.RESULT_FOUND and len(back.targets) == 2
    second = back.targets[1]
    assert (second.point_count, second.competitor) == (2**31, "blue")
    assert (second.location.x, second.extent.z) == (1.25, 0.5)
    assert second.view_support != second.view_support  # NaN crosses the wire


@pytest.mark.parametrize("relpath", ["msg/Target.msg", "msg/TrainingStatus.msg", "srv/Query.srv",
                                     "srv/MapPath.srv", "action/Locate.action"])
def test_every_field_is_documented(relpath):
    lines = (REPO / relpath).read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped == "---":
            continue
        has_trailing = "#" in stripped
        # A field is documented by a comment directly above it or above the block of fields it belongs to.
        j = i - 1
        while j >= 0 and lines[j].strip() not in ("", "---") and not lines[j].strip().startswith("#"):
            j -= 1
        has_above = j >= 0 and lines[j].strip().startswith("#")
        if not (has_trailing or has_above):
            undocumented.append(stripped)
    assert undocumented == []


def test_manifest_parses_and_declares_dependencies():
    pkg = parse_package(str(REPO / "package.xml"))
    pkg.validate()
    assert pkg.name == "lerf_ros" and pkg.package_format == 3
    assert [g.name for g in pkg.member_of_groups] == ["rosidl_interface_packages"]
    declared = {d.name for d in pkg.build_depends + pkg.exec_depends + pkg.buildtool_depends}
    for name in ("rclpy", "rcl_interfaces", "sensor_msgs", "geometry_msgs", "std_msgs", "std_srvs",
                 "visualization_msgs", "tf2_ros_py", "tf2_msgs", "cv_bridge", "launch", "launch_ros",
                 "ament_index_python", "rosidl_default_generators", "rosidl_default_runtime", "ament_cmake",
                 "ament_cmake_python", "python3-numpy", "python3-torch", "python3-torchvision",
                 "diagnostic_msgs", "diagnostic_updater", "action_msgs"):
        assert name in declared, name
    # The Python module tf2_ros is in tf2_ros_py; the key tf2_ros is the C++ library only.
    assert "tf2_ros" not in declared
    assert pkg.get_build_type() == "ament_cmake"


def _setup_py_console_scripts() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        targets = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "CONSOLE_SCRIPTS" in targets:
            entries = ast.literal_eval(node.value)
            return dict(tuple(part.strip() for part in entry.split("=")) for entry in entries)
    raise AssertionError("CONSOLE_SCRIPTS not found in setup.py")


def _cmake_console_scripts() -> dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text()
    block = re.search(r"set\(LERF_ROS_CONSOLE_SCRIPTS(.*?)\)", text, re.S)
    assert block, "LERF_ROS_CONSOLE_SCRIPTS not found in CMakeLists.txt"
    return dict(entry.split("=") for entry in re.findall(r'"([^"]+)"', block.group(1)))


def test_setup_py_and_cmake_install_the_same_executables():
    scripts = _setup_py_console_scripts()
    assert scripts == _cmake_console_scripts()
    assert set(scripts) == {"lerf-ros", "lerf_trainer_node", "lerf_query_node", "lerf_node"}


def test_sources_and_generated_interfaces_form_one_package(tmp_path):
    """From an unrelated cwd, `lerf_ros` has both its sources and the generated msg/srv."""
    probe = (
        "import json, sys, lerf_ros, lerf_ros.core.frames.transforms as t, lerf_ros.msg as m,"
        " lerf_ros.srv as s;"
        "print(json.dumps([lerf_ros.__file__, t.__file__, m.__file__, s.__file__, list(lerf_ros.__path__),"
        " sys.prefix]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=os.environ.copy(),
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    init, transforms, msg, srv, path, prefix = json.loads(out.strip().splitlines()[-1])
    pkg_dir = Path(init).parent
    assert Path(transforms) == pkg_dir / "core" / "frames" / "transforms.py"
    generated = Path(msg).parents[1]
    assert Path(srv).parents[1] == generated
    if not (Path(prefix) / ".lerf_setup").is_dir():
        # colcon install: sources and generated code share one directory.
        assert generated == pkg_dir
        return
    # Venv made by scripts/setup.sh: the sources are this checkout (editable); the generated half is a
    # separate directory without __init__.py (so it cannot shadow the sources), reached through __path__.
    assert pkg_dir == REPO / "lerf_ros"
    assert Path(path[0]) == pkg_dir
    assert generated != pkg_dir and str(generated) in path
    assert not (generated / "__init__.py").exists()
