#!/usr/bin/env bash
# Install the package on a fresh clone and run the tiny MoE-GRPO example end to end on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision pinned to the pair this machine's disk holds; a bare `torch` would download a CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet --disable-pip-version-check -e .
python examples/tiny_text_moe_grpo.py "$@"
