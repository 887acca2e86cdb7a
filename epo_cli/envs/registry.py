"""Every environment in one table: name -> :class:`EnvInfo`. Adding an environment is one
module (the functions :class:`EnvInfo` names) and one entry here. The table imports no
environment: a module is loaded when one of its functions is first asked for (batches of
engines: ``epo_cli.envs.pool``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EnvInfo:
    """One environment. ``module`` (``epo_cli.envs.NAME``) holds ``SPLITS`` (the split
    names), ``load_split(env, data_dir, split)``, ``make_engine(env, options)``,
    ``task_types(env)``, ``task_name(task)`` and, with ``needs_data``, ``find_data(configured)``."""

    module: str
    title: str  # how prompts name it
    max_score: float = 1.0  # the score of a perfect episode (algo.reward: score divides by it)
    needs_data: bool = False  # its games live in a data folder (env.data_dir)
    options: dict[str, Any] = field(default_factory=dict)  # env.options its engines take, with their defaults
    presets: dict[str, Any] = field(default_factory=dict)  # the paper's settings, over the algorithm's
    # One size at every scale (applied over the scale's): a built-in game's model and budget.
    fixed_size: dict[str, Any] = field(default_factory=dict)
    fixed_size_grpo: dict[str, Any] = field(default_factory=dict)  # and over that, for group-based runs
    # An action that ends the episode at once for a small sure score (a testbed's flawed
    # strategy): runs log the share of episodes it ended (train/decoy_rate, eval/SPLIT/decoy_rate).
    decoy: str | None = None


# The toy word game has one size at every scale: seconds per step with the tiny random
# model, constrained to the action words so that the reward signal exists from step 0.
TOY_SIZE: dict[str, Any] = {
    "model": {"name": "tiny", "critic": "shared", "autocast": "none"},
    "env": {"workers": 0},
    "train": {"steps": 40},
    "rollout": {
        "constrain": "admissible",
        "tasks_per_step": 32,
        "max_prompt_tokens": 512,
        "max_response_tokens": 24,
        "generation_batch_size": 64,
        "dtype": None,  # sampled by the policy itself: sampler and trainer log-probs agree exactly
    },
    "optim": {"lr": 2e-3, "critic_lr": 2e-3, "warmup_ratio": 0.0, "mini_batch_size": 256, "micro_batch_size": 64},
    "algo": {"invalid_action_penalty": 0.0, "tis_cap": None},
    "eval": {"every": 0, "episodes": 64},
}
TOY_SIZE_GRPO: dict[str, Any] = {"rollout": {"tasks_per_step": 8, "group_size": 4}}

ENVS: dict[str, EnvInfo] = {
    "scienceworld": EnvInfo(
        "epo_cli.envs.scienceworld", "ScienceWorld", max_score=100.0,
        presets={"env": {"max_turns": 30}, "train": {"steps": 125}, "epo": {"smoothing": {"alpha": 0.05}}},
    ),
    "alfworld": EnvInfo(
        "epo_cli.envs.alfworld", "ALFWorld", needs_data=True,
        presets={
            "env": {"max_turns": 50},
            "train": {"steps": 150},
            "optim": {"lr": 5e-6, "mini_batch_size": 256, "micro_batch_size": 32},
            "epo": {"smoothing": {"alpha": 0.1}},
        },
    ),
    "toy": EnvInfo(
        "epo_cli.envs.toy", "a word game", fixed_size={**TOY_SIZE, "env": {**TOY_SIZE["env"], "max_turns": 1}},
        fixed_size_grpo=TOY_SIZE_GRPO,
    ),
    "toy-multiturn": EnvInfo(
        "epo_cli.envs.toy", "a word game",
        fixed_size={**TOY_SIZE, "env": {**TOY_SIZE["env"], "max_turns": 5}, "algo": {**TOY_SIZE["algo"], "reward": "score"}},
        fixed_size_grpo=TOY_SIZE_GRPO,
    ),
    "decoy-chain": EnvInfo(
        "epo_cli.envs.decoy_chain", "a word game with a decoy exit", options={"sure_reward": 0.3}, decoy="stop",
        fixed_size={**TOY_SIZE, "env": {**TOY_SIZE["env"], "max_turns": 8}, "algo": {**TOY_SIZE["algo"], "reward": "score"}},
        fixed_size_grpo=TOY_SIZE_GRPO,
    ),
}


class DataError(FileNotFoundError):
    """An environment's data could not be found; the message says where we looked."""


def env_info(env: str) -> EnvInfo:
    if env not in ENVS:
        raise ValueError(f"env.name: unknown environment {env!r}; expected one of {', '.join(ENVS)}")
    return ENVS[env]


def _module(env: str):
    return importlib.import_module(env_info(env).module)


def data_dir(env: str, configured: Path | None) -> Path:
    """The folder holding an environment's games (``env.data_dir`` if set, else where the
    environment looks); an environment without data files has none."""
    if not env_info(env).needs_data:
        raise ValueError(f"{env} has no data folder")
    try:
        return _module(env).find_data(configured)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None


def splits_of(env: str) -> tuple[str, ...]:
    return tuple(_module(env).SPLITS)


def title_of(env: str) -> str:
    return env_info(env).title


def max_score_of(env: str) -> float:
    """The score of a perfect episode (``algo.reward: score`` divides by it)."""
    return env_info(env).max_score


def task_types_of(env: str) -> tuple[str, ...]:
    """Every task type of an environment (``env.task_types`` picks among them)."""
    return tuple(_module(env).task_types(env))


def task_name(task) -> str:
    """A :class:`~epo_cli.envs.base.TaskInstance`'s name, independent of its seed and of
    where the data lives (``envs.base`` asks this table; the table imports no env module)."""
    return _module(task.env).task_name(task)


def load_split(env: str, configured_dir: Path | None, split: str) -> list:
    """A split's tasks (``TaskInstance``); ``configured_dir``: ``env.data_dir`` (environments with data files)."""
    root = data_dir(env, configured_dir) if env_info(env).needs_data else None
    return _module(env).load_split(env, root, split)


def ended_by_decoy(env: str, actions: list[str | None]) -> bool | None:
    """Whether an episode of ``env`` whose actions were ``actions`` ended by the env's decoy
    (its last action was the decoy, which ends an episode at once); None: the env has none."""
    decoy = env_info(env).decoy
    return None if decoy is None else bool(actions) and actions[-1] == decoy


def make_engine(env: str, options: dict):
    """One engine. ``options``: ``jvm_heap`` and ``valid_actions`` (ScienceWorld)."""
    return _module(env).make_engine(env, options)
