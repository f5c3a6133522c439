#!/usr/bin/env bash
# The main job on a fresh clone: install, then train the bundled tiny MoE vision-language model with MoE-GRPO on the
# generated visual multiple-choice tasks (CPU, a few minutes) and print the before/after report.
# Extra arguments override the recipe, e.g. `bash scripts/quickstart.sh --max_steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision pinned to the pair this machine's disk holds; a bare `torch` would download a CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet --disable-pip-version-check -e .
python -m accelerate.commands.launch --num_processes 1 recipes/train.py --config recipes/quickstart.yaml "$@"
