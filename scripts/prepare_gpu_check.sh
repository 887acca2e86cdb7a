#!/usr/bin/env bash
# Prepare, on a machine with network and epo installed, what the GPU check needs on an
# offline GPU machine (docs/performance.md "The GPU check"): the Python 3.12 wheels that
# its image lacks, and the default model's tokenizer, in .gpu_check/ (git-ignored, ~3 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.gpu_check
mkdir -p "$target/wheels"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$target/wheels" pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
python - "$target/tokenizer" <<'PY'
import sys

from epo_cli.models import DEFAULT_MODEL, load_tokenizer

load_tokenizer(DEFAULT_MODEL).save_pretrained(sys.argv[1])
PY
du -sh "$target"
