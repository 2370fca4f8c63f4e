#!/usr/bin/env bash
# Sets up (same script as serving, plus test tools), checks format, lint and types, and runs a tier
# of the test suite:
#   bash scripts/test.sh           the default tier (what CI runs): every unit test, and an
#                                  end-to-end test of every capability on the real engine
#   bash scripts/test.sh --long    everything: the default tier and the long tier (24k-30k documents,
#                                  the full RoPE matrix, preemption, both TP backends, replicas, ...)
# Other arguments go to pytest. Tiers are pytest markers (pyproject.toml; tests/conftest.py checks
# that every end-to-end test has one).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not long_tier")
if [ "${1:-}" = "--long" ]; then
  tier=()
  shift
fi
ROPESERVE_WITH_TESTS=1 bash scripts/setup.sh
echo "==> ruff format --check, ruff check, mypy"
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
echo "==> pytest ${tier[*]:-(every tier)}"
exec .venv/bin/python -m pytest --durations=25 "${tier[@]}" "$@"
