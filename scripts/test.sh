#!/usr/bin/env bash
# Sets up (same script as serving, plus test tools) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROPESERVE_WITH_TESTS=1 bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
