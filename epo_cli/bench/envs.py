"""The ``envs`` part: environment steps per second, one engine in this process against
several side by side and against a worker pool (ScienceWorld and ALFWorld)."""

from __future__ import annotations

import random
import time

from epo_cli.envs.base import TaskInstance
from epo_cli.envs.pool import make_env_batch
from epo_cli.envs.registry import load_split, make_engine

SLOTS = 4


def _tasks(env: str) -> list[TaskInstance]:
    tasks = load_split(env, None, "iid")
    return [tasks[i * (len(tasks) // SLOTS)] for i in range(SLOTS)]


def _action_script(env: str, tasks: list[TaskInstance], steps: int, seed: int = 0) -> list[list[str]]:
    """A fixed action per slot per step, drawn from the listed actions of a first play."""
    rng = random.Random(seed)
    engine = make_engine(env, {})
    scripts = []
    try:
        for task in tasks:
            listed = engine.reset(task).actions
            plain = [a for a in listed if "OBJ" not in a] or ["look around"]
            scripts.append([rng.choice(plain) for _ in range(steps)])
    finally:
        engine.close()
    return [[scripts[s][t] for s in range(len(tasks))] for t in range(steps)]


def raw_engine_steps_per_s(env: str, tasks, script, package_step: bool = False) -> float:
    """One engine in this process playing the slots' episodes one after another; the
    second of two identical passes is timed (a warm JVM / warm caches). ``package_step``
    (ScienceWorld) times the package's own ``ScienceWorldEnv.step``, which also builds its
    full info dict, instead of ours."""
    engine = make_engine(env, {})
    step = engine._engine.step if package_step else engine.step
    try:
        for _ in range(2):
            started = time.perf_counter()
            for slot, task in enumerate(tasks):
                engine.reset(task)
                for actions in script:
                    step(actions[slot])
        return len(script) * len(tasks) / (time.perf_counter() - started)
    finally:
        engine.close()


def batch_steps_per_s(env: str, tasks, script, workers: int) -> float:
    """All slots side by side: in process (``workers=0``) or in a worker pool; the second
    of two identical passes is timed."""
    batch = make_env_batch(env, len(tasks), {}, workers)
    try:
        for _ in range(2):
            started = time.perf_counter()
            batch.reset(tasks)
            for actions in script:
                batch.step(list(range(len(tasks))), actions)
        return len(script) * len(tasks) / (time.perf_counter() - started)
    finally:
        batch.close()


def env_rows(steps: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for env in ("scienceworld", "alfworld"):
        tasks = _tasks(env)
        script = _action_script(env, tasks, steps)
        raw = raw_engine_steps_per_s(env, tasks, script)
        rows.append((env, "raw engine, 1 process (baseline)", raw, 1.0))
        if env == "scienceworld":
            full = raw_engine_steps_per_s(env, tasks, script, package_step=True)
            rows.append((env, "raw engine, the package's step with full info", full, full / raw))
        for label, workers in (("4 engines in process", 0), ("pool, 1 worker", 1), ("pool, 2 workers", 2)):
            rate = batch_steps_per_s(env, tasks, script, workers)
            rows.append((env, label, rate, rate / raw))
    return rows


def render_envs(rows) -> str:
    lines = [
        "",
        "## Environments: steps per second",
        "",
        f"{SLOTS} episodes (one per task), the same fixed action script in every setting.",
        "",
        "| env | setting | steps/s | ratio |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {env} | {label} | {rate:.1f} | {ratio:.2f}x |" for env, label, rate, ratio in rows]
    lines += [
        "",
        "The ScienceWorld rows share one JVM per process (several simulators in it); the ALFWorld rows use the "
        "TextWorld grammar-parse cache.",
    ]
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block, measured with the command line's ``--steps``."""
    return render_envs(env_rows(args.steps))
