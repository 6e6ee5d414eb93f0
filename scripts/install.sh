#!/usr/bin/env bash
# Installs loraserve into ./.venv (Python 3.11 or newer with venv and pip; PYTHON picks the
# interpreter). torch comes first, chosen for this machine (scripts/machine.sh's torch_args: a
# build already on disk, else CUDA where nvidia-smi sees a GPU, else the CPU build); a torch
# already in .venv stays. pyproject.toml keeps torch unpinned.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/machine.sh
extras="${1:-}"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || missing "no $python on PATH:" "Python 3.11 or newer (set PYTHON to use another interpreter)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || missing "$("$python" -V 2>&1) is too old:" "Python 3.11 or newer (set PYTHON to use another interpreter)"
"$python" -m venv .venv || missing "$python could not make .venv:" "its venv module (Debian/Ubuntu: apt-get install python3-venv)"
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/pip show -q torch 2>/dev/null; then
  torch=$(torch_args .venv/bin/pip)
  # shellcheck disable=SC2086 # torch holds several pip arguments
  .venv/bin/pip install -q $torch
fi
.venv/bin/pip install -q -e clients/python -e ".${extras:+[$extras]}"
