#!/usr/bin/env bash
# Install what the test suite needs on a fresh clone, then lint and run it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
