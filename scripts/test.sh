#!/usr/bin/env bash
# The test command (README, .ci/run): set up the venv (idempotent, scripts/setup.sh), then lint with ruff and
# run pytest with DDS confined to loopback on a random domain. Arguments are passed to pytest, e.g.
#   bash scripts/test.sh test/foundation -q
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LERF_VENV:-$REPO_ROOT/.venv}"

bash "$REPO_ROOT/scripts/setup.sh"

# No DDS traffic may leave loopback; a random domain keeps parallel runs on one host apart.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_LOCALHOST_ONLY=1
ROS_DOMAIN_ID=$((RANDOM % 101 + 1))
export ROS_DOMAIN_ID
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE  # let the venv's python set its own LD_LIBRARY_PATH

cd "$REPO_ROOT"
# Both run even when the first fails, so one pass reports lint and test failures together.
echo "[test] ruff check . (ROS_DOMAIN_ID=$ROS_DOMAIN_ID)"
ruff_rc=0
"$VENV/bin/ruff" check . || ruff_rc=$?

echo "[test] pytest $*"
rc=0
"$VENV/bin/python" -m pytest "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
  echo "[test] FAILED: pytest collected no tests (exit 5)" >&2
elif [[ $rc -ne 0 ]]; then
  echo "[test] FAILED: pytest exit $rc" >&2
fi
if [[ $ruff_rc -ne 0 ]]; then
  echo "[test] FAILED: ruff found problems (exit $ruff_rc)" >&2
  [[ $rc -ne 0 ]] || rc=$ruff_rc
fi
exit "$rc"
