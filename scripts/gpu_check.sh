#!/usr/bin/env bash
# The GPU check (docs/performance.md): run from the repository root on a GPU machine whose
# image has torch (CUDA), transformers, typer, rich and PyYAML but no network, after
# scripts/prepare_gpu_check.sh filled .gpu_check/ elsewhere. Extra arguments go to
# scripts/gpu_check.py (e.g. --device cpu --dry for the CPU dry mode).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/epo-gpu-site .gpu_check/wheels/*.whl
    export PYTHONPATH="/tmp/epo-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py --tokenizer .gpu_check/tokenizer --out "${OUT:-gpu-check-out}" "$@"
