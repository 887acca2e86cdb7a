"""Expert trajectories from the environments' own solvers, cached as JSONL.

ALFWorld: the TextWorld planner's commands (``AlfWorldEngine(with_planner=True)``).
ScienceWorld: the engine's gold path, made by a second simulator. Both are replayed on the
engine the agent plays, and each step keeps what a prompt is rendered from (observation,
listed actions) with the expert's action: prompts are rendered at training time, so a
prompt-format change needs no regeneration.

The cache is one file per environment and split, ``<dir>/<env>/<split>.jsonl``, one
trajectory per line, rewritten atomically; games already in it are never replayed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from epo_cli.envs.base import TaskInstance, of_task_types, stratified_order
from epo_cli.envs.registry import load_split

EXPERT_SEED = 20251127  # the fixed game order: `--games N` always means the same N games
SAVE_EVERY_S = 30.0


@dataclass
class ExpertStep:
    """What the agent saw at one turn, and what the expert did."""

    observation: str
    actions: list[str]
    action: str


@dataclass
class ExpertTrajectory:
    key: str
    task_type: str
    task_description: str
    steps: list[ExpertStep] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    failure: str | None = None  # why the expert did not win (no plan, engine error, lost)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> ExpertTrajectory:
        data = json.loads(line)
        data["steps"] = [ExpertStep(**step) for step in data["steps"]]
        return cls(**data)


def expert_tasks(env: str, data_dir, split: str, task_types: list[str] | None, games: int) -> list[TaskInstance]:
    """The first ``games`` tasks of a split (of ``task_types``) in a fixed order that
    spreads task types."""
    tasks = of_task_types(load_split(env, data_dir, split), task_types, split)
    return stratified_order(tasks, lambda t: t.task_type, EXPERT_SEED)[:games]


def cache_file(expert_dir: Path | None, env: str, split: str) -> Path:
    from epo_cli.paths import cache_dir

    return Path(expert_dir or cache_dir() / "expert") / env / f"{split}.jsonl"


class ExpertCache:
    """The trajectories of one cache file, by key."""

    def __init__(self, path: Path):
        self.path = path
        self.trajectories: dict[str, ExpertTrajectory] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    trajectory = ExpertTrajectory.from_json(line)
                except (json.JSONDecodeError, TypeError, KeyError) as err:
                    raise ValueError(f"expert cache {path}, line {number}: not a trajectory ({err}); delete the file to regenerate") from None
                self.trajectories[trajectory.key] = trajectory

    def save(self) -> None:
        """Replace the file in one rename: a crash leaves the previous file intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.writelines(t.to_json() + "\n" for t in self.trajectories.values())
            os.replace(staging, self.path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise


class ExpertPlayer:
    """Plays the expert of one environment on its real engine."""

    def __init__(self, env: str, jvm_heap: str = "512m"):
        self.env = env
        self.jvm_heap = jvm_heap
        self.engine = self.gold_engine = None

    def _engines(self):
        if self.engine is None:
            if self.env == "alfworld":
                from epo_cli.envs.alfworld import AlfWorldEngine

                self.engine = AlfWorldEngine(with_planner=True)
            else:
                from epo_cli.envs.scienceworld import ScienceWorldEngine

                self.engine, self.gold_engine = ScienceWorldEngine(self.jvm_heap), ScienceWorldEngine(self.jvm_heap)
        return self.engine

    def play(self, task: TaskInstance) -> ExpertTrajectory:
        """Replay the expert's actions; a failure is recorded in the trajectory, not raised."""
        engine = self._engines()
        try:
            first = engine.reset(task)
            plan = self.gold_engine.gold_path(task) if self.gold_engine is not None else engine.plan
            trajectory = ExpertTrajectory(task.name, task.task_type, first.task_description)
            if not plan:
                trajectory.failure = "the expert has no plan for this game"
                return trajectory
            observation, actions = first.observation, first.actions
            for action in plan:
                trajectory.steps.append(ExpertStep(observation, actions, action))
                result = engine.step(action)
                observation, actions = result.observation, result.actions
                trajectory.won, trajectory.score = result.won, result.score
                if result.done:
                    break
        except Exception as err:  # an engine crash loses this game only; the engine is rebuilt
            self.close()
            return ExpertTrajectory(task.name, task.task_type, "", failure=f"{type(err).__name__}: {err}")
        if not trajectory.won:
            trajectory.failure = f"the expert's {len(trajectory.steps)} actions did not win (score {trajectory.score:g})"
        return trajectory

    def close(self) -> None:
        for engine in (self.engine, self.gold_engine):
            if engine is not None:
                engine.close()
        self.engine = self.gold_engine = None


def expert_trajectories(
    env: str,
    data_dir,
    split: str,
    task_types: list[str] | None,
    games: int,
    expert_dir: Path | None = None,
    jvm_heap: str = "512m",
    progress=None,
) -> list[ExpertTrajectory]:
    """The expert trajectories of the first ``games`` games of a split (see
    :func:`expert_tasks`), played now where the cache lacks them; failures included."""
    if env not in ("alfworld", "scienceworld"):
        raise ValueError(f"env.name: {env} has no expert; expert data comes from alfworld (planner) or scienceworld (gold path)")
    tasks = expert_tasks(env, data_dir, split, task_types, games)
    cache = ExpertCache(cache_file(expert_dir, env, split))
    missing = [task for task in tasks if task.name not in cache.trajectories]
    if missing:
        bar = progress.add_task(f"expert {env} {split}", total=len(missing), info="") if progress is not None else None
        player = ExpertPlayer(env, jvm_heap)
        saved_at = time.monotonic()
        try:
            for task in missing:
                trajectory = player.play(task)
                cache.trajectories[trajectory.key] = trajectory
                if time.monotonic() - saved_at > SAVE_EVERY_S:
                    cache.save()
                    saved_at = time.monotonic()
                if bar is not None:
                    progress.update(bar, advance=1, info=f"{len(trajectory.steps)} steps, {'won' if trajectory.won else 'failed'}")
        finally:
            player.close()
            cache.save()
    return [cache.trajectories[task.name] for task in tasks]
