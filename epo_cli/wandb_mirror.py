"""Weights & Biases beside the primary store (``tracking.wandb``): every param, metric and
text file a run logs to MLflow (or JSONL) is also sent to a W&B run with the same id.

MLflow stays the store that ``epo plot``, ``epo show`` and ``epo ablate`` read; W&B is a
mirror for those who follow runs there. Episode files (``episodes/*.jsonl``) become W&B
tables, one row per line; other text files are saved into the W&B run's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from epo_cli.paths import epo_home


def wandb_dir() -> Path:
    """Where W&B keeps its local run folders (offline runs live there until ``wandb sync``)."""
    import os

    return Path(os.environ.get("WANDB_DIR") or epo_home() / "wandb")


def jsonl_table(text: str):
    """A W&B table of a JSONL file: one row per line, columns the keys of all lines (nested
    values as JSON text)."""
    import wandb

    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any):
        return json.dumps(value) if isinstance(value, (dict, list)) else value

    return wandb.Table(columns=columns, data=[[cell(row.get(c)) for c in columns] for row in rows])


class WandbMirror:
    """A tracker that logs to ``primary`` and mirrors each call to a W&B run of the same id
    (``resume="allow"``: a resumed or evaluated run continues it; W&B keeps only steps above
    the run's last, so steps replayed after a resume stay MLflow's alone)."""

    def __init__(self, primary, tracking, tags: dict[str, str] | None = None):
        import wandb

        self.primary = primary
        self.pending_tables: dict[str, Any] = {}  # sent with the next metrics: the step they belong to
        folder = wandb_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=tracking.wandb_project, id=primary.run_id, name=primary.run_name, resume="allow",
            mode=tracking.wandb_mode, dir=str(folder), tags=[f"{k}={v}"[:64] for k, v in (tags or {}).items()],
            reinit="create_new",
        )

    def __getattr__(self, name: str):
        return getattr(self.primary, name)  # run_id, run_name, uri, ... of the primary store

    def log_params(self, params: dict[str, Any]) -> None:
        self.primary.log_params(params)
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.primary.log_metrics(metrics, step)
        self.run.log({**{k: float(v) for k, v in metrics.items()}, **self.pending_tables}, step=step)
        self.pending_tables = {}

    def log_text(self, text: str, artifact_file: str) -> None:
        self.primary.log_text(text, artifact_file)
        if artifact_file.endswith(".jsonl"):
            self.pending_tables[artifact_file.removesuffix(".jsonl")] = jsonl_table(text)
            return
        target = Path(self.run.dir) / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        self.run.save(str(target), base_path=self.run.dir, policy="now")

    def finish(self, status: str = "FINISHED") -> None:
        self.primary.finish(status)
        if self.pending_tables:
            self.run.log(self.pending_tables)
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
