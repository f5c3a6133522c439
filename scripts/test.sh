#!/usr/bin/env bash
# Install what the test suite needs on a fresh clone, then lint and run it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision first, pinned to the pair this machine's disk holds (vision-language processors need
# torchvision, which does not load beside the CPU torch 2.13.0); a bare `torch` would download a CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
