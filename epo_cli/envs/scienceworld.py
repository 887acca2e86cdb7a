"""ScienceWorld on the real engine (one JVM per engine), with the paper's L0/L1/L2 splits."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from epo_cli.envs.base import EnvStep, TaskInstance
from epo_cli.paths import cache_dir

# The paper's protocol in the engine's own variation sets: split name ->
# (its tasks, the engine's set). L2 holds out whole task types (positions in task_names()).
L2_HELD_OUT = (1, 4, 8, 11, 13, 16, 18, 21, 24, 28)
UNUSED_TASK = "use-thermometer"  # in no split, as in the paper
SPLITS = {
    "train": ("all", "train"),  # L0 train: get_variations_train()
    "iid": ("all", "dev"),  # L0 test: get_variations_dev()
    "ood": ("all", "test"),  # L1 test: get_variations_test()
    "l2": ("held-out", "test"),  # L2 test: the held-out task types' test variations
    "l2-train": ("kept", "train"),  # L2 train: the other task types' train variations
}
UNKNOWN_ACTION = "No known action matches that input."


@lru_cache(maxsize=1)
def task_names() -> tuple[str, ...]:
    """The engine's task list in its own order (``get_task_names()``: sorted by name); a
    task id is a position in it. A test checks it against a running engine."""
    from scienceworld.constants import ID2TASK
    from scienceworld.utils import infer_task

    return tuple(sorted(infer_task(name) for name in ID2TASK.values()))


def _engine_variation_sets() -> dict[int, dict[str, list[int]]]:
    """Ask a running engine for every task's train, dev and test variations."""
    engine = _simulator("512m")
    try:
        sets = {}
        for task_id, name in enumerate(task_names()):
            if name == UNUSED_TASK:
                continue
            engine.load(name, 0, "")
            sets[task_id] = {
                "train": list(engine.get_variations_train()),
                "dev": list(engine.get_variations_dev()),
                "test": list(engine.get_variations_test()),
            }
        return sets
    finally:
        _release_simulator()


@lru_cache(maxsize=1)
def variation_sets() -> dict[int, dict[str, list[int]]]:
    """``{task id: {"train" | "dev" | "test": variations}}`` from the engine (about 5 s with
    Java), cached per engine version under the epo cache folder."""
    from scienceworld.version import __version__

    cached = cache_dir() / "scienceworld" / f"variations-{__version__}.json"
    try:
        return {int(task_id): sets for task_id, sets in json.loads(cached.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # absent or unreadable: ask the engine again
        pass
    sets = _engine_variation_sets()
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.with_name(f".{cached.name}.{os.getpid()}")
    staging.write_text(json.dumps(sets))
    os.replace(staging, cached)
    return sets


def load_split(env: str, data_dir: Path | None, split: str) -> list[TaskInstance]:
    """The (task, variation) pairs of a split, as task instances, in task and variation
    order (the engine holds its splits: no data folder)."""
    if split not in SPLITS:
        raise ValueError(f"env.train_split / --split: unknown ScienceWorld split {split!r}; expected one of {sorted(SPLITS)}")
    tasks_of_split, variation_set = SPLITS[split]
    names = task_names()
    tasks = []
    for task_id, sets in sorted(variation_sets().items()):
        held_out = task_id in L2_HELD_OUT
        if (tasks_of_split == "held-out" and not held_out) or (tasks_of_split == "kept" and held_out):
            continue
        tasks.extend(TaskInstance("scienceworld", names[task_id], task_id, variation) for variation in sets[variation_set])
    return tasks


def canonical_listing(observation: str) -> str:
    """Sort each run of tab-indented object lines (with their deeper-indented sub-lines).

    The engine lists a room's objects in an order that depends on what the same JVM
    loaded before (the state is identical). Sorting makes an observation a function of
    the state alone, which exact replays, resumes and fixed evaluation sets rely on.
    """
    lines = observation.split("\n")
    out: list[str] = []
    run: list[list[str]] = []

    def flush() -> None:
        for block in sorted(run):
            out.extend(block)
        run.clear()

    for line in lines:
        if line.startswith("\t\t") and run:
            run[-1].append(line)
        elif line.startswith("\t"):
            run.append([line])
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


_JVM: dict = {"env": None, "users": 0}  # this process's JVM and how many engines use it


def _start_jvm(jvm_heap: str):
    """A ScienceWorldEnv in a new JVM whose heap is capped at ``jvm_heap``."""
    import shutil

    from scienceworld import ScienceWorldEnv

    if shutil.which("java") is None:
        raise FileNotFoundError(
            "ScienceWorld needs Java and `java` is not on PATH: install a JRE "
            "(e.g. apt-get install default-jre-headless) or use --env alfworld"
        )
    previous = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = f"-Xmx{jvm_heap}"
    try:
        return ScienceWorldEnv("", envStepLimit=10**6)
    finally:
        if previous is None:
            os.environ.pop("JAVA_TOOL_OPTIONS", None)
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = previous


@lru_cache(maxsize=1)
def _sibling_class():
    """ScienceWorldEnv whose ``close`` (also run by ``__del__``) leaves the shared JVM alone."""
    from scienceworld import ScienceWorldEnv

    class SiblingEnv(ScienceWorldEnv):
        def close(self) -> None:
            pass

    return SiblingEnv


def _simulator(jvm_heap: str):
    """A new, independent simulator in this process's JVM (started on first use).

    Several ``PythonInterface`` simulators in one JVM do not share state (a test plays
    two interleaved episodes against separate JVMs), and share the JVM's start-up, JIT
    and heap: one JVM per worker process instead of one per episode.
    """
    import tempfile

    _JVM["users"] += 1
    if _JVM["env"] is None:
        _JVM["env"] = _start_jvm(jvm_heap)
        return _JVM["env"]
    first = _JVM["env"]
    sibling = _sibling_class()
    env = sibling.__new__(sibling)
    env._gateway = first._gateway
    env.server = first._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
    env.lastStepScore = 0
    env.taskName = None
    env.envStepLimit = first.envStepLimit
    env.goldPathGenerated = False
    env._obj_tree_tempdir = tempfile.TemporaryDirectory()
    env.clear_run_histories()
    return env


def _release_simulator() -> None:
    _JVM["users"] -= 1
    if _JVM["users"] == 0 and _JVM["env"] is not None:
        _JVM["env"].close()
        _JVM["env"] = None


class ScienceWorldEngine:
    """One ScienceWorld simulator playing one episode at a time; the engines of a process
    share one JVM (heap capped at ``jvm_heap``).

    Success is the spec's: the episode is done with a positive score (a negative score
    ends the episode as failed, as the engine's own wrapper does). The prompt lists the
    engine's action templates and the objects in view, not its ~400-900 grounded
    combinations, which would not fit a 2k-token prompt. With ``valid_actions`` each step
    also enumerates those combinations, for ``rollout.constrain``.
    """

    def __init__(self, jvm_heap: str = "512m", valid_actions: bool = False):
        self._engine = _simulator(jvm_heap)
        self._templates: list[str] = []
        self.valid_actions = valid_actions

    def _valid_actions(self) -> list[str] | None:
        if not self.valid_actions:
            return None
        return [a for a in self._engine.get_valid_action_object_combinations() if a != "reset task"]

    def _actions(self) -> list[str]:
        objects = self._engine.get_possible_objects()
        return self._templates + ["OBJ is one of: " + ", ".join(objects)]

    def reset(self, task: TaskInstance) -> EnvStep:
        self._engine.load(task.task_type, int(task.variation), "")
        observation, _ = self._engine.reset()
        observation = canonical_listing(observation)
        self._templates = [a for a in self._engine.get_possible_actions() if a != "reset task"]
        return EnvStep(
            observation=observation,
            actions=self._actions(),
            task_description=self._engine.get_task_description(),
            valid_actions=self._valid_actions(),
        )

    def step(self, action: str) -> EnvStep:
        # ScienceWorldEnv.step without its info dict: that dict enumerates every valid
        # grounded action (~400-900 strings) on each step, which the prompt never shows.
        server = self._engine.server
        observation = canonical_listing(server.step(action))
        score = float(round(100 * server.getScore()))
        done = bool(server.getCompleted()) or score < 0
        return EnvStep(
            observation=observation,
            done=done,
            won=done and score > 0,
            score=score,
            actions=self._actions(),
            accepted=not observation.startswith(UNKNOWN_ACTION),
            valid_actions=None if done else self._valid_actions(),
        )

    def gold_path(self, task: TaskInstance) -> list[str]:
        """The engine's expert actions for a task. This engine is left on that task with
        gold-path bookkeeping: replay them on another engine."""
        self._engine.load(task.task_type, int(task.variation), "", generateGoldPath=True)
        return list(self._engine.get_gold_action_sequence())

    def close(self) -> None:
        if self._engine is not None:
            self._engine = None
            _release_simulator()


def make_engine(env: str, options: dict) -> ScienceWorldEngine:
    return ScienceWorldEngine(options.get("jvm_heap", "512m"), options.get("valid_actions", False))


def task_types(env: str) -> tuple[str, ...]:
    return task_names()


def task_name(task: TaskInstance) -> str:
    return f"{task.task_type}/{task.variation}"
