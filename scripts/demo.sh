#!/usr/bin/env bash
# The main job end to end on the embedded default: local Ray + Serve workers, the gRPC
# gateway and a local file store on this machine; makes a tiny SDXL model and a LoRA,
# generates an image with the LoRA through the gRPC API and prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/loraserve demo --data-dir "${LORASERVE_DATA_DIR:-./loraserve-data}" --ray-num-cpus "${LORASERVE_RAY_NUM_CPUS:-2}" "$@"
