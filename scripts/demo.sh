#!/usr/bin/env bash
# The main job on one machine: set up what is missing, then run the whole demo (demo bag -> the real nodes over
# loopback DDS -> /lerf/query for present and absent objects -> table, PLY clouds, PNG pictures, saved map).
#
#   bash scripts/demo.sh                          # deterministic demo colour encoder, CPU, tiny preset
#   bash scripts/demo.sh --clip-checkpoint /path/open_clip_pytorch_model.bin   # real OpenCLIP weights
#   bash scripts/demo.sh --out out/my-run --frames 60 --steps 300
#
# Everything after the script name goes to `python -m lerf_ros.tools.demo` (see --help). Output folder:
# out/demo-<time> under the repository unless --out is given; its path is printed at the end.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LERF_VENV:-$REPO_ROOT/.venv}"

bash "$REPO_ROOT/scripts/setup.sh"

# shellcheck source=ros_env.sh
source "$REPO_ROOT/scripts/ros_env.sh"

cd "$REPO_ROOT"
exec "$VENV/bin/python" -m lerf_ros.tools.demo "$@"
