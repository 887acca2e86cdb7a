"""A testbed for the exploration-exploitation cascade (arXiv 2509.22576, Section 4), at
the toy's cost: a chain of ``env.max_turns`` word turns with a decoy exit.

Each turn the observation names a target among the toy's four action words; answering with
it is right. Every turn also offers ``stop``, the decoy: it ends the episode at once with a
small sure score (``env.options.sure_reward``). Otherwise the episode runs all
``env.max_turns`` turns and its score, paid only at the end, is the fraction of turns
answered right; a win is every turn right (score 1). A policy that answers at chance earns
about 1/4, less than a sure reward above that, so a policy that stops exploring early
settles on ``stop``, while the target word in every observation keeps the optimum
learnable. Splits as the toy's: ``ood`` names words never seen in training.
"""

from __future__ import annotations

import random

from epo_cli.envs.base import EnvStep, TaskInstance
from epo_cli.envs.registry import env_info
from epo_cli.envs.toy import OOD_WORDS, SPLITS, WORDS, load_split, observation_for, task_name, task_types

# The registry's functions of this environment: its splits, task types and names are the toy's.
__all__ = ["SPLITS", "load_split", "make_engine", "task_name", "task_types", "DecoyChainEngine", "episode_plan"]

DECOY = env_info("decoy-chain").decoy
TASK_DESCRIPTION = (f"Each turn, answer with the target word that the observation names, or answer {DECOY} to end "
                    "the game at once for a small sure reward.")


def episode_plan(task: TaskInstance, turns: int) -> list[str]:
    """The target word of each of ``turns`` turns, fixed by the task's id."""
    words = OOD_WORDS if task.task_type.endswith("ood") else WORDS
    rng = random.Random(f"decoy-chain:{task.task_id}")
    return [rng.choice(words) for _ in range(turns)]


class DecoyChainEngine:
    """Plays one episode at a time (see the module docstring)."""

    def __init__(self, turns: int, sure_reward: float):
        if not 0 <= sure_reward < 1:
            raise ValueError(f"env.options.sure_reward: expected a score in [0, 1), got {sure_reward}")
        self.turns, self.sure_reward = turns, sure_reward
        self.targets: list[str] = []
        self.actions: list[str] = []
        self.turn = self.right = 0

    def reset(self, task: TaskInstance) -> EnvStep:
        self.targets = episode_plan(task, self.turns)
        self.actions = [*(OOD_WORDS if task.task_type.endswith("ood") else WORDS), DECOY]
        self.turn = self.right = 0
        return EnvStep(self._observation(), actions=list(self.actions), task_description=TASK_DESCRIPTION)

    def step(self, action: str) -> EnvStep:
        if action == DECOY:
            return EnvStep("You stopped: the game is over.", done=True, score=self.sure_reward, actions=list(self.actions))
        self.right += action == self.targets[self.turn]
        self.turn += 1
        done = self.turn == self.turns
        return EnvStep(
            "The game is over." if done else self._observation(), done=done, won=done and self.right == self.turns,
            score=self.right / self.turns, actions=list(self.actions), accepted=action in self.actions,
        )

    def _observation(self) -> str:
        return f"{observation_for(self.targets[self.turn])} Or answer {DECOY} to end the game now."

    def close(self) -> None:
        """Nothing to release."""


def make_engine(env: str, options: dict) -> DecoyChainEngine:
    """``options``: ``max_turns`` (the chain's length) and ``sure_reward`` (envs/registry.py's defaults)."""
    return DecoyChainEngine(options["max_turns"], options["sure_reward"])

