#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a machine with one NVIDIA GPU, no network and no
# diffusers: installs the wheels in .whl/ (diffusers, peft and protobuf, at this repo's versions)
# into /tmp/site, then writes $OUT/gpu.log and $OUT/gpu.json. Needs `.whl/` and the generated
# stubs `clients/python/loraserve/v1/` beside the sources (both are ignored by git; carry them). Extra
# arguments go to `python3 -m bench.gpu` (e.g. --repeats 5).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-bench-out}"
mkdir -p "$OUT"
nvidia-smi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD:$PWD/clients/python" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'PY'
import sys

import diffusers, google.protobuf, peft, torch, transformers

print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| diffusers", diffusers.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__,
      "| protobuf", google.protobuf.__version__, "from", google.protobuf.__file__, flush=True)
PY
python3 -m bench.gpu --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
