"""Benchmarks: each figure a ratio against a baseline measured in the same run.

``python -m epo_cli.bench [--out docs/benchmarks.md] [--steps N]`` (``nox -s bench``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from epo_cli.bench import compile as compile_part
from epo_cli.bench import envs, lora, packed, recipe_rollout, rollout, scaling, update
from epo_cli.bench.document import kept_blocks, merge_part, render_header

# Each part's block of docs/benchmarks.md, measured from the command line's arguments.
MEASURE = {"envs": envs.measure, "update": update.measure, "compile": compile_part.measure,
           "rollout": rollout.measure, "recipe_rollout": recipe_rollout.measure, "scaling": scaling.measure,
           "packed": packed.measure, "lora": lora.measure}
PARTS = tuple(MEASURE)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m epo_cli.bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--steps", type=int, default=25, help="Steps per episode.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=8, help="Episodes per environment (packed).")
    parser.add_argument("--only", choices=PARTS, action="append", help="Measure only these parts (repeatable).")
    args = parser.parse_args()
    # The parts not re-measured (and the GPU check's, never measured here) stay from the existing file.
    document = render_header() + "\n" + kept_blocks(args.out.read_text() if args.out.exists() else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part in args.only or PARTS:  # written after each part: a later part's failure keeps the earlier ones
        document = merge_part(document, part, MEASURE[part](args))
        staging = args.out.with_name(args.out.name + ".partial")
        staging.write_text(document)
        os.replace(staging, args.out)
    print(document)
