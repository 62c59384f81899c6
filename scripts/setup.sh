#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install medunet into it.
#
# torch goes in first, pinned to 2.13.0 (the CPU build on machines without CUDA), so that no
# dependency pulls a multi-GB CUDA build. If the venv already has a torch (e.g. your own CUDA
# build, installed with `.venv/bin/pip install torch ...`), it is kept.
#
# Usage: bash scripts/setup.sh            (VENV=path to use another folder, PYTHON=python3.x to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "medunet setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "medunet setup: installing torch==$TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
stamp="$VENV/.medunet-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "medunet setup: installing medunet and its dependencies"
  "${PIP[@]}" install -e ".[dev]"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import medunet, torch, monai; print(f'medunet {medunet.__version__} ready (torch {torch.__version__}, monai {monai.__version__}) in $VENV')"
