"""The environment protocol, the paper's prompt and the action parser."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Protocol

from epo_cli.envs.registry import task_name

ANSWER_FORMAT = (
    "First reason step by step inside <think> </think>, then give exactly one action "
    "inside <action> </action>, for example: <think>...</think><action>look around</action>"
)
INVALID_FORMAT_OBSERVATION = (
    "Invalid response: it must contain <think>...</think> followed by <action>...</action>. "
    "Nothing happened."
)
MAX_ACTION_CHARS = 200


@dataclass(frozen=True)
class TaskInstance:
    """One playable task: an environment's task type, a variation or game, and a seed."""

    env: str
    task_type: str
    task_id: int | str
    variation: int | str
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.env}:{self.task_id}:{self.variation}:{self.seed}"

    @property
    def name(self) -> str:
        """The task, independent of its seed and of where the data lives (an ALFWorld game
        is named by its split, task and trial folders)."""
        return task_name(self)


@dataclass
class EnvStep:
    """What an engine returns after reset or step."""

    observation: str
    done: bool = False
    won: bool = False
    score: float = 0.0
    actions: list[str] = field(default_factory=list)
    task_description: str = ""
    accepted: bool = True  # False: a well-formed action the engine did not recognize
    # Complete commands the engine accepts now, for rollout.constrain; None: ``actions``
    # already are complete commands (ALFWorld, toy). ScienceWorld lists templates in
    # ``actions`` and fills this only when asked to (it costs a full enumeration).
    valid_actions: list[str] | None = None

    @property
    def commands(self) -> list[str]:
        return self.actions if self.valid_actions is None else self.valid_actions


class TextEnv(Protocol):
    """A text environment engine that plays one episode at a time."""

    def reset(self, task: TaskInstance) -> EnvStep: ...

    def step(self, action: str) -> EnvStep: ...

    def close(self) -> None: ...


_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL | re.IGNORECASE)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def parse_action(response: str) -> str | None:
    """The action of a ``<think>...</think><action>...</action>`` answer, or None if invalid
    (:func:`check_action` says why)."""
    return check_action(response)[0]


def check_action(response: str) -> tuple[str | None, str | None]:
    """(action, None) for a valid answer, (None, reason) for an invalid one.

    Valid means: one think block, then exactly one non-empty action block after it, with no
    tag nested inside the action. The action is stripped of control characters and
    surrounding space and folded to single spaces.
    """
    actions = _ACTION_RE.findall(response)
    think = _THINK_RE.search(response)
    if not actions:
        return None, "no <action>...</action> block"
    if len(actions) > 1:
        return None, f"{len(actions)} <action> blocks, expected one"
    if think is None:
        return None, "no <think>...</think> block"
    if response.lower().find("<action>") < think.end():
        return None, "<action> comes before </think>"
    action = " ".join(_CONTROL_RE.sub(" ", actions[0]).split())
    if not action:
        return None, "empty action"
    if "<" in action:
        return None, "a tag inside the action"
    if len(action) > MAX_ACTION_CHARS:
        return None, f"action longer than {MAX_ACTION_CHARS} characters"
    return action, None


@dataclass
class PromptState:
    """What the prompt shows of an episode in progress."""

    task_description: str
    observation: str
    actions: list[str]
    past_actions: list[str] = field(default_factory=list)
    past_observations: list[str] = field(default_factory=list)


def build_prompt(
    env_title: str,
    state: PromptState,
    turn: int,
    max_turns: int,
    history_length: int = 2,
    max_listed_actions: int = 60,
) -> list[dict[str, str]]:
    """Chat messages for one turn: task, step count, past actions, the last
    ``history_length`` (observation, action) pairs, the current observation and the
    admissible actions."""
    lines = [f"Your task: {state.task_description.strip()}", f"Step {turn + 1} of {max_turns}."]
    if state.past_actions:
        lines.append("Actions taken so far: " + "; ".join(state.past_actions))
        recent = list(zip(state.past_observations, state.past_actions))[-history_length:] if history_length else []
        for observation, action in recent:
            lines.append(f"[Observation] {observation.strip()}\n[Your action] {action}")
    lines.append(f"Current observation: {state.observation.strip()}")
    lines += _admissible_line(state.actions, max_listed_actions)
    lines.append(ANSWER_FORMAT)
    system = f"You are an expert agent acting in {env_title}, a text-based environment."
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def _admissible_line(actions: list[str], max_listed_actions: int) -> list[str]:
    """The admissible-actions line (at most ``max_listed_actions`` named), or none."""
    if not actions:
        return []
    shown = actions[:max_listed_actions]
    more = len(actions) - len(shown)
    suffix = f" (and {more} more)" if more > 0 else ""
    return ["Admissible actions: " + ", ".join(shown) + suffix]


def conversation_opening(
    env_title: str, state: PromptState, turn: int, max_turns: int, max_listed_actions: int = 60
) -> list[dict[str, str]]:
    """The system and first user message of a conversation (``rollout.prompt_format:
    conversation``), or of a new segment of one: :func:`build_prompt` without the
    window of history (task, step count, actions taken so far, the current observation,
    the admissible actions, the answer format). At turn 0 it is the windowed prompt."""
    return build_prompt(env_title, state, turn, max_turns, 0, max_listed_actions)


def conversation_turn(state: PromptState, turn: int, max_turns: int, max_listed_actions: int = 60) -> str:
    """The user message after the assistant's answer of the turn before: the step count,
    the new observation and the admissible actions."""
    lines = [f"Step {turn + 1} of {max_turns}.", f"Observation: {state.observation.strip()}"]
    return "\n".join(lines + _admissible_line(state.actions, max_listed_actions))


def of_task_types(tasks: list[TaskInstance], task_types: list[str] | None, split: str) -> list[TaskInstance]:
    """The tasks of the chosen types (``None``: all of them); an empty result is an error."""
    if task_types is None:
        return tasks
    chosen = [task for task in tasks if task.task_type in task_types]
    if not chosen:
        raise ValueError(f"env.task_types: split {split!r} has no task of type {', '.join(task_types)}")
    return chosen


def stratified_order(items: list, type_of, seed: int) -> list:
    """Items shuffled within each type, then dealt round-robin across types.

    A prefix of any length covers the types as evenly as possible, so a small fixed
    evaluation set still spans every task type.
    """
    rng = random.Random(seed)
    by_type: dict[str, list] = {}
    for item in items:
        by_type.setdefault(type_of(item), []).append(item)
    queues = []
    for name in sorted(by_type):
        members = by_type[name][:]
        rng.shuffle(members)
        queues.append(members)
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


class TaskSampler:
    """Deterministic training tasks: a seeded permutation of the split, epoch after epoch.

    ``position`` is all the state there is, so a resumed run continues the same sequence.
    """

    def __init__(self, tasks: list[TaskInstance], seed: int, position: int = 0):
        if not tasks:
            raise ValueError("the training split has no tasks")
        self.tasks = tasks
        self.seed = seed
        self.position = position
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.tasks)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def sample(self, count: int) -> list[TaskInstance]:
        drawn = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.tasks))
            task = self.tasks[self._order(epoch)[index]]
            drawn.append(TaskInstance(task.env, task.task_type, task.task_id, task.variation, seed=self.position))
            self.position += 1
        return drawn


def grouped_tasks(sampler: TaskSampler, tasks_per_step: int, group_size: int) -> tuple[list[TaskInstance], list[int]]:
    """``tasks_per_step`` task instances, each repeated ``group_size`` times: a GRPO group
    plays one and the same instance (task, variation or game, seed)."""
    instances = sampler.sample(tasks_per_step)
    tasks = [task for task in instances for _ in range(group_size)]
    group_ids = [g for g in range(len(instances)) for _ in range(group_size)]
    return tasks, group_ids
