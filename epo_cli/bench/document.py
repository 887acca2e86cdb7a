"""docs/benchmarks.md as a page: a header saying where and when it was measured, then one
``<!-- bench:PART -->`` block per part. A run re-measures some parts and keeps the other
blocks of the existing page, among them ``gpu`` (scripts/gpu_check.py's, never measured here)."""

from __future__ import annotations

import platform
from datetime import date


def render_header() -> str:
    import os

    import torch

    return "\n".join([
        "# Benchmarks",
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. "
        "Each ratio is against the baseline measured in the same run; `python -m epo_cli.bench --only PART` "
        "re-measures one part and leaves the others as they were.",
    ]) + "\n"


def kept_blocks(document: str) -> str:
    """The ``<!-- bench:... -->`` blocks of an existing page (all that follows its header)."""
    return document[document.index("<!-- bench:") :] if "<!-- bench:" in document else ""


def merge_part(document: str, part: str, body: str) -> str:
    """``document`` with the block of ``part`` replaced by ``body`` (appended if new)."""
    start, end = f"<!-- bench:{part} -->", f"<!-- /bench:{part} -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    if start in document and end in document:
        head, rest = document.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return document.rstrip("\n") + "\n\n" + block
