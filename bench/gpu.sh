#!/usr/bin/env bash
# The GPU table of issue 12 in one command: training steps/s + rays/s per hash-grid backend (default
# preset, 4096 rays), query latency, peak GPU memory, ViT-B/16 pyramid s/keyframe, seconds until the
# synthetic rooms are located (RGB-D and RGB-only). Under 8 minutes on one H100/H200-class GPU.
#
#   bench/gpu.sh                        # prints the table, writes bench/out/gpu_cuda.json
#   bench/gpu.sh --device cpu --quick   # the same pieces, small, on a CPU (1-2 minutes)
#
# Python: $PYTHON if set, else the project's .venv if it has torch, else the machine's python3 (the lent
# GPU machine's own, with torch and triton; rclpy and open_clip are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu.py "$@"
