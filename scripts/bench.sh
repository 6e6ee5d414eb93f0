#!/usr/bin/env bash
# The hot-weights benchmark on this machine: starts the real embedded service (local Ray,
# Serve workers, the gRPC gateway on loopback, a temporary data dir) with tiny SDXL models
# and prints one table of ratios (P1 serving overhead, P2 LoRA tax/churn, P3 base-model
# churn, P4 queue scale). `--quick` for a ~2 min run, `--json PATH` to keep the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import loraserve, diffusers, ray.serve" >/dev/null 2>&1; then
  bash scripts/install.sh
fi
exec .venv/bin/python -m bench "$@"
