"""The paper's ablations as one MLflow parent run with a child run per (variant, seed)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from epo_cli.presets import ablation_variants, algo_layer
from epo_cli.records import RunRecord, read_records, record_of, write_record
from epo_cli.spec import ExperimentSpec, SpecError, resolve_spec, saved_spec
from epo_cli.stats import pooled_interval, t_interval, wilson_interval
from epo_cli.tracking import Tracker, connect, resolve_uri


@dataclass
class ChildSummary:
    """One finished child run: success and reward over its steps, and its last evaluation
    of each split as (wins, episodes) (none when it was never evaluated)."""

    variant: str
    seed: int
    run_id: str
    best_success: float
    final_success: float
    final_reward: float
    entropy_variance: float
    final_eval: dict[str, tuple[int, int]] = field(default_factory=dict)
    final_outcomes: dict[str, list] = field(default_factory=dict)  # split -> EpisodeOutcome of that evaluation
    token_variance_slope: float = float("nan")  # per 100 steps, of actor/entropy_var (nan: not logged)


def slope_per_100_steps(values: list[float]) -> float:
    """The least-squares slope of ``values`` (one per step) times 100; nan under two values."""
    if len(values) < 2:
        return float("nan")
    return 100 * statistics.linear_regression(range(len(values)), values).slope


def summarize(record: RunRecord) -> ChildSummary:
    """Succ.* (best over training) and Succ. (last) from IID evaluation when the run has
    it, else from training success; the variance of the mean entropy across steps, and the
    trend of the token-entropy variance within each step."""
    success = record.history("eval/iid/success_rate") or record.history("train/success_rate")
    entropy = record.history("actor/entropy")
    reward = record.history("train/reward_mean")
    final_eval = {}
    for split in ("iid", "ood"):
        if episodes := int(record.last(f"eval/{split}/episodes") or 0):  # the last evaluation's values, logged together
            final_eval[split] = (round(record.last(f"eval/{split}/success_rate") * episodes), episodes)
    return ChildSummary(
        variant=record.variant,
        seed=record.seed,
        run_id=record.run_id,
        best_success=max(success, default=float("nan")),
        final_success=success[-1] if success else float("nan"),
        final_reward=reward[-1] if reward else float("nan"),
        entropy_variance=statistics.pvariance(entropy) if len(entropy) > 1 else 0.0,
        token_variance_slope=slope_per_100_steps(record.history("actor/entropy_var")),
        final_eval=final_eval,
        final_outcomes={split: outcomes for split, outcomes in record.outcomes.items() if split in final_eval and outcomes},
    )


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _mean_t_interval(values: list[float]) -> str:
    """The mean over seeds with a 95% Student-t interval across seeds, clipped to [0, 1]
    (one seed: its value)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean, low, high = t_interval(values)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _pooled(children: list[ChildSummary], split: str) -> str:
    """The final evaluations of ``split`` of all seeds pooled: wins / episodes and a 95%
    interval that resamples seeds and games (:func:`pooled_interval`); the Wilson interval
    of the episodes where some run's outcomes per episode are not known."""
    evaluated = [c for c in children if split in c.final_eval]
    wins, episodes = sum(c.final_eval[split][0] for c in evaluated), sum(c.final_eval[split][1] for c in evaluated)
    if not episodes:
        return "-"
    if all(split in c.final_outcomes for c in evaluated):
        low, high = pooled_interval([c.final_outcomes[split] for c in evaluated])
    else:
        low, high = wilson_interval(wins, episodes)
    return f"{wins}/{episodes} = {wins / episodes:.3f} [{low:.3f}, {high:.3f}]"


def _final_ood(children: list[ChildSummary]) -> str:
    rates = [wins / episodes for wins, episodes in (c.final_eval["ood"] for c in children if "ood" in c.final_eval)]
    return _mean_t_interval(rates) if rates else "-"


def _trend(slopes: list[float]) -> str:
    """The mean slope over seeds with its 95% t interval (one seed: its slope)."""
    known = [s for s in slopes if not math.isnan(s)]
    if not known:
        return "-"
    mean, low, high = t_interval(known, clip=False)
    return f"{mean:+.3g}" if len(known) == 1 else f"{mean:+.3g} [{low:+.3g}, {high:+.3g}]"


def _on_decoy(children: list[ChildSummary]) -> str:
    """Seeds that ended on the env's decoy: more than half of their last held-out evaluation's
    episodes (IID and OOD together) ended by it; '-' where the env has no decoy or no run
    logged per-episode outcomes."""
    finals = [[o for outcomes in c.final_outcomes.values() for o in outcomes] for c in children]
    finals = [episodes for episodes in finals if episodes and all(o.decoy is not None for o in episodes)]
    if not finals:
        return "-"
    return f"{sum(2 * sum(o.decoy for o in episodes) > len(episodes) for episodes in finals)}/{len(finals)}"


SUMMARY_COLUMNS = ("best success", "final success [95% t]", "IID pooled [95%]", "OOD final [95% t]",
                   "OOD pooled [95%]", "final reward", "entropy var.", "H var. trend", "on decoy")
SUMMARY_CAPTION = ("best (Succ.*) / final (Succ.) success: of the IID evaluations where the runs have them, else of "
                   "training; [95% t]: Student-t interval of the mean over seeds, clipped to [0, 1]; IID / OOD pooled: "
                   "every seed's last evaluation of the split, wins / episodes, with a bootstrap over seeds and games (Wilson over "
                   "episodes for runs logged without per-episode outcomes); entropy var.: variance of the step entropy "
                   "over training; H var. trend: the least-squares slope per 100 steps of the variance of each step's "
                   "decision-token entropies (actor/entropy_var); on decoy: the seeds whose last evaluation ended more than half its episodes by the env's "
                   "decoy (decoy-chain); the other columns are mean ± std over seeds")


def summary_rows(children: list[ChildSummary], diverged: Counter | None = None,
                 variants: list[str] | None = None) -> list[list[str]]:
    """One row per variant (in the order of ``variants``, default: as they come); ``seeds``
    counts its finished runs and, where some diverged, says how many (their runs have no
    final values)."""
    diverged = diverged or Counter()
    rows = []
    for variant in variants or dict.fromkeys([*(c.variant for c in children), *diverged]):
        mine = [c for c in children if c.variant == variant]
        if not mine:
            rows.append([variant, f"0 (+{diverged[variant]} diverged)"] + ["-"] * len(SUMMARY_COLUMNS))
            continue
        rows.append([
            variant,
            str(len(mine)) + (f" (+{diverged[variant]} diverged)" if diverged[variant] else ""),
            _mean_std([c.best_success for c in mine]),
            _mean_t_interval([c.final_success for c in mine]),
            _pooled(mine, "iid"),
            _final_ood(mine),
            _pooled(mine, "ood"),
            _mean_std([c.final_reward for c in mine]),
            _mean_std([c.entropy_variance for c in mine]),
            _trend([c.token_variance_slope for c in mine]),
            _on_decoy(mine),
        ])
    return rows


def _experiment_json(spec: ExperimentSpec) -> str:
    """What a parent run's key is made of: the experiment, not where its runs are stored;
    fields at their defaults are left out, so a field added to the toolkit later does not
    change the key of an experiment that leaves it unset."""
    return json.dumps(spec.model_dump(mode="json", exclude={"checkpoint", "tracking", "sft"}, exclude_defaults=True),
                      sort_keys=True)


def _key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class Parent:
    """The parent run of an ablation or a sweep: its name (the ``epo.ablation`` tag), run
    name, identity key, extra tags and params."""

    name: str
    run_name: str
    key: str
    tags: dict[str, str]
    params: dict[str, str]


def run_ablation(
    ablation: str,
    base: str,
    seeds: list[int],
    spec_file: Path | None,
    flags: dict[str, Any],
    overrides: list[str],
    console: Console,
    records_dir: Path | None = None,
) -> tuple[str, list[list[str]]]:
    """One of the paper's ablations of ``base`` (ppo or grpo) over ``seeds``: see :func:`run_children`."""
    variants = ablation_variants(ablation, base)
    specs = {
        (label, seed): resolve_spec(spec_file, deep_merge_all(flags, layer, {"train": {"seed": seed}}), overrides)
        for label, layer in variants
        for seed in seeds
    }
    base_spec = resolve_spec(spec_file, deep_merge_all(flags, algo_layer(base)), overrides)
    key = _key(f"{ablation}|{seeds}|{_experiment_json(base_spec)}")
    params = {"ablation": ablation, "base_algo": base, "seeds": " ".join(map(str, seeds))}
    parent = Parent(ablation, f"ablate-{ablation}-{base}", key, {"epo.algo": base}, params)
    return run_children(parent, specs, console, records_dir)


def run_sweep(sweep_file: Path, flags: dict[str, Any], overrides: list[str], console: Console,
              records_dir: Path | None = None) -> tuple[str, list[list[str]]]:
    """The arms of a sweep file (:mod:`epo_cli.sweep`) over its seeds: see :func:`run_children`."""
    from epo_cli.sweep import load_sweep, sweep_seeds, sweep_specs

    sweep = load_sweep(sweep_file)
    specs = sweep_specs(sweep, flags, overrides)
    for arm in sweep.arms:
        if arm.note:
            console.print(f"[dim]{arm.name}: {arm.note}[/]")
    key = _key("|".join([f"sweep {sweep.name}"] + [f"{arm}:{seed}:{_experiment_json(s)}" for (arm, seed), s in specs.items()]))
    params = {"sweep": sweep.name, "arms": " ".join(a.name for a in sweep.arms), "seeds": " ".join(map(str, sweep_seeds(sweep)))}
    parent = Parent(sweep.name, f"sweep-{sweep.name}", key, {"epo.sweep": sweep_file.name}, params)
    return run_children(parent, specs, console, records_dir)


def run_children(parent_info: Parent, specs: dict[tuple[str, int], ExperimentSpec], console: Console,
                 records_dir: Path | None = None) -> tuple[str, list[list[str]]]:
    """Train every (variant, seed) child not yet FINISHED under the parent run for these
    exact settings, then summarize. Re-running the same command skips finished children
    and resumes unfinished ones from their last checkpoint (from step 0 if they have none);
    a child whose gradients diverge is counted as such and the others go on. One progress
    bar counts the RL steps of all children.

    ``records_dir`` (:mod:`epo_cli.records`): children recorded there with the same settings
    are not trained again and join the summary; every child finished in the store is
    recorded there."""
    from epo_cli.checkpoint import latest_checkpoint
    from epo_cli.progress import OverallProgress
    from epo_cli.trainer import TrainingDiverged, TrainingFinished, run_training

    first = next(iter(specs.values()))
    if first.tracking.backend != "mlflow":
        raise SpecError(f"tracking.backend: epo ablate needs 'mlflow' (it finds finished arms in the store), got {first.tracking.backend!r}")
    where = f"tracking: {resolve_uri(first.tracking.uri)}; checkpoints: {first.checkpoint.dir}"
    console.print(where, highlight=False, soft_wrap=True)
    recorded = _matching_records(records_dir, specs, console) if records_dir is not None else {}
    parent = _find_or_create_parent(first, parent_info)
    client = parent.client
    children = _children(client, parent)
    checkpoints = {
        pair: latest_checkpoint(Path(specs[pair].checkpoint.dir) / run.info.run_id)
        for pair, run in children.items() if pair in specs and pair not in recorded and run.info.status != "FINISHED"
    }
    done_steps = {
        pair: spec.train.steps if pair in recorded else _steps_done(children.get(pair), checkpoints.get(pair), spec)
        for pair, spec in specs.items()
    }
    total_steps = sum(s.train.steps for s in specs.values())
    for (label, seed), spec in specs.items():
        child = children.get((label, seed))
        before = sum(steps for pair, steps in done_steps.items() if pair != (label, seed))
        overall = OverallProgress(f"{parent_info.name}: all runs", total_steps, before)
        if (label, seed) in recorded:
            console.print(f"[dim]{label} seed {seed}: recorded in {records_dir / recorded[label, seed].file_name}, skipped[/]",
                          soft_wrap=True)
            continue
        if child is not None and child.info.status == "FINISHED":
            console.print(f"[dim]{label} seed {seed}: finished earlier ({child.info.run_id}), skipped[/]")
            continue
        if child is not None and _diverged(child):
            console.print(f"[dim]{label} seed {seed}: diverged earlier ({child.info.run_id}), skipped[/]")
            continue
        checkpoint = checkpoints.get((label, seed))
        try:
            if checkpoint is not None:
                console.print(f"[bold]{parent_info.name}[/]: {label}, seed {seed}: resuming {child.info.run_id}")
                try:
                    run_training(saved_spec(checkpoint / "spec.yaml"), console, resume_from=checkpoint, overall=overall)
                except TrainingFinished:  # every step was trained and saved before the stop
                    client.set_terminated(child.info.run_id, "FINISHED")
            else:
                console.print(f"[bold]{parent_info.name}[/]: {label}, seed {seed}")
                spec.tracking.run_name = f"{parent_info.name}-{label}-s{seed}"
                tags = {"mlflow.parentRunId": parent.run_id, "epo.ablation": parent_info.name,
                        "epo.ablation.variant": label, "epo.seed": str(seed)}
                run_training(spec, console, tags=tags, overall=overall)
        except TrainingDiverged as err:  # an outcome of the arm, reported in the summary; the others go on
            client.set_tag(err.run_id, DIVERGED_TAG, "true")
            client.set_terminated(err.run_id, "FAILED")
            console.print(f"[yellow]{label} seed {seed}: {err}; counted as diverged, the sweep goes on[/]")
        done_steps[(label, seed)] = spec.train.steps
        if records_dir is not None:  # at once: a sweep stopped later keeps this child's record
            finished = _store_records(client, parent, {(label, seed): spec}, recorded, parent_info.name)
            _write_records(records_dir, finished)
            recorded = {**recorded, **finished}  # written: not read from the store or written again below
    stored = _store_records(client, parent, specs, recorded, parent_info.name)  # children finished in earlier calls
    records = {**recorded, **stored}
    if records_dir is not None:
        _write_records(records_dir, stored)
        console.print(f"run records: {records_dir} ({len(records)} of {len(specs)} children)", highlight=False, soft_wrap=True)
    rows = _log_summary(parent, specs, records)
    parent.finish("FINISHED")
    return parent.run_id, rows


def _store_records(client, parent: Tracker, specs: dict, recorded: dict, study: str) -> dict[tuple[str, int], RunRecord]:
    """The records of the parent's children in the store that finished or diverged (not
    those taken from a records folder)."""
    return {
        pair: record_of(client, run, study, *pair, experiment_key(specs[pair]), _diverged(run))
        for pair, run in _children(client, parent).items()
        if pair in specs and pair not in recorded and (run.info.status == "FINISHED" or _diverged(run))
    }


def _write_records(records_dir: Path, records: dict[tuple[str, int], RunRecord]) -> None:
    for record in records.values():
        write_record(records_dir, record)


def _log_summary(parent: Tracker, specs: dict, records: dict[tuple[str, int], RunRecord]) -> list[list[str]]:
    """The summary rows of the children's records, logged to the parent as CSV and markdown."""
    summaries = [summarize(records[pair]) for pair in specs if pair in records and not records[pair].diverged]
    diverged = Counter(label for (label, _), record in records.items() if record.diverged)
    rows = summary_rows(summaries, diverged, list(dict.fromkeys(label for label, _ in specs)))
    header = ["variant", "seeds", *SUMMARY_COLUMNS]
    table = io.StringIO()
    csv.writer(table).writerows([header, *rows])  # cells such as "0.5 [0.38, 0.62]" hold commas
    parent.log_text(table.getvalue(), "summary.csv")
    markdown = ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                + "\n".join("| " + " | ".join(r) + " |" for r in rows) + f"\n\n{SUMMARY_CAPTION}.\n")
    parent.log_text(markdown, "summary.md")
    return rows


def experiment_key(spec: ExperimentSpec) -> str:
    """The identity of one child's settings (its seed included), kept in its run record."""
    return _key(_experiment_json(spec))


def _matching_records(records_dir: Path, specs: dict[tuple[str, int], ExperimentSpec], console: Console) -> dict:
    """The records of ``records_dir`` that are children of ``specs``: same arm, seed and
    settings; one that names an arm and seed of it with other settings is said and left out."""
    matching = {}
    for record in read_records(records_dir):
        pair = (record.variant, record.seed)
        if pair not in specs:
            continue
        if record.experiment_key != experiment_key(specs[pair]):
            console.print(f"[yellow]{records_dir / record.file_name}: {record.variant} seed {record.seed} was run with "
                          "other settings than this sweep's; not used (it is rewritten when this child finishes)[/]",
                          soft_wrap=True)
            continue
        matching[pair] = record
    return matching


DIVERGED_TAG = "epo.diverged"  # a child stopped by non-finite gradients: skipped on re-runs, counted in the summary


def _diverged(run) -> bool:
    return run.data.tags.get(DIVERGED_TAG) == "true"


def _steps_done(child, checkpoint: Path | None, spec: ExperimentSpec) -> int:
    """RL steps a child has behind it: all of a finished or diverged one, a checkpoint's, else none."""
    from epo_cli.checkpoint import read_meta

    if child is not None and (child.info.status == "FINISHED" or _diverged(child)):
        return spec.train.steps
    if checkpoint is None:
        return 0
    return read_meta(checkpoint)["step"]


def _children(client, parent: Tracker) -> dict[tuple[str, int], Any]:
    """The parent's child runs by (variant, seed); the newest where a pair repeats."""
    runs = client.search_runs(
        [parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'", order_by=["attributes.start_time ASC"]
    )
    return {(run.data.tags.get("epo.ablation.variant"), int(run.data.tags.get("epo.seed", -1))): run for run in runs}


def _find_or_create_parent(spec: ExperimentSpec, info: Parent) -> Tracker:
    client, experiment_id = connect(spec.tracking.uri, spec.tracking.experiment)
    existing = client.search_runs([experiment_id], f"tags.`epo.ablation.key` = '{info.key}'")
    if existing:
        return Tracker(spec.tracking.uri, spec.tracking.experiment, None, run_id=existing[0].info.run_id)
    tags = {"epo.ablation": info.name, "epo.ablation.key": info.key, "epo.env": spec.env.name, **info.tags}
    parent = Tracker(spec.tracking.uri, spec.tracking.experiment, info.run_name, tags=tags)
    parent.log_params({**info.params, "env": spec.env.name})
    return parent


def deep_merge_all(*layers: dict[str, Any]) -> dict[str, Any]:
    from epo_cli.spec import deep_merge

    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def print_summary(console: Console, title: str, parent_id: str, rows: list[list[str]]) -> None:
    """The summary in two tables, success then entropy and decoy (each with the variant and
    seeds columns); on a narrow terminal their cells wrap between words, never inside one."""
    columns = ("variant", "seeds", *SUMMARY_COLUMNS)
    split = 2 + SUMMARY_COLUMNS.index("entropy var.")
    for part, caption in ((range(split), f"{title} (parent run {parent_id})"), (range(split, len(columns)), None)):
        indices = [0, 1, *(i for i in part if i > 1)]
        table = Table(title=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for index in indices:
            words = [word for text in (columns[index], *(row[index] for row in rows)) for word in text.split()]
            table.add_column(columns[index], justify="left" if index == 0 else "right", min_width=max(map(len, words)))
        for row in rows:
            table.add_row(*(row[i] for i in indices))
        console.print(table)
    console.print(SUMMARY_CAPTION, style="dim", highlight=False)
