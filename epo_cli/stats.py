"""The statistics of evaluations, pure Python (no torch, no model): an episode's outcome,
intervals over games (Wilson, cluster bootstrap, pooled over seeds), Student-t over seeds,
the paired comparison of two stages (exact sign test, bootstrap over tasks), and the
outcome files of ``epo eval --save`` that anyone can recompute every paired table from."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class EpisodeOutcome:
    """One evaluation episode, as saved by ``epo eval --save`` and paired by ``--compare``."""

    task: str  # the task's key, independent of seed and data location
    seed: int  # which repeat of the task
    won: bool
    score: float  # the final score as a fraction of the maximum (ScienceWorld: of 100)
    turns: int
    invalid_turns: int
    decoy: bool | None = None  # ended by the env's decoy (envs/registry.py); None: the env has none


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _wins_by_game(outcomes: list[EpisodeOutcome]) -> dict[str, list[float]]:
    """Each game's episodes as 1.0 (won) or 0.0, in order."""
    by_game: dict[str, list[float]] = {}
    for o in outcomes:
        by_game.setdefault(o.task, []).append(float(o.won))
    return by_game


def game_interval(outcomes: list[EpisodeOutcome], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the success rate over ``outcomes`` that counts games, not episodes:
    the repeats of a game (and, pooled over seeds, its episodes under each seed) are not
    independent, so a percentile bootstrap resamples whole games (a cluster bootstrap).
    Where every game was played once, it is the Wilson interval of the episodes."""
    games = list(_wins_by_game(outcomes).values())
    if all(len(g) == 1 for g in games):
        return wilson_interval(sum(g[0] for g in games), len(games))
    rng = random.Random(seed)
    rates = sorted(
        sum(map(sum, drawn)) / sum(map(len, drawn)) for drawn in ([rng.choice(games) for _ in games] for _ in range(resamples))
    )
    return rates[int(0.025 * resamples)], rates[int(0.975 * resamples) - 1]


def pooled_interval(runs: list[list[EpisodeOutcome]], resamples: int = 4_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the success rate of several runs' evaluations (seeds) pooled: a
    percentile bootstrap that resamples seeds and games together (each draw: seeds with
    replacement, games with replacement, the same games under every drawn seed), so that
    neither a game's repeats nor its episodes under several seeds count as independent.
    One run: :func:`game_interval`."""
    if len(runs) == 1:
        return game_interval(runs[0])
    tables = [_wins_by_game(outcomes) for outcomes in runs]
    games = sorted({game for table in tables for game in table})
    rng = random.Random(seed)
    rates = []
    for _ in range(resamples):
        drawn_games = [rng.choice(games) for _ in games]
        values = [v for table in (rng.choice(tables) for _ in tables) for g in drawn_games for v in table.get(g, ())]
        rates.append(sum(values) / max(len(values), 1))
    rates.sort()
    return rates[int(0.025 * resamples)], rates[int(0.975 * resamples) - 1]


def t_interval(values: list[float], clip: bool = True) -> tuple[float, float, float]:
    """The mean of ``values`` (one per seed) and its 95% Student-t interval across them,
    clipped to [0, 1] (a rate; ``clip=False``: any quantity); with one value, that value three times."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, mean, mean
    from scipy.stats import t

    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
    return (mean, max(mean - half, 0.0), min(mean + half, 1.0)) if clip else (mean, mean - half, mean + half)


@dataclass
class PairedComparison:
    """Success (or mean score) of two stages on the same episodes (task and seed)."""

    pairs: int
    before: float
    after: float
    tasks_better: int  # tasks won more often (or scored higher in sum) after than before
    tasks_worse: int
    sign_test_p: float  # exact, over tasks (= McNemar with one episode per task)
    bootstrap_interval: tuple[float, float]  # 95% CI of after - before, resampling tasks

    @property
    def difference(self) -> float:
        return self.after - self.before


def sign_test_p(worse: int, better: int) -> float:
    """Two-sided exact sign test (binomial at 1/2 over the pairs that differ); with one
    episode per task it is the exact McNemar test."""
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(worse, better) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_paired(
    before: list[EpisodeOutcome],
    after: list[EpisodeOutcome],
    metric: Literal["success", "score"] = "success",
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Pair episodes by (task, seed). Repeats of one task are not independent, so the
    tests work over tasks: an exact sign test on whether each task was won more often
    (``metric="score"``: scored higher in sum) after or before, and a bootstrap interval
    of the difference in success rate (or mean score) that resamples whole tasks."""
    def value(o: EpisodeOutcome) -> float:
        return float(o.won) if metric == "success" else o.score

    first = {(o.task, o.seed): value(o) for o in before}
    second = {(o.task, o.seed): value(o) for o in after}
    keys = sorted(first.keys() & second.keys())
    if not keys:
        raise ValueError("no episode in common: compare evaluations of the same split, episodes and repeats")
    by_task: dict[str, list[tuple[bool, bool]]] = {}
    for key in keys:
        by_task.setdefault(key[0], []).append((first[key], second[key]))
    tasks = list(by_task.values())
    rng = random.Random(seed)
    differences = []
    for _ in range(resamples):
        drawn = [pair for _ in tasks for pair in rng.choice(tasks)]
        differences.append(sum(b - a for a, b in drawn) / len(drawn))
    differences.sort()
    task_change = [sum(b - a for a, b in pairs) for pairs in tasks]
    better, worse = sum(d > 1e-9 for d in task_change), sum(d < -1e-9 for d in task_change)
    return PairedComparison(
        pairs=len(keys),
        before=sum(first[k] for k in keys) / len(keys),
        after=sum(second[k] for k in keys) / len(keys),
        tasks_better=better,
        tasks_worse=worse,
        sign_test_p=sign_test_p(worse, better),
        bootstrap_interval=(differences[int(0.025 * resamples)], differences[int(0.975 * resamples) - 1]),
    )


def write_outcomes(path: Path, title: str, results) -> None:
    """Every episode's outcome of ``results``, by split, as JSON (``epo eval --save``), atomically."""
    from epo_cli.paths import write_atomically

    payload = {"title": title, "splits": {r.split: [dataclasses.asdict(o) for o in r.outcomes] for r in results}}
    write_atomically(path, json.dumps(payload, indent=1))


def read_outcomes(path: Path, option: str) -> dict:
    """A :func:`write_outcomes` file as {split: [EpisodeOutcome]}; ``option`` names the flag in the error."""
    try:
        payload = json.loads(path.read_text())
        return {split: [EpisodeOutcome(**o) for o in rows] for split, rows in payload["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{option} {path}: not a file written by `epo eval --save` ({err.__class__.__name__}: {err})") from None
