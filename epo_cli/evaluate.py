"""Fixed, seeded evaluation on the IID / OOD / L2 splits, with Wilson intervals."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epo_cli.distributed import DistContext
from epo_cli.envs.base import TaskInstance, of_task_types, stratified_order
from epo_cli.envs.registry import load_split
from epo_cli.rollout import EnvBatch, RolloutSettings, Sampler, build_sampler, play_episodes

EVAL_SEED = 20250926  # fixed: the same episodes for every run, checkpoint and seed
EVAL_SPLITS = {"iid", "ood", "l2"}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def eval_tasks(env: str, data_dir, split: str, episodes: int, task_types: list[str] | None = None) -> list[TaskInstance]:
    """The first ``episodes`` tasks of the split (of ``task_types`` only, when given) in a
    fixed order that spreads task types."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"--split: unknown evaluation split {split!r}; expected one of {sorted(EVAL_SPLITS)} or all")
    tasks = stratified_order(of_task_types(load_split(env, data_dir, split), task_types, split), lambda t: t.task_type, EVAL_SEED)
    return [TaskInstance(t.env, t.task_type, t.task_id, t.variation, seed=EVAL_SEED) for t in tasks[:episodes]]


@dataclass
class EvalResult:
    split: str
    episodes: int
    successes: int
    mean_turns: float
    invalid_action_rate: float
    per_type: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)

    def metrics(self) -> dict[str, float]:
        low, high = self.interval
        prefix = f"eval/{self.split}"
        return {
            f"{prefix}/success_rate": self.success_rate,
            f"{prefix}/success_ci_low": low,
            f"{prefix}/success_ci_high": high,
            f"{prefix}/episode_turns": self.mean_turns,
            f"{prefix}/invalid_action_rate": self.invalid_action_rate,
            f"{prefix}/episodes": self.episodes,
        }


def evaluate(
    sampler: Sampler,
    tokenizer,
    envs: EnvBatch,
    tasks: list[TaskInstance],
    split: str,
    settings: RolloutSettings,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    dist: DistContext | None = None,
) -> EvalResult:
    """Play every task once, ``batch_size`` episodes at a time, with a sampler seeded by
    ``EVAL_SEED`` so that the same checkpoint always gives the same episodes (for a given
    number of processes: under torchrun each rank plays every world_size-th task)."""
    dist = dist or DistContext()
    sampler = sampler.with_generator(torch.Generator().manual_seed(EVAL_SEED + dist.rank))
    mine = tasks[dist.rank :: dist.world_size]
    played = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        played.extend(play_episodes(sampler, tokenizer, envs, chunk, list(range(len(chunk))), settings))
        if on_batch is not None:
            on_batch(len(chunk) * dist.world_size)
    episodes = [episode for part in dist.all_gather_objects(played) for episode in part]
    per_type: dict[str, tuple[int, int]] = {}
    for episode in episodes:
        wins, n = per_type.get(episode.task.task_type, (0, 0))
        per_type[episode.task.task_type] = (wins + int(episode.won), n + 1)
    turns = [turn for episode in episodes for turn in episode.turns]
    return EvalResult(
        split=split,
        episodes=len(episodes),
        successes=sum(e.won for e in episodes),
        mean_turns=len(turns) / max(len(episodes), 1),
        invalid_action_rate=sum(not t.valid for t in turns) / max(len(turns), 1),
        per_type=dict(sorted(per_type.items())),
    )


def evaluate_splits(sampler: Sampler, tokenizer, envs: EnvBatch, spec, splits, progress=None, dist: DistContext | None = None) -> list[EvalResult]:
    """The fixed evaluation episodes of each split, at the spec's eval temperature."""
    settings = RolloutSettings.from_spec(spec, temperature=spec.eval.temperature)
    batch_size = min(spec.eval.episodes, spec.rollout.generation_batch_size)
    results = []
    for split in splits:
        tasks = eval_tasks(spec.env.name, spec.env.data_dir, split, spec.eval.episodes, spec.env.task_types)
        task = progress.add_task(f"eval {split}", total=len(tasks), info="") if progress is not None else None
        advance = (lambda n, t=task: progress.update(t, advance=n)) if progress is not None else None
        results.append(evaluate(sampler, tokenizer, envs, tasks, split, settings, batch_size, advance, dist))
        if progress is not None:
            progress.remove_task(task)
    return results


def evaluate_model(spec, model_name: str, splits, progress=None, policy=None) -> list[EvalResult]:
    """The fixed evaluation episodes of ``splits`` played by a model (a name or a model
    folder: the base model, an SFT output, a checkpoint's policy) with ``spec``'s settings;
    ``policy``: the model already loaded."""
    import tempfile

    from epo_cli.envs.registry import env_batch_for
    from epo_cli.models import load_causal_lm, load_tokenizer, model_directory

    tokenizer = load_tokenizer(model_name)
    if policy is None and spec.rollout.backend == "transformers":
        policy = load_causal_lm(model_name, spec.model.dtype).eval()
    with tempfile.TemporaryDirectory(prefix="epo-eval-") as scratch:
        model_dir = model_directory(model_name, tokenizer, Path(scratch), spec.model.dtype) if policy is None else None
        sampler = build_sampler(spec, policy, tokenizer, torch.Generator(), model_dir=model_dir)
        envs = env_batch_for(spec.env, min(spec.eval.episodes, spec.rollout.generation_batch_size))
        try:
            return evaluate_splits(sampler, tokenizer, envs, spec, splits, progress)
        finally:
            sampler.close()
            envs.close()


def evaluate_checkpoint(
    checkpoint_dir: Path,
    splits: list[str],
    episodes: int | None,
    temperature: float | None,
    tracking_uri: str | None,
    progress=None,
) -> tuple[list[EvalResult], str | None, int]:
    """Evaluate a saved policy on ``splits``; log to its training run when that run is
    known. Returns (results, run id, checkpoint step)."""
    from epo_cli.checkpoint import POLICY_DIR, load_policy, read_meta
    from epo_cli.spec import resolve_spec
    from epo_cli.tracking import Tracker

    meta = read_meta(checkpoint_dir)
    overrides = []
    if episodes is not None:
        overrides.append(f"eval.episodes={episodes}")
    if temperature is not None:
        overrides.append(f"eval.temperature={temperature}")
    spec = resolve_spec(checkpoint_dir / "spec.yaml", overrides=overrides)
    policy = load_policy(checkpoint_dir, spec.model.dtype).eval() if spec.rollout.backend == "transformers" else None
    results = evaluate_model(spec, str(checkpoint_dir / POLICY_DIR), splits, progress, policy)
    run_id = meta.get("mlflow_run_id")
    if run_id:
        tracker = Tracker(tracking_uri or spec.tracking.uri, spec.tracking.experiment, None, run_id=run_id, resume=False)
        tracker.log_metrics({k: v for r in results for k, v in r.metrics().items()}, step=int(meta["step"]))
    return results, run_id, int(meta["step"])
