"""Run records: what a finished child of a sweep or an ablation leaves behind, as one JSON
file: its arm, seed and experiment key, its params, the metric histories that the summary
and the ablation figure read, and the episodes of its last evaluation.

An MLflow store does not outlive every machine; a folder of records does, and it can be
committed, copied or merged. ``epo ablate --sweep FILE --records DIR`` writes one file per
finished child, skips the children the folder already holds (same arm, seed and settings)
and summarizes them with the store's; ``epo plot ablation --records DIR`` draws them. So a
study can run a few seeds at a time on different machines and still be summarized whole.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from epo_cli.paths import write_atomically
from epo_cli.stats import EpisodeOutcome

RECORD_FORMAT = "epo-run-record/1"

# The histories a record keeps: the summary's (ablate.summarize) and the ablation figure's
# panels (plots.ABLATION_PANELS), with the corridor's reference.
RECORD_METRICS = (
    "train/success_rate", "train/reward_mean", "train/decoy_rate",
    "eval/iid/success_rate", "eval/iid/episodes", "eval/ood/success_rate", "eval/ood/episodes",
    "actor/entropy", "actor/entropy_var", "epo/entropy_ref", "epo/out_of_corridor_frac", "epo/beta",
    "grad/entropy_bonus_ratio", "grad/smooth_ratio",
)


class RecordError(ValueError):
    """A record file that cannot be read as one."""


@dataclass
class RunRecord:
    """One finished (or diverged) child run of the sweep or ablation ``study``. ``metrics``:
    key -> [[step, value], ...] in step order; ``outcomes``: split -> the episodes of its
    last evaluation of that split."""

    study: str
    variant: str
    seed: int
    run_id: str
    experiment_key: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[list[float]]] = field(default_factory=dict)
    outcomes: dict[str, list[EpisodeOutcome]] = field(default_factory=dict)
    diverged: bool = False

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = self.metrics.get(key, [])
        return [int(step) for step, _ in points], [value for _, value in points]

    def history(self, key: str) -> list[float]:
        return self.series(key)[1]

    def last(self, key: str) -> float | None:
        values = self.history(key)
        return values[-1] if values else None

    @property
    def file_name(self) -> str:
        return f"{self.variant.replace('/', '_')}-s{self.seed}.json"


def record_of(client, run, study: str, variant: str, seed: int, experiment_key: str, diverged: bool = False,
              keys: tuple[str, ...] = RECORD_METRICS) -> RunRecord:
    """The record of an MLflow run: the histories of ``keys`` it logged and its last
    evaluation's episodes (none where it logged no per-episode file)."""
    run_id = run.info.run_id
    metrics = {}
    for key in keys:
        if key in run.data.metrics:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            metrics[key] = [[m.step, m.value] for m in history]
    outcomes = {split: found for split in ("iid", "ood") if (found := _logged_outcomes(client, run_id, split))}
    return RunRecord(study, variant, seed, run_id, experiment_key, dict(run.data.params), metrics, outcomes, diverged)


def _logged_outcomes(client, run_id: str, split: str) -> list[EpisodeOutcome]:
    """The per-episode outcomes of a run's latest evaluation of ``split``, as logged; none
    where the run has no such file or its records predate per-episode env and seed."""
    from epo_cli.evaluate import logged_result
    from epo_cli.transcripts import read_episodes, run_episode_file

    try:
        chosen, text = run_episode_file(client, run_id, None, split)
        return logged_result(split, read_episodes(text, chosen.path), chosen.path).outcomes
    except LookupError:
        return []


def write_record(folder: Path, record: RunRecord) -> Path:
    """``record`` into ``folder`` (created if needed) as ``VARIANT-sSEED.json``, atomically."""
    payload = {"format": RECORD_FORMAT, **dataclasses.asdict(record)}
    path = folder / record.file_name
    write_atomically(path, json.dumps(payload, separators=(",", ":")))
    return path


def read_record(path: Path) -> RunRecord:
    try:
        payload = json.loads(path.read_text())
        if payload.pop("format", None) != RECORD_FORMAT:
            raise ValueError(f"expected format {RECORD_FORMAT!r}")
        outcomes = {split: [EpisodeOutcome(**o) for o in rows] for split, rows in payload.pop("outcomes").items()}
        return RunRecord(**payload, outcomes=outcomes)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecordError(f"run record {path}: not a file written by `epo ablate --records` "
                          f"({err.__class__.__name__}: {err})") from None


def read_records(folder: Path) -> list[RunRecord]:
    """Every record of ``folder`` (``*.json``, by name); none where the folder does not exist."""
    return [read_record(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
