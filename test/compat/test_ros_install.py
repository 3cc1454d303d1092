"""Whether the substitutes may serve: decided from the environment a ROS 2 setup file leaves behind.

No ROS is installed here, so each case builds its environment (a mapping, and install prefixes in tmp_path).
"""

import sys
from pathlib import Path

import pytest

import lerf_ros.compat.diagnostics as compat_diagnostics
import lerf_ros.compat.tf as compat_tf
from lerf_ros.compat import ros_install
from lerf_ros.compat.ros_install import (
    ROS_ENVIRONMENT_MARKER,
    MissingRosDependency,
    decide,
    detect_ros2_install,
)

BOTH_MISSING = {"tf2_ros": "ModuleNotFoundError: No module named 'tf2_ros'",
                "cv_bridge": "ModuleNotFoundError: No module named 'cv_bridge'"}
IMPORT_ERRORS = {**BOTH_MISSING,
                 "diagnostic_updater": "ModuleNotFoundError: No module named 'diagnostic_updater'"}


def ros_prefix(root: Path) -> Path:
    """An install prefix as apt's /opt/ros/<distro> has it: ros_environment in the ament index."""
    marker = root / ROS_ENVIRONMENT_MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    return root


@pytest.mark.parametrize(
    ("environ", "detected"),
    [
        ({}, None),
        ({"ROS_DISTRO": "jazzy", "ROS_VERSION": "2"}, "ROS_DISTRO=jazzy, ROS_VERSION=2"),
        ({"ROS_VERSION": "2"}, "ROS_VERSION=2"),
        ({"ROS_DISTRO": "jazzy"}, "ROS_DISTRO=jazzy"),  # a container image before setup.bash
        ({"ROS_DISTRO": "noetic", "ROS_VERSION": "1"}, None),  # ROS 1 is not a ROS 2 install
        ({"ROS_DISTRO": "noetic"}, None),
        ({"ROS_DISTRO": ""}, None),
    ],
)
def test_ros2_install_from_ros_environment_variables(environ, detected):
    assert detect_ros2_install(environ) == detected


def test_ros2_install_from_an_ament_prefix_path_entry(tmp_path):
    ros = ros_prefix(tmp_path / "opt" / "ros" / "jazzy")
    plain = tmp_path / "overlay"  # a workspace overlay: its own packages only
    (plain / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    found = detect_ros2_install({"AMENT_PREFIX_PATH": f"{plain}:{ros}"})
    assert found == f"AMENT_PREFIX_PATH entry {ros} (has ros_environment)"
    assert detect_ros2_install({"AMENT_PREFIX_PATH": str(plain)}) is None
    assert detect_ros2_install({"AMENT_PREFIX_PATH": ""}) is None


def test_the_pypi_wheel_venv_is_not_a_ros_install():
    # The venv's ament index registers rclpy and the message packages from the PyPI wheels, but no
    # ros_environment: a venv put on AMENT_PREFIX_PATH (as scripts/setup.sh does while building) stays
    # a machine without ROS.
    venv = Path(sys.prefix)
    if not (venv / "share" / "ament_index" / "resource_index" / "packages" / "rclpy").is_file():
        pytest.skip("not the scripts/setup.sh venv")
    assert detect_ros2_install({"AMENT_PREFIX_PATH": str(venv)}) is None


def test_without_ros_the_substitutes_serve_and_say_so():
    decision = decide(BOTH_MISSING, {})
    assert decision.ros_install is None
    assert [p.module for p in decision.substitutes] == ["tf2_ros", "cv_bridge"]
    text = decision.message()
    assert text.startswith("no ROS 2 install detected")
    assert "tf2_ros -> lerf_ros.compat.tf" in text and "cv_bridge -> lerf_ros.compat.image" in text
    only_tf = decide({"tf2_ros": "x"}, {})
    assert [p.module for p in only_tf.substitutes] == ["tf2_ros"]
    assert "installed: cv_bridge" in only_tf.message()


@pytest.mark.parametrize(
    ("missing", "needles"),
    [
        (["tf2_ros"], ["tf2_ros does not import", "tf2_ros_py", "ros-jazzy-tf2-ros-py"]),
        (["cv_bridge"], ["cv_bridge does not import", "ros-jazzy-cv-bridge"]),
        (["tf2_ros", "cv_bridge"], ["tf2_ros_py", "ros-jazzy-cv-bridge"]),
        (["diagnostic_updater"], ["diagnostic_updater does not import", "ros-jazzy-diagnostic-updater"]),
    ],
)
def test_on_a_ros_machine_a_missing_piece_is_an_error_naming_what_to_install(missing, needles):
    environ = {"ROS_DISTRO": "jazzy", "ROS_VERSION": "2"}
    with pytest.raises(MissingRosDependency) as info:
        decide({name: IMPORT_ERRORS[name] for name in missing}, environ)
    text = str(info.value)
    assert isinstance(info.value, ValueError)  # main.run turns it into exit status 2
    assert "ROS 2 is installed here (ROS_DISTRO=jazzy, ROS_VERSION=2)" in text and "rosdep install" in text
    for needle in needles:
        assert needle in text, needle


def test_on_a_ros_machine_with_every_piece_nothing_is_substituted(tmp_path):
    environ = {"AMENT_PREFIX_PATH": str(ros_prefix(tmp_path / "jazzy"))}
    decision = decide({}, environ)
    assert decision.substitutes == () and decision.ros_install is not None
    assert decision.message().startswith(
        "using the installed tf2_ros, cv_bridge, diagnostic_updater (ROS 2: AMENT_PREFIX")


def test_make_tf_buffer_refuses_the_substitute_on_a_ros_machine(monkeypatch):
    monkeypatch.setattr(compat_tf, "HAVE_TF2_ROS", False)
    monkeypatch.setattr(compat_tf, "TF2_ROS_IMPORT_ERROR", "ModuleNotFoundError: No module named 'tf2_ros'")
    monkeypatch.setenv("ROS_DISTRO", "jazzy")
    monkeypatch.setenv("ROS_VERSION", "2")
    # Refused before the node is touched (None would fail on first use).
    with pytest.raises(MissingRosDependency, match="tf2_ros_py"):
        compat_tf.make_tf_buffer(None)


def test_check_ros_pieces_probes_this_process(monkeypatch):
    for name in ("ROS_DISTRO", "ROS_VERSION", "AMENT_PREFIX_PATH"):
        monkeypatch.delenv(name, raising=False)
    unavailable = ros_install.unavailable_pieces()
    assert ("tf2_ros" in unavailable) == (not compat_tf.HAVE_TF2_ROS)
    assert ("diagnostic_updater" in unavailable) == (not compat_diagnostics.HAVE_DIAGNOSTIC_UPDATER)
    decision = ros_install.check_ros_pieces()
    expected = [m for m in ("tf2_ros", "cv_bridge", "diagnostic_updater") if m in unavailable]
    assert [p.module for p in decision.substitutes] == expected
