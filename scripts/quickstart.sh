#!/usr/bin/env bash
# The main job on a fresh clone: install, then train the bundled tiny MoE vision-language model with MoE-GRPO on the
# generated visual multiple-choice tasks (CPU, a few minutes) and print the before/after report.
# Installs into the active virtualenv, or into the project's `.venv` (created if needed) when none is active.
# Extra arguments override the recipe, e.g. `bash scripts/quickstart.sh --max_steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/environment.sh
pip_install -e ".[plots]"
python -m trl_moe_grpo.demo.visual_mc data/visual_mc
python -m accelerate.commands.launch --num_processes 1 recipes/train.py --config recipes/quickstart.yaml "$@"
