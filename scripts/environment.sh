#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: pick the Python environment to install into, then install the pinned torch.
#
# An active virtualenv (or conda environment) is used as it is. With none active, the project's own `.venv` is created
# on first use and used from then on, so the commands never install into a system or user Python by surprise.
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
    echo "Installing into the active environment: ${VIRTUAL_ENV:-$CONDA_PREFIX}"
else
    if [ ! -x .venv/bin/python ]; then
        echo "No virtualenv is active: creating the project's .venv (activate it with \`source .venv/bin/activate\`)."
        python3 -m venv .venv
    fi
    echo "Installing into the project's virtualenv: $(pwd)/.venv"
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

pip_install() {
    python -m pip install --quiet --disable-pip-version-check "$@"
}

# torch and torchvision first, pinned to the pair this machine's disk holds (vision-language processors need
# torchvision, which does not load beside the CPU torch 2.13.0); a bare `torch` would download a CUDA build.
pip_install "torch==2.14.1" "torchvision==0.29.1"
