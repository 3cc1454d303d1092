"""Is ROS 2 installed on this machine? Then tf2_ros, cv_bridge and diagnostic_updater are required, not
substituted.

The substitutes in ``lerf_ros.compat`` (the TF buffer + listener of ``tf``, the numpy image conversions of
``image``, the /diagnostics timer of ``diagnostics``) exist for machines without a ROS install: CI, a
laptop, the PyPI-wheel venv that ``scripts/setup.sh`` builds. On a robot with ROS 2, a tf2_ros, cv_bridge or
diagnostic_updater that does not import is an installation mistake (``rosdep install`` resolves them from
package.xml), and a substitute would hide it; so start-up stops with a message that says what to install
(``MissingRosDependency``).

A ROS 2 install is recognised by what its setup file leaves in the environment:
- an ``AMENT_PREFIX_PATH`` entry whose ament index registers ``ros_environment`` (every ROS 2 install,
  from apt or from source, has it; the PyPI wheels do not);
- ``ROS_VERSION=2``, or ``ROS_DISTRO`` set without ``ROS_VERSION=1`` and not naming a ROS 1
  distribution (container images set ROS_DISTRO before the setup file is sourced).

Pure functions of the environment (a mapping) and of what did not import, so tests decide with
fixtures; ``check_ros_pieces()`` probes the real imports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Present under every ROS 2 install prefix (package ros_environment sets ROS_DISTRO / ROS_VERSION).
ROS_ENVIRONMENT_MARKER = Path("share", "ament_index", "resource_index", "packages", "ros_environment")
ROS1_DISTROS = frozenset({"boxturtle", "cturtle", "diamondback", "electric", "fuerte", "groovy", "hydro",
                          "indigo", "jade", "kinetic", "lunar", "melodic", "noetic"})


@dataclass(frozen=True)
class RosPiece:
    """A ROS Python module that lerf_ros can substitute where no ROS is installed."""

    module: str  # the Python module
    rosdep_key: str  # the package.xml key that provides the module (apt: ros-<distro>-<key with ->)
    substitute: str  # what serves instead on a machine without ROS


PIECES = (
    RosPiece("tf2_ros", "tf2_ros_py", "lerf_ros.compat.tf (TfBufferSubstitute + TfListenerSubstitute)"),
    RosPiece("cv_bridge", "cv_bridge", "lerf_ros.compat.image (numpy conversions)"),
    RosPiece("diagnostic_updater", "diagnostic_updater", "lerf_ros.compat.diagnostics (UpdaterSubstitute)"),
)


class MissingRosDependency(ValueError):
    """ROS 2 is installed but a piece lerf_ros needs from it does not import; names what to install."""


def detect_ros2_install(environ: Mapping[str, str] | None = None) -> str | None:
    """A short description of the ROS 2 install the environment points at, or None (no ROS 2)."""
    env = os.environ if environ is None else environ
    found = []
    for prefix in filter(None, env.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        if (Path(prefix) / ROS_ENVIRONMENT_MARKER).is_file():
            found.append(f"AMENT_PREFIX_PATH entry {prefix} (has ros_environment)")
            break
    distro, version = env.get("ROS_DISTRO", "").strip(), env.get("ROS_VERSION", "").strip()
    if version == "2" or (distro and version != "1" and distro.lower() not in ROS1_DISTROS):
        found.insert(0, ", ".join(f"{k}={v}" for k, v in (("ROS_DISTRO", distro), ("ROS_VERSION", version))
                                  if v))
    return "; ".join(found) or None


@dataclass(frozen=True)
class RosPiecesDecision:
    """Which substitutes serve (only ever where ``ros_install`` is None)."""

    ros_install: str | None
    substitutes: tuple[RosPiece, ...]

    def message(self) -> str:
        """One line for the start-up log."""
        real = [p.module for p in PIECES if p not in self.substitutes]
        if not self.substitutes:
            return f"using the installed {', '.join(real)}" + (
                f" (ROS 2: {self.ros_install})" if self.ros_install else "")
        used = "; ".join(f"{p.module} -> {p.substitute}" for p in self.substitutes)
        return ("no ROS 2 install detected (no ROS_DISTRO / ROS_VERSION, no ros_environment on "
                f"AMENT_PREFIX_PATH): using lerf_ros's substitutes for machines without ROS: {used}"
                + (f"; installed: {', '.join(real)}" if real else ""))


def decide(unavailable: Mapping[str, str], environ: Mapping[str, str] | None = None) -> RosPiecesDecision:
    """``unavailable``: module -> why it does not import, for each of ``PIECES`` that does not.

    Raises MissingRosDependency when ROS 2 is installed and a piece is unavailable; otherwise the
    substitutes that will serve.
    """
    install = detect_ros2_install(environ)
    missing = tuple(p for p in PIECES if p.module in unavailable)
    if install is not None and missing:
        env = os.environ if environ is None else environ
        distro = env.get("ROS_DISTRO", "").strip() or "<distro>"
        lines = [f"{p.module} does not import ({unavailable[p.module]}): install rosdep key {p.rosdep_key} "
                 f"(apt: ros-{distro}-{p.rosdep_key.replace('_', '-')})" for p in missing]
        raise MissingRosDependency(
            f"ROS 2 is installed here ({install}) but " + "; ".join(lines) + ". Run `rosdep install "
            "--from-paths src --ignore-src -y` in the workspace and source its setup file again. "
            "lerf_ros's substitutes serve only machines without a ROS install.")
    return RosPiecesDecision(install, missing)


def unavailable_pieces() -> dict[str, str]:
    """module -> why it does not import, probing tf2_ros and diagnostic_updater (already tried by
    ``compat.tf`` / ``compat.diagnostics``) and cv_bridge."""
    from lerf_ros.compat import diagnostics, image, tf

    out = {}
    if not tf.HAVE_TF2_ROS:
        out["tf2_ros"] = tf.TF2_ROS_IMPORT_ERROR or "not imported"
    if not diagnostics.HAVE_DIAGNOSTIC_UPDATER:
        out["diagnostic_updater"] = diagnostics.DIAGNOSTIC_UPDATER_IMPORT_ERROR or "not imported"
    reason = image.cv_bridge_unavailable_reason()
    if reason is not None:
        out["cv_bridge"] = reason
    return out


def check_ros_pieces(environ: Mapping[str, str] | None = None) -> RosPiecesDecision:
    """``decide`` on this process's imports; raises MissingRosDependency on a ROS machine lacking one."""
    return decide(unavailable_pieces(), environ)
