#!/usr/bin/env bash
# Sets up (same script as serving, plus test tools), checks format, lint and types, and runs the
# whole test suite (tests/unit: seconds, no engine; tests/e2e: the real engine). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROPESERVE_WITH_TESTS=1 bash scripts/setup.sh
echo "==> ruff format --check, ruff check, mypy"
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
