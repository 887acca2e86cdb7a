"""Environment lookup by name: data directories, splits and engines (batches of engines:
``epo_cli.envs.pool``)."""

from __future__ import annotations

import os
from pathlib import Path

from epo_cli.envs.base import TaskInstance

ENVS = ("scienceworld", "alfworld", "toy", "toy-multiturn")
TOY_ENVS = ("toy", "toy-multiturn")


class DataError(FileNotFoundError):
    """An environment's data could not be found; the message says where we looked."""


def _alfworld_candidates(configured: Path | None) -> list[Path]:
    """``env.data_dir`` alone when set; else ``$ALFWORLD_DATA``, ``$EPO_DATA_DIR/alfworld``,
    ``~/.cache/alfworld`` (where `alfworld-download` puts the games by default), then the
    epo cache (where archives are extracted)."""
    from epo_cli.envs.alfworld import default_download_dir
    from epo_cli.paths import cache_dir

    if configured:
        return [Path(configured)]
    found = []
    if os.environ.get("ALFWORLD_DATA"):
        found.append(Path(os.environ["ALFWORLD_DATA"]))
    if os.environ.get("EPO_DATA_DIR"):
        found.append(Path(os.environ["EPO_DATA_DIR"]) / "alfworld")
    return [*found, default_download_dir(), cache_dir() / "data" / "alfworld"]


def data_dir(env: str, configured: Path | None) -> Path:
    """ALFWorld's data folder (the folder holding json_2.1.1); ScienceWorld has none, its
    splits come from the engine."""
    if env != "alfworld":
        raise ValueError(f"{env} has no data folder")
    from epo_cli.envs import alfworld
    from epo_cli.paths import cache_dir

    try:
        return alfworld.resolve_root(_alfworld_candidates(configured), cache_dir() / "data" / "alfworld")
    except FileNotFoundError as err:
        raise DataError(str(err)) from None


def _module(env: str):
    if env == "scienceworld":
        from epo_cli.envs import scienceworld

        return scienceworld
    if env == "alfworld":
        from epo_cli.envs import alfworld

        return alfworld
    if env in TOY_ENVS:
        from epo_cli.envs import toy

        return toy
    raise ValueError(f"env.name: unknown environment {env!r}; expected one of {', '.join(ENVS)}")


def splits_of(env: str) -> tuple[str, ...]:
    return tuple(_module(env).SPLITS)


def title_of(env: str) -> str:
    return _module(env).TITLE


def max_score_of(env: str) -> float:
    """The score of a perfect episode (``algo.reward: score`` divides by it)."""
    return 100.0 if env == "scienceworld" else 1.0


def task_types_of(env: str) -> tuple[str, ...]:
    """Every task type of an environment (``env.task_types`` picks among them)."""
    if env in TOY_ENVS:
        return (env, f"{env}-ood")
    module = _module(env)
    return module.TASK_TYPES if env == "alfworld" else module.task_names()


def load_split(env: str, configured_dir: Path | None, split: str) -> list[TaskInstance]:
    """A split's tasks; ``configured_dir`` is ALFWorld's ``env.data_dir``."""
    if env in TOY_ENVS:
        return _module(env).load_split(env, split)
    if env == "scienceworld":
        return _module(env).load_split(split)
    return _module(env).load_split(data_dir(env, configured_dir), split)


def make_engine(env: str, options: dict):
    """One engine. ``options``: ``jvm_heap`` and ``valid_actions`` (ScienceWorld)."""
    if env == "scienceworld":
        from epo_cli.envs.scienceworld import ScienceWorldEngine

        return ScienceWorldEngine(options.get("jvm_heap", "512m"), options.get("valid_actions", False))
    if env == "alfworld":
        from epo_cli.envs.alfworld import AlfWorldEngine

        return AlfWorldEngine()
    if env in TOY_ENVS:
        from epo_cli.envs.toy import ToyEngine

        return ToyEngine(env)
    raise ValueError(f"env.name: unknown environment {env!r}; expected one of {', '.join(ENVS)}")
