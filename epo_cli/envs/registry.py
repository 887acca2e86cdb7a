"""Environment lookup: data directories, splits, engines and engine batches by name."""

from __future__ import annotations

import os
from pathlib import Path

from epo_cli.envs.base import TaskInstance

ENVS = ("scienceworld", "alfworld")


class DataError(FileNotFoundError):
    """An environment's data could not be found; the message says where we looked."""


def _candidates(env: str, configured: Path | None) -> list[Path]:
    """``env.data_dir`` alone when set; else (ALFWorld) ``$ALFWORLD_DATA``, then
    ``$EPO_DATA_DIR/<env>``, then ``../shared/data/<env>``."""
    if configured:
        return [Path(configured)]
    found = []
    if env == "alfworld" and os.environ.get("ALFWORLD_DATA"):
        found.append(Path(os.environ["ALFWORLD_DATA"]))
    if os.environ.get("EPO_DATA_DIR"):
        found.append(Path(os.environ["EPO_DATA_DIR"]) / env)
    found.append(Path("..") / "shared" / "data" / env)
    return found


def data_dir(env: str, configured: Path | None) -> Path:
    """The environment's data folder (for ALFWorld: the folder holding json_2.1.1)."""
    candidates = _candidates(env, configured)
    if env == "alfworld":
        from epo_cli.envs import alfworld
        from epo_cli.paths import cache_dir

        try:
            return alfworld.resolve_root(candidates, cache_dir() / "data" / "alfworld")
        except FileNotFoundError as err:
            raise DataError(str(err)) from None
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"{env} data not found (looked in: {looked}); set env.data_dir or EPO_DATA_DIR")


def _module(env: str):
    if env == "scienceworld":
        from epo_cli.envs import scienceworld

        return scienceworld
    if env == "alfworld":
        from epo_cli.envs import alfworld

        return alfworld
    raise ValueError(f"env.name: unknown environment {env!r}; expected one of {', '.join(ENVS)}")


def splits_of(env: str) -> tuple[str, ...]:
    return tuple(_module(env).SPLITS)


def title_of(env: str) -> str:
    return _module(env).TITLE


def task_types_of(env: str) -> tuple[str, ...]:
    """Every task type of an environment (``env.task_types`` picks among them)."""
    module = _module(env)
    return module.TASK_TYPES if env == "alfworld" else module.task_names()


def load_split(env: str, configured_dir: Path | None, split: str) -> list[TaskInstance]:
    return _module(env).load_split(data_dir(env, configured_dir), split)


def make_engine(env: str, options: dict):
    """One engine. ``options``: ``jvm_heap`` (ScienceWorld)."""
    if env == "scienceworld":
        from epo_cli.envs.scienceworld import ScienceWorldEngine

        return ScienceWorldEngine(options.get("jvm_heap", "512m"))
    if env == "alfworld":
        from epo_cli.envs.alfworld import AlfWorldEngine

        return AlfWorldEngine()
    raise ValueError(f"env.name: unknown environment {env!r}; expected one of {', '.join(ENVS)}")


def make_env_batch(env: str, size: int, options: dict, workers: int = 0, step_timeout_s: float = 120.0):
    """In-process engines (``workers=0``) or a crash-tolerant pool of worker processes."""
    from epo_cli.envs.pool import EnvPool, LocalEnvBatch

    if workers <= 0:
        return LocalEnvBatch(env, options, size)
    return EnvPool(env, options, workers, step_timeout_s)


def env_batch_for(env_spec, size: int):
    """The engine batch an ``EnvSpec`` asks for."""
    return make_env_batch(env_spec.name, size, env_spec.engine_options, env_spec.workers, env_spec.step_timeout_s)
