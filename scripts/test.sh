#!/usr/bin/env bash
# Install what the test suite needs on a fresh clone, then lint and run it. Extra arguments go to pytest.
# Installs into the active virtualenv, or into the project's `.venv` (created if needed) when none is active.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/environment.sh
pip_install -e ".[dev]"
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
