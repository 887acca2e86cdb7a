"""A built-in word game that proves the training loop learns, in seconds on a CPU.

Each turn the observation names a target among ``len(WORDS)`` action words; answering
with it is right. ``toy`` is one turn (reward 1 for the right word: chance 0.25).
``toy-multiturn`` plays 3-5 turns and pays only at the end: the episode's score is the
fraction of right answers (chance 0.25) and a win is every answer right, so credit must
flow back through the whole trajectory. Policies start at chance and should reach the
target word nearly always within tens of RL steps (tests/test_toy.py).

Splits: ``train`` and ``iid`` draw targets from ``WORDS``; ``ood`` uses ``OOD_WORDS``,
words the policy never answered in training (a policy that copies the target generalizes,
one that memorized the train words does not).
"""

from __future__ import annotations

import random
from pathlib import Path

from epo_cli.envs.base import EnvStep, TaskInstance

WORDS = ("red", "green", "blue", "gold")
OOD_WORDS = ("pink", "black", "white", "gray")
TASK_DESCRIPTION = "Each turn, answer with the target word that the observation names."
SPLIT_SIZES = {"train": 4096, "iid": 256, "ood": 256}
SPLITS = tuple(SPLIT_SIZES)
MULTITURN_LENGTHS = (3, 4, 5)


def episode_plan(env: str, task: TaskInstance) -> list[str]:
    """The target word of every turn of a task, fixed by its id (split and index)."""
    words = OOD_WORDS if task.task_type.endswith("ood") else WORDS
    rng = random.Random(str(task.task_id))
    turns = rng.choice(MULTITURN_LENGTHS) if env == "toy-multiturn" else 1
    return [rng.choice(words) for _ in range(turns)]


def load_split(env: str, data_dir: Path | None, split: str) -> list[TaskInstance]:
    if split not in SPLIT_SIZES:
        raise ValueError(f"env.train_split / --split: unknown {env} split {split!r}; expected one of {list(SPLITS)}")
    task_type = f"{env}-ood" if split == "ood" else env
    return [TaskInstance(env, task_type, f"{split}-{i}", i) for i in range(SPLIT_SIZES[split])]


TARGET_REPEATS = 16


def observation_for(target: str) -> str:
    """The target, repeated: a random 2-layer model reads it by plain attention averaging,
    so the toy checks the RL machinery rather than a model's ability to retrieve a word."""
    return "The target word is: " + " ".join([target] * TARGET_REPEATS) + "."


class ToyEngine:
    """Plays one toy episode at a time (see the module docstring)."""

    def __init__(self, env: str = "toy"):
        self.env = env
        self.targets: list[str] = []
        self.words: tuple[str, ...] = WORDS
        self.turn = 0
        self.right = 0

    def reset(self, task: TaskInstance) -> EnvStep:
        self.targets = episode_plan(self.env, task)
        self.words = OOD_WORDS if task.task_type.endswith("ood") else WORDS
        self.turn = self.right = 0
        return EnvStep(observation_for(self.targets[0]), actions=list(self.words), task_description=TASK_DESCRIPTION)

    def step(self, action: str) -> EnvStep:
        accepted = action in self.words
        self.right += action == self.targets[self.turn]
        self.turn += 1
        done = self.turn == len(self.targets)
        score = self.right / len(self.targets)
        observation = "The game is over." if done else observation_for(self.targets[self.turn])
        return EnvStep(
            observation, done=done, won=done and self.right == len(self.targets), score=score,
            actions=list(self.words), accepted=accepted,
        )

    def close(self) -> None:
        """Nothing to release."""


def make_engine(env: str, options: dict) -> ToyEngine:
    return ToyEngine(env)


def task_types(env: str) -> tuple[str, ...]:
    return (env, f"{env}-ood")


def task_name(task: TaskInstance) -> str:
    return str(task.task_id)
