#!/usr/bin/env bash
# Installs loraserve into ./.venv on a fresh machine (Python 3.11, pip, Node.js/npm).
# torch==2.13.0 comes first: that spec takes the CPU build that lies on this machine's
# disk; pyproject.toml keeps torch unpinned for users with GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
