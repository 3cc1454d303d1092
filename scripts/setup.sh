#!/usr/bin/env bash
# No-ROS install path: create or update the virtual environment, install the pinned wheels (requirements.txt:
# torch, OpenCLIP, the ROS 2 Jazzy wheels from PyPI), build a wire-compatible tf2_msgs and this package's own
# interfaces (msg/, srv/, action/) into it with cmake, and install the lerf_ros sources editable.
#
#   bash scripts/setup.sh            # venv at <repo>/.venv
#   LERF_VENV=/path/venv bash scripts/setup.sh
#
# Idempotent: every step records a hash of its inputs and is skipped when they are unchanged, so a second run
# only checks. Needs python3 (3.11, matching the wheels), cmake and g++ (installed with apt-get when missing and
# running as root). Prints the set-up time and the venv size at the end.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LERF_VENV:-$REPO_ROOT/.venv}"
PYTHON="${LERF_PYTHON:-python3}"
STAMPS="$VENV/.lerf_setup"
SETUP_START=$(date +%s)
CURRENT_STEP="start"
DID_WORK=()

# A python launched from another venv's python inherits the ROS wheels' re-exec guard and would keep that
# venv's LD_LIBRARY_PATH; drop it so this venv's bootstrap sets its own.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

step() {
  CURRENT_STEP="$1"
  echo "[setup] $1"
}
on_error() {
  local rc=$?
  echo "[setup] FAILED (exit $rc) in step: $CURRENT_STEP" >&2
  echo "[setup] venv: $VENV; build logs under $REPO_ROOT/build/setup/" >&2
  exit "$rc"
}
trap on_error ERR

hash_of() {  # hash_of <files or strings...>: sha256 over file contents (or the literal string when no file)
  local item
  for item in "$@"; do
    if [[ -f "$item" ]]; then
      printf '%s\n' "$item"
      cat "$item"
    else
      printf '%s\n' "$item"
    fi
  done | sha256sum | cut -d' ' -f1
}
stamp_ok() { [[ -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]; }
stamp_set() { mkdir -p "$STAMPS" && printf '%s\n' "$2" > "$STAMPS/$1"; }

# --- 1. system tools -------------------------------------------------------------------------------------------
step "check system tools (python3, cmake, g++)"
if ! command -v "$PYTHON" >/dev/null; then
  echo "[setup] '$PYTHON' not found: install Python 3.11 (or set LERF_PYTHON)" >&2
  false
fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    step "install cmake and g++ with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
    DID_WORK+=("apt cmake g++")
  else
    echo "[setup] cmake and g++ are required to build the ROS interfaces: sudo apt-get install -y cmake g++" >&2
    false
  fi
fi

# --- 2. virtual environment + pinned wheels ---------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  step "create venv $VENV"
  "$PYTHON" -m venv "$VENV"
  DID_WORK+=("venv")
fi
PY="$VENV/bin/python"
py_ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [[ "$py_ver" != "3.11" ]]; then
  echo "[setup] warning: venv python is $py_ver; the pinned wheels were resolved for CPython 3.11" >&2
fi

step "install pinned wheels (requirements.txt)"
req_hash=$(hash_of "$REPO_ROOT/requirements.txt" "$py_ver")
if stamp_ok requirements "$req_hash"; then
  echo "[setup]   unchanged, skipped"
else
  "$PY" -m pip install -q -r "$REPO_ROOT/requirements.txt"
  stamp_set requirements "$req_hash"
  DID_WORK+=("pip requirements")
fi

# --- 3. make the wheels' CMake exports usable here -------------------------------------------------------------
# The wheels were built in a manylinux image: their exported CMake targets point at /opt/python/cpXY-cpXY/...
# (Python and numpy headers); point them at this interpreter's. Cheap, so it always runs (a pip reinstall of a
# wheel would bring the old paths back).
step "rewrite wheel CMake include paths to this venv"
py_include=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("include"))')
np_include=$("$PY" -c 'import numpy; print(numpy.get_include())')
if [[ ! -f "$py_include/Python.h" ]]; then
  echo "[setup] Python.h not found in $py_include: install the Python development headers (python3-dev)" >&2
  false
fi
mapfile -t foreign < <(grep -rlE '/opt/python/cp[0-9]+-cp[0-9]+/' "$VENV"/share/*/cmake/ 2>/dev/null || true)
if ((${#foreign[@]})); then
  sed -i -E \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#${np_include}#g" \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python3\.[0-9]+#${py_include}#g" \
    "${foreign[@]}"
  echo "[setup]   rewrote ${#foreign[@]} files"
  DID_WORK+=("cmake paths")
fi
if grep -rqE '/opt/python/' "$VENV"/share/*/cmake/ 2>/dev/null; then
  echo "[setup] unrewritten /opt/python paths remain in $VENV/share/*/cmake:" >&2
  grep -rlE '/opt/python/' "$VENV"/share/*/cmake/ >&2
  false
fi

# --- 4. interface packages -----------------------------------------------------------------------------------
venv_id=$(printf '%s' "$VENV" | sha256sum | cut -c1-10)
BUILD_ROOT="$REPO_ROOT/build/setup/$venv_id"
mkdir -p "$BUILD_ROOT"
cmake_ver=$(cmake --version | head -1)
site_dir=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')

build_interfaces() {  # build_interfaces <name> <source dir> <check file> <extra cmake args...>
  local name=$1 src=$2 check=$3
  shift 3
  local bld="$BUILD_ROOT/$name" log="$BUILD_ROOT/$name.log"
  local inputs
  # Inputs: the manifest, CMakeLists.txt and msg/ srv/ action/ definitions at the top of the source tree.
  inputs=$(cd "$src" && find . -maxdepth 2 \( -path ./build -o -path ./.venv -o -path ./.git \) -prune -o \
    \( -name '*.msg' -o -name '*.srv' -o -name '*.action' -o -name CMakeLists.txt -o -name package.xml \) \
    -print | LC_ALL=C sort)
  local h
  h=$(cd "$src" && hash_of $inputs "$cmake_ver" "$VENV" "$*")
  step "build $name interfaces into venv"
  if stamp_ok "build-$name" "$h" && [[ -e "$check" ]]; then
    echo "[setup]   unchanged, skipped"
    return
  fi
  local t0=$(date +%s)
  {
    # AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH: the wheels installed their share/<pkg>/cmake files into the venv.
    export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
    cmake -S "$src" -B "$bld" \
      -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$PY" -DCMAKE_INSTALL_RPATH="$VENV/lib" "$@" &&
      cmake --build "$bld" -j "$(nproc)" &&
      cmake --install "$bld"
  } >"$log" 2>&1 || {
    echo "[setup] cmake build of $name failed; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    false
  }
  stamp_set "build-$name" "$h"
  DID_WORK+=("$name ($(($(date +%s) - t0)) s)")
}

# tf2_msgs is not on PyPI. Only TFMessage is needed (the /tf and /tf_static type); generated from the same
# definition as upstream it has the same type hash, so it talks to real robots. Written here as a build input.
TF2_SRC="$BUILD_ROOT/tf2_msgs_src"
mkdir -p "$TF2_SRC/msg"
write_if_changed() {  # write_if_changed <file> <content>: keep mtimes stable for the input hash / cmake
  if [[ ! -f "$1" || "$(cat "$1")" != "$2" ]]; then printf '%s\n' "$2" > "$1"; fi
}
write_if_changed "$TF2_SRC/msg/TFMessage.msg" "geometry_msgs/TransformStamped[] transforms"
write_if_changed "$TF2_SRC/package.xml" '<?xml version="1.0"?>
<package format="3">
  <name>tf2_msgs</name>
  <version>0.36.0</version>
  <description>Minimal tf2_msgs (TFMessage only) built by lerf_ros scripts/setup.sh for the no-ROS venv.</description>
  <maintainer email="lerf-ros-maintainers@example.org">lerf_ros maintainers</maintainer>
  <license>BSD-3-Clause</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
  <depend>geometry_msgs</depend>
  <exec_depend>rosidl_default_runtime</exec_depend>
  <member_of_group>rosidl_interface_packages</member_of_group>
  <export><build_type>ament_cmake</build_type></export>
</package>'
write_if_changed "$TF2_SRC/CMakeLists.txt" 'cmake_minimum_required(VERSION 3.16)
project(tf2_msgs)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(geometry_msgs REQUIRED)
rosidl_generate_interfaces(${PROJECT_NAME} "msg/TFMessage.msg" DEPENDENCIES geometry_msgs)
ament_export_dependencies(rosidl_default_runtime)
ament_package()'

build_interfaces tf2_msgs "$TF2_SRC" "$site_dir/tf2_msgs/msg/_tf_message.py"
build_interfaces lerf_ros "$REPO_ROOT" "$site_dir/lerf_ros/action/_locate.py" -DLERF_ROS_VENV_BUILD=ON

# --- 5. the lerf_ros sources, editable ---------------------------------------------------------------------------
# compat mode puts the checkout on sys.path with a .pth file: a regular package found through sys.path takes
# precedence over the generated site-packages/lerf_ros namespace portion (a meta-path finder would not).
step "install lerf_ros sources (pip install -e)"
edit_hash=$(hash_of "$REPO_ROOT/setup.py" "$REPO_ROOT")
if stamp_ok editable "$edit_hash" && "$PY" -c 'import importlib.metadata as m; m.version("lerf_ros")' 2>/dev/null; then
  echo "[setup]   unchanged, skipped"
else
  "$PY" -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e "$REPO_ROOT"
  stamp_set editable "$edit_hash"
  DID_WORK+=("editable install")
fi

# --- 6. verify -----------------------------------------------------------------------------------------------
step "verify imports (from an unrelated directory)"
(cd / && "$PY" - "$REPO_ROOT" <<'EOF'
import pathlib
import sys

import rclpy  # noqa: F401
import rclpy.action  # noqa: F401  (lerf/locate; needs action_msgs and rcl_action from requirements.txt)
import rclpy.lifecycle  # noqa: F401  (managed nodes; lifecycle_msgs comes with rclpy: ros-lifecycle-msgs)
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: F401
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray  # noqa: F401  (/diagnostics; the wheel from requirements.txt)
from lerf_ros.msg import Target, TrainingStatus
from lerf_ros.action import Locate
from lerf_ros.srv import MapPath, Query  # noqa: F401
from tf2_msgs.msg import TFMessage

import lerf_ros.core.frames.transforms as transforms

repo = pathlib.Path(sys.argv[1]).resolve()
src = pathlib.Path(transforms.__file__).resolve()
if repo not in src.parents:
    sys.exit(f"lerf_ros.core resolves to {src}, not to the checkout {repo}")
assert TrainingStatus.STATE_ERROR == 4 and hasattr(Query.Request(), "max_results")
assert Query.Response.RESULT_ERROR == 5 and hasattr(Target(), "extent")
assert TFMessage().transforms == []
assert Locate.Result.RESULT_FOUND == Query.Response.RESULT_FOUND and hasattr(Locate.Goal(), "timeout_s")
assert GoalStatus.STATUS_CANCELED == 5
generated = pathlib.Path(sys.modules["lerf_ros.srv"].__file__).resolve().parents[1]
print(f"[setup]   ok: lerf_ros sources {src.parents[1]}, generated interfaces {generated}")
EOF
)

elapsed=$(($(date +%s) - SETUP_START))
size=$(du -sh "$VENV" 2>/dev/null | cut -f1)
if ((${#DID_WORK[@]})); then
  echo "[setup] done in ${elapsed} s (did: ${DID_WORK[*]}); venv $VENV: $size"
else
  echo "[setup] done in ${elapsed} s (nothing to do); venv $VENV: $size"
fi
