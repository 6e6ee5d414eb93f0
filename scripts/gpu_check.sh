#!/usr/bin/env bash
# The first check of a GPU machine, in one command that fits 9.5 minutes and needs no network there:
# the CUDA-marked tests (side-stream merge race, copy-stream prefetch, LoRA switches and evictions,
# pinned buffers, CUDA memory given back), then the GPU benchmark (bench/gpu.py: SDXL base's
# architecture with random weights, built on the GPU, 1024², 30 steps, fp16, fifty rank-32 LoRAs),
# the FLUX benchmark (bench/gpu_flux.py: FLUX.1 [dev]'s structure with random weights in bf16, 1024²,
# served + LoRA vs plain diffusers per step, LoRA switch, peak memory),
# and one table of verdicts computed against bench/targets.py (bench/gpu_check.py).
#
#   bash scripts/gpu_check.sh --wheels    here, where PyPI answers: the wheels the GPU machine lacks, into .whl/
#   bash scripts/gpu_check.sh             on the GPU machine; carry .whl/ and clients/python/loraserve/v1/ (both git-ignored)
#   bash scripts/gpu_check.sh --dry-run   without CUDA: the same steps on the CPU (tests skip 'needs CUDA',
#                                         the benchmarks run on the tiny SDXL and FLUX), to see that every step runs
#
# Writes $OUT (default ./gpu-check-out): cuda-tests.xml, gpu.json, gpu_flux.json, *.log and table.txt. Exit status 0 only
# when every row of the table passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
MODE="${1:-gpu}"
# Seconds of the 9.5 minutes each step may take; what a step leaves unused goes to the next.
BUDGET=570
TESTS_S=100
GPU_BENCH_S=300
FLUX_BENCH_S=170
# Pinned to this project's environment; pure Python but protobuf (a manylinux wheel for the GPU image's 3.12).
# What the steps import that the image (scripts/gpu_image_packages.txt) lacks; tests/test_gpu_check_env.py checks it.
WHEELS="diffusers peft protobuf pytest pytest-asyncio pytest-timeout pluggy iniconfig prometheus_client boto3 botocore s3transfer jmespath opentelemetry-api"

case "$MODE" in
  --wheels)
    mkdir -p .whl
    for name in $WHEELS; do
      pins+=("$(.venv/bin/python -m pip freeze | grep -i "^${name//_/[-_]}==")")
    done
    exec .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "${pins[@]}"
    ;;
  --dry-run) PY=.venv/bin/python ;;
  gpu) PY=python3 ;;
  *) echo "usage: bash scripts/gpu_check.sh [--wheels | --dry-run]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
rm -f "$OUT"/cuda-tests.xml "$OUT"/*.json
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/clients/python"
if [ "$MODE" = gpu ]; then
  nvidia-smi || echo "nvidia-smi failed: the table will say what ran"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD:$PWD/clients/python"
  fi
  # COMPILE=default|max-autotune: the service's pipeline compiled (its compile and warm-up count against the budget).
  BENCH_ARGS=(--device cuda --repeats 3 --loras 50 --compile "${COMPILE:-off}")
  # With COMPILE, FLUX also times `acceleration: "regular"`; its compile (regional) comes out of FLUX_BENCH_S:
  # COMPILE=default compiles in about a minute, max-autotune's autotuning may not fit.
  FLUX_ARGS=(--device cuda --repeats 2 --compile "${COMPILE:-off}")
else
  BENCH_ARGS=(--device cpu --tiny --repeats 1 --loras 4)
  FLUX_ARGS=(--device cpu --tiny --repeats 1)
fi
"$PY" - <<'PY' || { echo "the Python environment lacks what the checks import (see above); run --wheels where PyPI answers and carry .whl/" >&2; exit 1; }
import sys

import diffusers, peft, pytest, pytest_asyncio, torch  # noqa: F401
import loraserve.v1.generation_pb2  # noqa: F401  (generated stubs, carried: git ignores them)
import bench.gpu, bench.gpu_flux  # noqa: F401  (all that the benchmarks import, at once rather than per step)

print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "| diffusers", diffusers.__version__, "| peft", peft.__version__, flush=True)
PY

left() { echo $((BUDGET - SECONDS)); }
run_step() {  # run_step SECONDS LOG COMMAND...: at most SECONDS, and never past the budget
  local limit=$1 log=$2
  shift 2
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -le 10 ]; then echo "no time left for: $*" | tee "$OUT/$log"; return; fi
  echo "== $* (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
}

mapfile -t CUDA_TESTS < <(grep -rl "pytest.mark.cuda" tests --include='test_*.py' | sort)
# Only the plugins the tests use: the image's own (xdist, cov, benchmark, hypothesis, ...) were built for its
# pytest, not the carried one, and one that fails to load would stop the step before any test ran.
run_step "$TESTS_S" cuda-tests.log env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -p pytest_asyncio.plugin \
  -p pytest_timeout -q -p no:cacheprovider -m cuda -o addopts= --junitxml="$OUT/cuda-tests.xml" -rs "${CUDA_TESTS[@]}"
run_step "$GPU_BENCH_S" gpu.log "$PY" -m bench.gpu --json "$OUT/gpu.json" "${BENCH_ARGS[@]}"
run_step "$FLUX_BENCH_S" gpu_flux.log "$PY" -m bench.gpu_flux --json "$OUT/gpu_flux.json" "${FLUX_ARGS[@]}"

echo
TABLE_ARGS=("$OUT")
[ "$MODE" = --dry-run ] && TABLE_ARGS+=(--dry-run)
"$PY" -m bench.gpu_check "${TABLE_ARGS[@]}" | tee "$OUT/table.txt"
exit "${PIPESTATUS[0]}"
