"""Batched multi-turn episodes: prompts -> a sampler (:mod:`epo_cli.sampling`) -> actions
-> engines.

The output is a list of :class:`Episode`, each a list of :class:`Turn` records holding
exactly the tokens the policy saw and wrote; :mod:`epo_cli.batch` makes them training
samples (one per turn). Prompts come from :mod:`epo_cli.prompts`, in
``rollout.prompt_format``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from epo_cli.envs.base import INVALID_FORMAT_OBSERVATION, EnvStep, PromptState, TaskInstance, build_prompt, check_action
from epo_cli.envs.registry import ended_by_decoy, max_score_of
from epo_cli.prompts import Conversation, encode_prompt
from epo_cli.sampling.base import Sampler
from epo_cli.sampling.constrain import ConstraintFactory


@dataclass
class Turn:
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    action: str | None
    turn_index: int
    sample_logprobs: list[float]
    allowed_tokens: list[list[int] | None] | None = None  # rollout.constrain: per token, see sampling/constrain.py
    reward: float = 0.0
    prompt_tokens_cut: int = 0
    # rollout.prompt_format: conversation: the episode's segment this turn belongs to; its
    # prompt is that segment's token sequence up to the turn's response. None: windowed,
    # the turn is a segment of its own.
    segment: int | None = None
    accepted: bool = False  # a valid action the engine recognized
    # What a reader of the transcript needs (epo_cli/transcripts.py):
    observation: str = ""  # the observation the turn answered
    listed_actions: list[str] = field(default_factory=list)  # the admissible actions the prompt listed
    invalid_reason: str | None = None  # why the answer had no valid action (check_action)
    score: float = 0.0  # the engine's score after the turn
    entropy: float | None = None  # mean token entropy of the training scoring pass (trainer)

    @property
    def valid(self) -> bool:
        return self.action is not None


@dataclass
class Episode:
    task: TaskInstance
    episode_id: int
    group_id: int
    turns: list[Turn] = field(default_factory=list)
    done: bool = False
    won: bool = False
    score: float = 0.0

    @property
    def total_reward(self) -> float:
        return sum(turn.reward for turn in self.turns)

    @property
    def invalid_turns(self) -> int:
        return sum(not turn.valid for turn in self.turns)

    @property
    def actions(self) -> list[str | None]:
        return [turn.action for turn in self.turns]


@dataclass(frozen=True)
class EpisodeStats:
    """What a list of episodes came to: the trainer's ``train/*`` and an evaluation's
    ``eval/SPLIT/*`` success, turn and invalid-action figures."""

    episodes: int
    successes: int
    mean_turns: float
    invalid_action_rate: float  # of all turns
    per_type: dict[str, tuple[int, int]]  # task type -> (successes, episodes), sorted by type
    decoy_rate: float | None = None  # share of episodes ended by the env's decoy; None: it has none

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)


def episode_stats(episodes: Sequence[Episode]) -> EpisodeStats:
    """The figures of ``episodes`` (rates are 0 where there are no episodes or turns)."""
    return stats_of([(e.task.task_type, e.won, len(e.turns), e.invalid_turns, ended_by_decoy(e.task.env, e.actions))
                     for e in episodes])


def stats_of(rows: Sequence[tuple[str, bool, int, int, bool | None]]) -> EpisodeStats:
    """The figures of episodes given as (task type, won, turns, invalid turns, ended by the
    decoy or None): played ones, or ones read back from an episode file."""
    per_type: dict[str, tuple[int, int]] = {}
    for task_type, won, *_ in rows:
        wins, n = per_type.get(task_type, (0, 0))
        per_type[task_type] = (wins + int(won), n + 1)
    turns = sum(row[2] for row in rows)
    return EpisodeStats(
        episodes=len(rows),
        successes=sum(bool(row[1]) for row in rows),
        mean_turns=turns / max(len(rows), 1),
        invalid_action_rate=sum(row[3] for row in rows) / max(turns, 1),
        per_type=dict(sorted(per_type.items())),
        decoy_rate=None if any(row[4] is None for row in rows) or not rows else sum(row[4] for row in rows) / len(rows),
    )


class EnvBatch(Protocol):
    """Engines that play a batch of episodes side by side (in process or in workers)."""

    title: str

    def reset(self, tasks: Sequence[TaskInstance]) -> list[EnvStep]: ...

    def step(self, slots: Sequence[int], actions: Sequence[str]) -> list[EnvStep]: ...


@dataclass
class RolloutSettings:
    max_turns: int
    max_prompt_tokens: int
    max_response_tokens: int
    temperature: float
    top_p: float = 1.0
    on_overflow: str = "truncate"
    history_length: int = 2
    max_listed_actions: int = 60
    reward_scale: float = 1.0
    invalid_action_penalty: float = 0.0
    constrain: str = "none"
    think_tokens: int = 0
    reward: str = "success"
    max_score: float = 1.0
    prompt_format: str = "windowed"

    @classmethod
    def from_spec(cls, spec, temperature: float | None = None) -> RolloutSettings:
        """The rollout part of an ExperimentSpec (``temperature`` overrides the training one)."""
        return cls(
            max_turns=spec.env.max_turns,
            max_prompt_tokens=spec.rollout.max_prompt_tokens,
            max_response_tokens=spec.rollout.max_response_tokens,
            temperature=spec.rollout.temperature if temperature is None else temperature,
            top_p=spec.rollout.top_p,
            on_overflow=spec.rollout.on_overflow,
            history_length=spec.rollout.history_length,
            max_listed_actions=spec.rollout.max_listed_actions,
            reward_scale=spec.algo.reward_scale,
            invalid_action_penalty=spec.algo.invalid_action_penalty,
            constrain=spec.rollout.constrain,
            think_tokens=spec.rollout.think_tokens,
            reward=spec.algo.reward,
            max_score=max_score_of(spec.env.name),
            prompt_format=spec.rollout.prompt_format,
        )

    def outcome(self, episode: Episode) -> float:
        """The episode's reward before scaling: 1 for a win (``algo.reward: success``) or its
        final score as a fraction of the environment's maximum (``score``)."""
        if self.reward == "score":
            return max(episode.score, 0.0) / self.max_score
        return float(episode.won)


def play_episodes(
    sampler: Sampler,
    tokenizer,
    envs: EnvBatch,
    tasks: Sequence[TaskInstance],
    group_ids: Sequence[int],
    settings: RolloutSettings,
    on_turn: Callable[[int, int], None] | None = None,
) -> list[Episode]:
    """Play one episode per task, all turns batched across the episodes still running.

    A turn whose answer has no valid ``<think>/<action>`` pair is an invalid turn: it is
    penalized, consumes the turn, and the engine is not stepped. The outcome reward is
    paid on the last turn. With ``settings.constrain == "admissible"`` every response is
    drawn from the admissible actions (:mod:`epo_cli.sampling.constrain`).
    ``on_turn(new_tokens, active_episodes)`` reports progress.
    """
    episodes = [Episode(task, i, g) for i, (task, g) in enumerate(zip(tasks, group_ids))]
    first = envs.reset(tasks)
    states = [PromptState(step.task_description, step.observation, step.actions) for step in first]
    commands = [step.commands for step in first]
    conversations = None
    if settings.prompt_format == "conversation":
        conversations = [Conversation(tokenizer, envs.title, settings) for _ in episodes]
    constraint_for = ConstraintFactory(tokenizer, settings.think_tokens) if settings.constrain == "admissible" else None
    active = list(range(len(episodes)))
    try:
        for turn_index in range(settings.max_turns):
            if not active:
                break
            prompts, cuts = _turn_prompts(tokenizer, envs.title, [states[slot] for slot in active],
                                          None if conversations is None else [conversations[slot] for slot in active],
                                          turn_index, settings)
            constraints = [constraint_for(commands[slot]) for slot in active] if constraint_for is not None else None
            generations = sampler.generate(prompts, settings.max_response_tokens, settings.temperature, settings.top_p, constraints)
            checked = [check_action(g.text) for g in generations]
            actions = [action for action, _ in checked]
            to_step = [(slot, action) for slot, action in zip(active, actions) if action is not None]
            slots = [slot for slot, _ in to_step]
            results = dict(zip(slots, envs.step(slots, [a for _, a in to_step]))) if to_step else {}
            still_active = []
            for slot, prompt, cut, generation, (action, invalid_reason) in zip(active, prompts, cuts, generations, checked):
                episode, state = episodes[slot], states[slot]
                turn = Turn(
                    prompt, generation.token_ids, generation.text, action, turn_index, generation.logprobs,
                    generation.allowed, prompt_tokens_cut=cut, observation=state.observation,
                    listed_actions=state.actions[: settings.max_listed_actions], invalid_reason=invalid_reason,
                )
                if conversations is not None:
                    conversations[slot].answer(generation.token_ids)
                    turn.segment = conversations[slot].segment
                if action is not None:
                    commands[slot] = results[slot].commands
                if _take_turn(episode, state, turn, results.get(slot), settings):
                    still_active.append(slot)
            if on_turn is not None:
                on_turn(sum(len(g.token_ids) for g in generations), len(active))
            active = still_active
    finally:
        sampler.forget_prefixes()  # the weights may change before the next rollout
    return episodes


def _turn_prompts(tokenizer, title: str, states: list[PromptState], conversations: list[Conversation] | None,
                  turn_index: int, settings: RolloutSettings) -> tuple[list[list[int]], list[int]]:
    """The prompt token ids of one turn of each episode, and the tokens cut from each: its
    conversation so far (``rollout.prompt_format: conversation``) or its windowed prompt."""
    prompts, cuts = [], []
    for i, state in enumerate(states):
        if conversations is not None:
            ids, cut = conversations[i].prompt(state, turn_index)
        else:
            messages = build_prompt(title, state, turn_index, settings.max_turns, settings.history_length,
                                    settings.max_listed_actions)
            ids, cut = encode_prompt(tokenizer, messages, settings.max_prompt_tokens, settings.on_overflow)
        prompts.append(ids)
        cuts.append(cut)
    return prompts, cuts


def _take_turn(episode: Episode, state: PromptState, turn: Turn, result: EnvStep | None, settings: RolloutSettings) -> bool:
    """Apply one turn to its episode and prompt state: the engine's ``result``, or None for an
    answer without a valid action (penalized; the engine was not stepped). The outcome
    reward is paid on the episode's last turn. Returns whether the episode goes on."""
    if result is None:
        turn.reward -= settings.invalid_action_penalty
        observation = INVALID_FORMAT_OBSERVATION
    else:
        turn.accepted = result.accepted
        observation = result.observation
        state.actions = result.actions
        episode.done, episode.won, episode.score = result.done, result.won, result.score
    turn.score = episode.score
    episode.turns.append(turn)
    state.past_actions.append(turn.action if turn.action is not None else "(invalid)")
    state.past_observations.append(state.observation)
    state.observation = observation
    if episode.done or turn.turn_index == settings.max_turns - 1:
        turn.reward += settings.reward_scale * settings.outcome(episode)
        return False
    return True
