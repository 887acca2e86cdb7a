"""Fixed, seeded evaluation on the IID / OOD / L2 splits, with 95% intervals over games."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epo_cli.distributed import DistContext
from epo_cli.envs.base import TaskInstance, of_task_types, stratified_order
from epo_cli.envs.registry import ended_by_decoy, load_split, max_score_of
from epo_cli.stats import EpisodeOutcome, game_interval, wilson_interval
from epo_cli.rollout import EnvBatch, RolloutSettings, episode_stats, play_episodes, stats_of
from epo_cli.sampling.base import Sampler
from epo_cli.sampling.build import build_sampler, sampler_dtype

EVAL_SEED = 20250926  # fixed: the same episodes for every run, checkpoint and seed
EVAL_SPLITS = {"iid", "ood", "l2", "train"}  # train: training games, for choosing settings without the held-out splits


def eval_repeats(spec) -> int:
    """Episodes per game: ``eval.repeats``, but one under greedy decoding, where every
    repeat would be the same episode."""
    return 1 if spec.eval.temperature == 0 else spec.eval.repeats


def eval_tasks(
    env: str, data_dir, split: str, episodes: int, task_types: list[str] | None = None, repeats: int = 1
) -> list[TaskInstance]:
    """The first ``episodes`` tasks of the split (of ``task_types`` only, when given) in a
    fixed order that spreads task types, each played ``repeats`` times: the repeats are
    separate rows of the fixed-seed evaluation stream (different draws on the same task;
    identical at temperature 0), labelled by ``seed = EVAL_SEED + r`` for pairing."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"--split: unknown evaluation split {split!r}; expected one of {sorted(EVAL_SPLITS)} or all")
    tasks = stratified_order(of_task_types(load_split(env, data_dir, split), task_types, split), lambda t: t.task_type, EVAL_SEED)
    return [
        TaskInstance(t.env, t.task_type, t.task_id, t.variation, seed=EVAL_SEED + r) for t in tasks[:episodes] for r in range(repeats)
    ]


@dataclass
class EvalResult:
    split: str
    episodes: int
    successes: int
    mean_turns: float
    invalid_action_rate: float
    per_type: dict[str, tuple[int, int]] = field(default_factory=dict)
    decoy_rate: float | None = None  # share of episodes ended by the env's decoy; None: it has none
    outcomes: list[EpisodeOutcome] = field(default_factory=list)
    played: list = field(default_factory=list, repr=False)  # the episodes, for transcripts

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)

    @property
    def mean_score(self) -> float:
        return sum(o.score for o in self.outcomes) / max(len(self.outcomes), 1)

    @property
    def interval(self) -> tuple[float, float]:
        """95%, over games (:func:`game_interval`); Wilson over the episodes where no
        outcome is known per game."""
        return game_interval(self.outcomes) if self.outcomes else wilson_interval(self.successes, self.episodes)

    def metrics(self) -> dict[str, float]:
        low, high = self.interval
        prefix = f"eval/{self.split}"
        metrics = {
            f"{prefix}/success_rate": self.success_rate,
            f"{prefix}/success_ci_low": low,
            f"{prefix}/success_ci_high": high,
            f"{prefix}/episode_turns": self.mean_turns,
            f"{prefix}/invalid_action_rate": self.invalid_action_rate,
            f"{prefix}/episodes": self.episodes,
            f"{prefix}/score_mean": self.mean_score,
        }
        if self.decoy_rate is not None:
            metrics[f"{prefix}/decoy_rate"] = self.decoy_rate
        return metrics


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
    """Play every task, ``batch_size`` episodes at a time, with a sampler seeded by
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
    for number, episode in enumerate(episodes):  # numbered over the split, not per batch
        episode.episode_id = episode.group_id = number
    outcomes = [_outcome(e.task.env, e.task.name, e.task.seed, e.won, e.score, len(e.turns), e.invalid_turns, e.actions)
                for e in episodes]
    return _result(split, episode_stats(episodes), outcomes, episodes)


def logged_result(split: str, records: list[dict], source: str) -> EvalResult:
    """A split's evaluation as its episode file logged it (``episodes/eval_<split>_step_N.jsonl``):
    the figures and outcomes it had when it was played, without playing it again."""
    try:
        rows = [(r["env"], r["task_type"], r["name"], r["seed"], r["won"], r["score"], r["turns"], r["invalid_turns"], r["actions"])
                for r in records]
    except KeyError as err:
        raise LookupError(f"{source}: its episodes lack {err}, recorded since evaluation files name each episode's "
                          "env and seed; evaluate the checkpoint again (epo eval RUN_ID)") from None
    outcomes = [_outcome(env, name, seed, won, score, turns, invalid, actions)
                for env, _, name, seed, won, score, turns, invalid, actions in rows]
    stats = stats_of([(row[1], o.won, o.turns, o.invalid_turns, o.decoy) for row, o in zip(rows, outcomes, strict=True)])
    return _result(split, stats, outcomes, [])


def _outcome(env: str, name: str, seed: int, won: bool, score: float, turns: int, invalid_turns: int,
             actions: list[str | None]) -> EpisodeOutcome:
    """An episode's outcome, keyed by ``env:name`` and its score a fraction of the env's maximum."""
    return EpisodeOutcome(f"{env}:{name}", seed, bool(won), max(score, 0.0) / max_score_of(env), turns, invalid_turns,
                          ended_by_decoy(env, actions))


def _result(split: str, stats, outcomes: list[EpisodeOutcome], played: list) -> EvalResult:
    return EvalResult(split=split, episodes=stats.episodes, successes=stats.successes, mean_turns=stats.mean_turns,
                      invalid_action_rate=stats.invalid_action_rate, per_type=stats.per_type, decoy_rate=stats.decoy_rate,
                      outcomes=outcomes, played=played)


def eval_batch_size(spec) -> int:
    """Evaluation episodes played side by side."""
    return min(spec.eval.episodes * eval_repeats(spec), spec.rollout.generation_batch_size)


def evaluate_splits(sampler: Sampler, tokenizer, envs: EnvBatch, spec, splits, progress=None, dist: DistContext | None = None) -> list[EvalResult]:
    """The fixed evaluation episodes of each split, at the spec's eval temperature."""
    settings = RolloutSettings.from_spec(spec, temperature=spec.eval.temperature)
    batch_size = eval_batch_size(spec)
    results = []
    for split in splits:
        tasks = eval_tasks(spec.env.name, spec.env.data_dir, split, spec.eval.episodes, spec.env.task_types, eval_repeats(spec))
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

    from epo_cli.envs.pool import env_batch_for
    from epo_cli.models import load_causal_lm, load_tokenizer, model_directory

    tokenizer = load_tokenizer(model_name)
    if policy is None and spec.rollout.backend == "transformers":
        policy = load_causal_lm(model_name, sampler_dtype(spec)).eval()
    with tempfile.TemporaryDirectory(prefix="epo-eval-") as scratch:
        model_dir = model_directory(model_name, tokenizer, Path(scratch), spec.model.dtype) if policy is None else None
        sampler = build_sampler(spec, policy, tokenizer, torch.Generator(), model_dir=model_dir)
        envs = env_batch_for(spec, eval_batch_size(spec))
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
    repeats: int | None = None,
) -> tuple[list[EvalResult], str | None, int]:
    """Evaluate a saved policy on ``splits``; log to its training run when that run is
    known. Returns (results, run id, checkpoint step)."""
    from epo_cli.checkpoint import load_policy, policy_source, read_meta
    from epo_cli.spec import saved_spec
    from epo_cli.tracking import open_tracker

    meta = read_meta(checkpoint_dir)
    overrides = []
    if episodes is not None:
        overrides.append(f"eval.episodes={episodes}")
    if temperature is not None:
        overrides.append(f"eval.temperature={temperature}")
    if repeats is not None:
        overrides.append(f"eval.repeats={repeats}")
    spec = saved_spec(checkpoint_dir / "spec.yaml", overrides=overrides)
    transformers = spec.rollout.backend == "transformers"
    policy = load_policy(checkpoint_dir, sampler_dtype(spec), spec.train.seed).eval() if transformers else None
    results = evaluate_model(spec, str(policy_source(checkpoint_dir)), splits, progress, policy)
    run_id = meta.get("mlflow_run_id")
    if run_id:
        tracker = open_tracker(spec.tracking, run_id=run_id, resume=False, uri=tracking_uri)
        log_evaluation(tracker, results, int(meta["step"]), spec.tracking.transcripts)
    return results, run_id, int(meta["step"])


def log_evaluation(tracker, results: list[EvalResult], step: int, transcribed: int | str) -> None:
    """Each split's metrics and its episode file (``episodes/eval_<split>_step_N.jsonl``)."""
    from epo_cli.transcripts import episodes_jsonl, eval_file

    tracker.log_metrics({k: v for r in results for k, v in r.metrics().items()}, step=step)
    for result in results:
        tracker.log_text(episodes_jsonl(result.played, transcribed), eval_file(result.split, step))


