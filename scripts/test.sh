#!/usr/bin/env bash
# The test command (README, .ci/run): set up the venv (idempotent, scripts/setup.sh), then lint with ruff and
# run pytest with DDS confined to loopback on a random domain. Arguments are passed to pytest, e.g.
#   bash scripts/test.sh test/foundation -q
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LERF_VENV:-$REPO_ROOT/.venv}"

bash "$REPO_ROOT/scripts/setup.sh"

# shellcheck source=ros_env.sh
source "$REPO_ROOT/scripts/ros_env.sh"

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
