"""The paper's ablations as one MLflow parent run with a child run per (variant, seed)."""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from epo_cli.spec import ExperimentSpec, SpecError, resolve_spec, spec_to_yaml
from epo_cli.tracking import Tracker, connect, resolve_uri


def _algo(name: str) -> dict[str, Any]:
    return {"algo": {"name": name}}


def _epo(**fields: Any) -> dict[str, Any]:
    return {"epo": fields}


def ablation_variants(ablation: str, base: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, spec layer) pairs for an ablation of the ``base`` algorithm (ppo or grpo)."""
    epo = _algo(f"{base}+epo")
    with_variant = lambda variant: {"algo": {"name": f"{base}+epo", "variant": variant}}  # noqa: E731
    table = {
        "smoothing": [("epo", epo), ("epo-base", with_variant("epo-base"))],
        "weighting": [("epo", epo), ("no-dw", with_variant("no-dw"))],
        "penalty-form": [("hinge", epo), ("indicator", with_variant("indicator"))],
        "history": [
            ("cumulative", epo),
            ("window-5", {**epo, **_epo(smoothing={"window": 5})}),
            ("per-turn", {**epo, **_epo(smoothing={"history": "turn"})}),
        ],
        "decay": [("epo", epo), ("decay", with_variant("decay"))],
        "ea": [("epo", epo), ("ea", with_variant("ea"))],
        "baseline": [(base, _algo(base)), (f"{base}+epo", epo)],
    }
    if ablation not in table:
        raise ValueError(f"ablation {ablation!r} is unknown; expected one of {', '.join(table)}")
    return table[ablation]


@dataclass
class ChildSummary:
    variant: str
    seed: int
    run_id: str
    best_success: float
    final_success: float
    final_reward: float
    entropy_variance: float


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def summarize_child(client, run, variant: str, seed: int) -> ChildSummary:
    """Succ.* (best over training) and Succ. (last) from IID evaluation when the run has
    it, else from training success; the variance of the mean entropy across steps."""
    success = _history(client, run.info.run_id, "eval/iid/success_rate") or _history(client, run.info.run_id, "train/success_rate")
    entropy = _history(client, run.info.run_id, "actor/entropy")
    reward = _history(client, run.info.run_id, "train/reward_mean")
    return ChildSummary(
        variant=variant,
        seed=seed,
        run_id=run.info.run_id,
        best_success=max(success, default=float("nan")),
        final_success=success[-1] if success else float("nan"),
        final_reward=reward[-1] if reward else float("nan"),
        entropy_variance=statistics.pvariance(entropy) if len(entropy) > 1 else 0.0,
    )


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


SUMMARY_COLUMNS = ("best success (Succ.*)", "final success (Succ.)", "final reward", "entropy variance")


def summary_rows(children: list[ChildSummary]) -> list[list[str]]:
    rows = []
    for variant in dict.fromkeys(c.variant for c in children):
        mine = [c for c in children if c.variant == variant]
        rows.append([
            variant,
            str(len(mine)),
            _mean_std([c.best_success for c in mine]),
            _mean_std([c.final_success for c in mine]),
            _mean_std([c.final_reward for c in mine]),
            _mean_std([c.entropy_variance for c in mine]),
        ])
    return rows


def _parent_key(ablation: str, base_spec: ExperimentSpec, seeds: list[int]) -> str:
    """What identifies an ablation: the experiment, not where its runs are stored."""
    experiment = base_spec.model_dump(mode="json", exclude={"checkpoint", "tracking", "sft"})
    text = f"{ablation}|{seeds}|{json.dumps(experiment, sort_keys=True)}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_ablation(
    ablation: str,
    base: str,
    seeds: list[int],
    spec_file: Path | None,
    flags: dict[str, Any],
    overrides: list[str],
    console: Console,
) -> tuple[str, list[list[str]]]:
    """Train every (variant, seed) child not yet FINISHED under the parent run for these
    exact settings, then summarize. Re-running the same command skips finished children
    and resumes unfinished ones from their last checkpoint (from step 0 if they have none)."""
    from epo_cli.checkpoint import latest_checkpoint
    from epo_cli.trainer import TrainingFinished, run_training

    variants = ablation_variants(ablation, base)
    specs = {
        (label, seed): resolve_spec(spec_file, deep_merge_all(flags, layer, {"train": {"seed": seed}}), overrides)
        for label, layer in variants
        for seed in seeds
    }
    first = next(iter(specs.values()))
    if first.tracking.backend != "mlflow":
        raise SpecError(f"tracking.backend: epo ablate needs 'mlflow' (it finds finished arms in the store), got {first.tracking.backend!r}")
    where = f"tracking: {resolve_uri(first.tracking.uri)}; checkpoints: {first.checkpoint.dir}"
    console.print(where, highlight=False, soft_wrap=True)
    key = _parent_key(ablation, resolve_spec(spec_file, deep_merge_all(flags, _algo(base)), overrides), seeds)
    parent = _find_or_create_parent(first, ablation, base, seeds, key)
    client = parent.client
    children = _children(client, parent)
    for (label, seed), spec in specs.items():
        child = children.get((label, seed))
        if child is not None and child.info.status == "FINISHED":
            console.print(f"[dim]{label} seed {seed}: finished earlier ({child.info.run_id}), skipped[/]")
            continue
        checkpoint = latest_checkpoint(Path(spec.checkpoint.dir) / child.info.run_id) if child is not None else None
        if checkpoint is not None:
            console.print(f"[bold]{ablation}[/]: {label}, seed {seed}: resuming {child.info.run_id}")
            try:
                run_training(resolve_spec(checkpoint / "spec.yaml"), console, resume_from=checkpoint)
            except TrainingFinished:  # every step was trained and saved before the stop
                client.set_terminated(child.info.run_id, "FINISHED")
            continue
        console.print(f"[bold]{ablation}[/]: {label}, seed {seed}")
        spec.tracking.run_name = f"{ablation}-{label}-s{seed}"
        tags = {"mlflow.parentRunId": parent.run_id, "epo.ablation": ablation, "epo.ablation.variant": label, "epo.seed": str(seed)}
        run_training(spec, console, tags=tags)
    finished = {key: run for key, run in _children(client, parent).items() if run.info.status == "FINISHED"}
    summaries = [summarize_child(client, finished[(label, seed)], label, seed) for label, _ in variants for seed in seeds if (label, seed) in finished]
    rows = summary_rows(summaries)
    header = ["variant", "seeds", *SUMMARY_COLUMNS]
    parent.log_text(",".join(header) + "\n" + "\n".join(",".join(r) for r in rows) + "\n", "summary.csv")
    markdown = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    parent.log_text(markdown, "summary.md")
    parent.finish("FINISHED")
    return parent.run_id, rows


def _children(client, parent: Tracker) -> dict[tuple[str, int], Any]:
    """The parent's child runs by (variant, seed); the newest where a pair repeats."""
    runs = client.search_runs(
        [parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'", order_by=["attributes.start_time ASC"]
    )
    return {(run.data.tags.get("epo.ablation.variant"), int(run.data.tags.get("epo.seed", -1))): run for run in runs}


def _find_or_create_parent(spec: ExperimentSpec, ablation: str, base: str, seeds: list[int], key: str) -> Tracker:
    client, experiment_id = connect(spec.tracking.uri, spec.tracking.experiment)
    existing = client.search_runs([experiment_id], f"tags.`epo.ablation.key` = '{key}'")
    if existing:
        return Tracker(spec.tracking.uri, spec.tracking.experiment, None, run_id=existing[0].info.run_id)
    tags = {"epo.ablation": ablation, "epo.ablation.key": key, "epo.algo": base, "epo.env": spec.env.name}
    parent = Tracker(spec.tracking.uri, spec.tracking.experiment, f"ablate-{ablation}-{base}", tags=tags)
    parent.log_params({"ablation": ablation, "base_algo": base, "env": spec.env.name, "seeds": " ".join(map(str, seeds))})
    return parent


def deep_merge_all(*layers: dict[str, Any]) -> dict[str, Any]:
    from epo_cli.spec import deep_merge

    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def print_summary(console: Console, ablation: str, parent_id: str, rows: list[list[str]]) -> None:
    table = Table(title=f"ablation {ablation} (parent run {parent_id}); mean ± std over seeds")
    for column in ("variant", "seeds", *SUMMARY_COLUMNS):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
