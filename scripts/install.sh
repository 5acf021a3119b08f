#!/usr/bin/env bash
# Fresh-machine install into ./.venv: torch 2.13.0 first, then polar-train (+ test extras)
# under a torch==2.13.0 constraint so nothing upgrades torch to a CUDA build.
# On a GPU machine with its own torch, use `pip install -e ".[flash]"` in that environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
PIP_CONSTRAINT="$PWD/constraints-cpu.txt" .venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, transformers, deepspeed; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep installed
