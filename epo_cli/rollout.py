"""Batched multi-turn episodes: prompts -> KV-cached sampling -> actions -> engines.

The output is a list of :class:`Episode`, each a list of :class:`Turn` records holding
exactly the tokens the policy saw and wrote; :func:`flatten_turns` makes them training
samples (one per turn). Prompts come from :mod:`epo_cli.prompts`, in
``rollout.prompt_format``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from epo_cli.constrain import ConstraintFactory, ResponseConstraint
from epo_cli.envs.base import INVALID_FORMAT_OBSERVATION, EnvStep, PromptState, TaskInstance, build_prompt, check_action
from epo_cli.envs.registry import max_score_of
from epo_cli.generation import STOP_STRING, Generation
from epo_cli.precision import autocast_context
from epo_cli.prompts import Conversation, encode_prompt


class Sampler(Protocol):
    """A rollout backend: token prompts in, sampled responses (tokens, their log-probs under
    the tempered distribution, text) out. Backends: :class:`TransformersSampler`, and
    ``epo_cli.vllm_sampler.VLLMSampler``."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        constraints: Sequence[ResponseConstraint] | None = None,
    ) -> list[Generation]:
        """``constraints``: one per prompt (``rollout.constrain``), or None."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Sample with these policy weights from now on (full, unsharded tensors)."""

    def with_generator(self, generator: torch.Generator) -> Sampler:
        """The same sampler (same weights) drawing from another random stream."""

    def forget_prefixes(self) -> None:
        """Drop whatever the backend keeps between calls of one rollout (called when a
        rollout ends: the weights may change next)."""

    def close(self) -> None:
        """Release the backend's engine, if it has one."""


class TransformersSampler:
    """Sampling with a transformers causal LM: left-padded batch, KV cache, stop on EOS or
    on ``</action>``. Returns each response's own tokens (never padding) and the sampling
    log-probs.

    Every response draws from a random stream of its own (seeded from ``generator`` in row
    order), one uniform number per sampled token, so a response depends neither on what
    the other rows of its batch generate nor on how many forward passes produced it. Under
    a constraint, a token that is the only one allowed is appended without sampling
    (log-prob 0, no draw); with
    ``fast_forward`` (the default) a run of such tokens is fed to the model in the same
    forward pass as the token before it, so an action costs about one pass per real choice.

    With ``share_prompts`` (the default), identical prompts of a batch are prefilled once.
    With ``prefix_cache``, the KV cache of each sequence of a call (prompt and response)
    is kept until the next call; a prompt feeds only its tokens after the longest beginning
    it shares with a kept sequence (the whole kept sequence for a conversation turn, which
    extends it; the system text and task for a segment restart). :func:`play_episodes` calls
    :meth:`forget_prefixes` when a rollout ends, so a cache never outlives the weights
    that computed it, nor holds memory through the update. The kept caches cost
    ``2 x layers x kv_heads x head_dim`` values per token of every running episode.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, generator: torch.Generator | None = None,
                 autocast: str = "none", fast_forward: bool = True, prefix_cache: bool = False, share_prompts: bool = True):
        self.model = model
        self.autocast = autocast
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generator = generator
        self.fast_forward = fast_forward
        self.prefix_cache = prefix_cache
        self.share_prompts = share_prompts
        self.prefixes: list[_Prefix] = []  # the last call's sequences, with prefix_cache
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(weights))

    def with_generator(self, generator: torch.Generator) -> TransformersSampler:
        twin = copy.copy(self)
        twin.generator = generator
        return twin

    def close(self) -> None:
        """The model belongs to the caller: nothing to release."""

    def generate(self, prompts, max_new_tokens, temperature, top_p, constraints=None):
        results: list[Generation] = []
        usable, self.prefixes = self.prefixes, []
        kept: list[_Prefix] = []
        with autocast_context(self.autocast, self.model):
            for start in range(0, len(prompts), self.batch_size):
                window = slice(start, start + self.batch_size)
                chunk_constraints = constraints[window] if constraints is not None else None
                results.extend(self._generate_batch(prompts[window], max_new_tokens, temperature, top_p, chunk_constraints,
                                                    usable, kept))
        if self.prefix_cache:
            self.prefixes = kept
        return results

    def forget_prefixes(self) -> None:
        """Drop the kept KV caches (``prefix_cache``): the rollout they belong to is over."""
        self.prefixes = []

    def _start(self, prompts, prefixes: list[_Prefix], device):
        """The first forward passes of a batch. Identical prompts (a GRPO group's first
        turn, or members that acted alike) are computed once and their cache rows copied.
        Each distinct prompt feeds its tokens after the longest beginning it shares with a
        kept sequence (all of them if none); prompts with about as many tokens to feed
        share a pass (:func:`_prefill_buckets`), and the rows' caches are then joined,
        left-padded, into the batch's. Returns the last logits, the cache, the attention
        mask so far and each row's next position."""
        keys = [tuple(prompt) if self.share_prompts else row for row, prompt in enumerate(prompts)]
        first_row: dict = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        computed = {key: i for i, key in enumerate(first_row)}
        copies = torch.tensor([computed[key] for key in keys], device=device)
        unique = [list(prompts[row]) for row in first_row.values()]
        starts = [_longest_shared_prefix(prompt, prefixes) for prompt in unique]
        reused = [max(min(shared, len(prompt) - 1), 0) for (_, shared), prompt in zip(starts, unique)]
        logits: list = [None] * len(unique)
        rows: list = [None] * len(unique)
        for bucket in _prefill_buckets([len(prompt) - n for prompt, n in zip(unique, reused)]):
            prefilled = self._prefill([unique[i] for i in bucket], [starts[i][0] for i in bucket], [reused[i] for i in bucket], device)
            for i, (row_logits, sequence) in zip(bucket, prefilled):
                logits[i], rows[i] = row_logits, sequence
        lengths = [len(prompt) for prompt in unique]
        width = max(lengths)
        cache = _batch_cache(rows, lengths, width, self.model.config)
        attention = torch.zeros((len(unique), width), dtype=torch.long, device=device)
        for row, length in enumerate(lengths):
            attention[row, width - length :] = 1
        if len(unique) < len(prompts):
            cache.batch_select_indices(copies)
        next_position = torch.tensor(lengths, device=device)
        return torch.stack(logits)[copies], cache, attention[copies], next_position[copies]

    def _prefill(self, prompts: list[list[int]], matches: list, reused: list[int], device) -> list[tuple[torch.Tensor, _Prefix]]:
        """One forward pass over the prompts' tokens after their first ``reused[row]``,
        whose KV comes from ``matches[row]`` (left-padded, as the new tokens are): each
        row's last logits and the KV of its whole prompt."""
        width = max(reused)
        cache = _batch_cache(matches, reused, width, self.model.config) if width else None
        new = [prompt[n:] for prompt, n in zip(prompts, reused)]
        step = max(len(ids) for ids in new)
        input_ids = torch.full((len(prompts), step), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width + step), dtype=torch.long)
        for row, (ids, n) in enumerate(zip(new, reused)):
            input_ids[row, step - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - n : width] = 1
            attention[row, width + step - len(ids) :] = 1
        positions = (torch.tensor(reused)[:, None] + attention[:, width:].cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        layers = out.past_key_values.layers
        valid = attention.bool().to(device)
        return [(out.logits[row, -1], _Prefix(prompt, [layer.keys[row][:, valid[row]] for layer in layers],
                                              [layer.values[row][:, valid[row]] for layer in layers]))
                for row, prompt in enumerate(prompts)]

    @torch.no_grad()
    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p, constraints, prefixes: list[_Prefix],
                        kept: list[_Prefix]) -> list[Generation]:
        """One batch of responses, starting from the kept ``prefixes``; with
        ``prefix_cache``, each row's sequence is added to ``kept``."""
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        last_logits, cache, attention, next_position = self._start(prompts, prefixes, device)
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=self.generator).tolist()
        streams = [torch.Generator().manual_seed(seed) for seed in seeds]
        responses = [_Response() for _ in prompts]
        while True:
            running = [row for row, r in enumerate(responses) if not r.finished]
            # Sampled on the CPU, where the random streams live (one [batch, vocab] copy per pass).
            logits = last_logits.cpu()
            choosing = [row for row in running if not _forced(constraints, row)]
            sets = {row: constraints[row].allowed() for row in choosing} if constraints is not None else {}
            if choosing:
                restricted = restrict_logits(logits[choosing], {i: sets[row] for i, row in enumerate(choosing)}) if sets else logits[choosing]
                uniforms = torch.cat([torch.rand(1, generator=streams[row]) for row in choosing])
                sampled, sampled_logp = sample_token(restricted, temperature, top_p, uniforms)
            for response in responses:
                response.fed = []
            for i, row in enumerate(choosing):
                self._append(responses[row], int(sampled[i]), float(sampled_logp[i]), sets.get(row), constraints, row, max_new_tokens)
            for row in running:
                response = responses[row]
                while not response.finished and _forced(constraints, row) and (self.fast_forward or not response.fed):
                    forced = constraints[row].allowed()
                    self._append(response, forced[0], 0.0, forced, constraints, row, max_new_tokens)
            if all(r.finished for r in responses):
                break
            # One pass over every row's new tokens (right-padded; padding is masked out).
            step = max(len(r.fed) for r in responses)
            fed = torch.full((len(prompts), step), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), step), dtype=torch.long)
            for row, response in enumerate(responses):
                fed[row, : len(response.fed)] = torch.tensor(response.fed, dtype=torch.long)
                mask[row, : len(response.fed)] = 1
            fed_positions = next_position[:, None] + torch.arange(step, device=device)[None, :]
            attention = torch.cat([attention, mask.to(device)], dim=1)
            out = self.model(input_ids=fed.to(device), attention_mask=attention, position_ids=fed_positions,
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            counts = mask.sum(-1).to(device)
            last_logits = out.logits[torch.arange(len(prompts), device=device), (counts - 1).clamp(min=0)]
            next_position = next_position + counts
        self.model.train(was_training)
        if self.prefix_cache:
            kept.extend(_kept_prefixes(prompts, responses, attention, cache))
        return [
            Generation(r.tokens, r.logprobs, self.tokenizer.decode(r.tokens, skip_special_tokens=True),
                       r.allowed if constraints is not None else None)
            for r in responses
        ]

    def _append(self, response: _Response, token: int, logp: float, allowed, constraints, row: int, budget: int) -> None:
        """Add one token to a response; it ends at the constraint's end (constrained), at
        EOS or ``</action>`` (free), or at ``budget`` tokens."""
        response.tokens.append(token)
        response.fed.append(token)
        response.logprobs.append(logp)
        if constraints is not None:  # the constraint alone ends the response
            response.allowed.append(allowed)
            constraints[row].advance(token)
            response.finished = constraints[row].done
        else:
            response.finished = token in self.eos_ids or STOP_STRING in self.tokenizer.decode(response.tokens[-8:])
        response.finished = response.finished or len(response.tokens) >= budget


@dataclass
class _Response:
    """A response being generated: its tokens so far and what the next pass feeds."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    allowed: list[list[int] | None] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Prefix:
    """A sequence whose KV cache is kept (``prefix_cache``): per layer ``[heads, len(ids), dim]``."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def _longest_shared_prefix(prompt: list[int], prefixes: list[_Prefix]) -> tuple[_Prefix | None, int]:
    """The kept sequence that shares the longest beginning with ``prompt``, and how many
    tokens they share (the whole kept sequence when a conversation turn extends it; the
    system text and task for a segment restart)."""
    best, best_length = None, 0
    for prefix in prefixes:
        length = _shared_length(prompt, prefix.ids)
        if length > best_length:
            best, best_length = prefix, length
    return best, best_length


def _shared_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


PREFILL_PADDING = 0.25  # a shared prefill pass computes at most this share of padding over its rows' tokens


def _prefill_buckets(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped into prefill passes: rows sorted by how many tokens they feed,
    each pass as large as its padding allows (on 2 CPU cores rows of unlike lengths each
    get a pass; a GPU batch of like prompts stays one pass)."""
    buckets: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lengths.__getitem__):
        bucket = buckets[-1] if buckets else []
        fed = sum(lengths[i] for i in bucket) + lengths[row]
        if bucket and (len(bucket) + 1) * lengths[row] <= (1 + PREFILL_PADDING) * fed:
            bucket.append(row)
        else:
            buckets.append([row])
    return buckets


def _batch_cache(rows: Sequence[_Prefix | None], lengths: list[int], width: int, config):
    """One batch KV cache of the first ``lengths[row]`` positions of each row's sequence
    (a row of length 0 may be None), left-padded with zeros to ``width`` positions."""
    from transformers.cache_utils import DynamicCache

    first = next(row for row in rows if row is not None)
    layers = []
    for layer in range(len(first.keys)):
        pair = []
        for kind in ("keys", "values"):
            like = getattr(first, kind)[layer]
            padded = like.new_zeros((len(rows), like.shape[0], width, like.shape[2]))
            for row, (sequence, n) in enumerate(zip(rows, lengths)):
                if n:
                    padded[row, :, width - n :] = getattr(sequence, kind)[layer][:, :n]
            pair.append(padded)
        layers.append(tuple(pair))
    return DynamicCache(ddp_cache_data=layers, config=config)


def _kept_prefixes(prompts, responses, attention: torch.Tensor, cache) -> list[_Prefix]:
    """Each row's sequence with KV in ``cache``: its prompt and the response tokens fed to
    the model (a last token sampled but never fed has none), padding left out."""
    kept = []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        valid = attention[row].bool()
        fed = int(valid.sum()) - len(prompt)
        kept.append(_Prefix(list(prompt) + response.tokens[:fed],
                            [layer.keys[row][:, valid] for layer in cache.layers],
                            [layer.values[row][:, valid] for layer in cache.layers]))
    return kept


def _forced(constraints, row: int) -> bool:
    """Whether the next token of ``row`` is the only one its constraint allows."""
    if constraints is None or constraints[row].done:
        return False
    allowed = constraints[row].allowed()
    return allowed is not None and len(allowed) == 1


def sampler_dtype(spec) -> str:
    """The sampler's weight dtype: ``rollout.dtype``, else the policy's (vLLM under bf16
    autocast: bfloat16)."""
    if spec.rollout.dtype is not None:
        return spec.rollout.dtype
    return "bfloat16" if spec.rollout.backend == "vllm" and spec.model.autocast == "bf16" else spec.model.dtype


def build_sampler(spec, policy, tokenizer, generator: torch.Generator, model_dir=None) -> Sampler:
    """The sampler ``rollout.backend`` names: transformers on ``policy``, or a vLLM engine
    started from ``model_dir`` (a transformers folder; its weights are replaced through
    ``update_weights``)."""
    if spec.rollout.backend == "vllm":
        from epo_cli.vllm_sampler import VLLMSampler

        options = spec.rollout.vllm
        return VLLMSampler(
            model_dir, generator, spec.rollout.max_prompt_tokens + spec.rollout.max_response_tokens,
            sampler_dtype(spec),
            options.gpu_memory_utilization, options.cpu_kv_cache_gb, options.enforce_eager, spec.train.seed,
        )
    return TransformersSampler(policy, tokenizer, spec.rollout.generation_batch_size, generator, spec.model.autocast,
                               spec.rollout.fast_forward,
                               prefix_cache=spec.rollout.prompt_format == "conversation" and spec.rollout.prefix_cache)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def restrict_logits(logits: torch.Tensor, allowed: dict[int, list[int] | None]) -> torch.Tensor:
    """``logits`` with every token outside ``allowed[row]`` set to -inf (rows whose set is
    None, or that are not in ``allowed``, keep the full vocabulary)."""
    restricted = logits.float().clone()
    for row, tokens in allowed.items():
        if tokens is not None:
            keep = restricted[row, tokens]
            restricted[row] = float("-inf")
            restricted[row, tokens] = keep
    return restricted


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``softmax(logits / T)`` (nucleus-filtered when
    ``top_p < 1``; greedy when ``T == 0``) by inverting its CDF at ``uniforms`` (one number
    in [0, 1) per row); return the tokens and their log-probs under the tempered
    distribution."""
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)
    # The first index whose CDF exceeds u * total: always a token of positive probability.
    token = torch.searchsorted(cdf, (uniforms[:, None] * cdf[:, -1:]).contiguous(), right=True).squeeze(-1)
    token = token.clamp(max=probs.shape[-1] - 1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


@dataclass
class Turn:
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    action: str | None
    turn_index: int
    sample_logprobs: list[float]
    allowed_tokens: list[list[int] | None] | None = None  # rollout.constrain: per token, see constrain.py
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


@dataclass(frozen=True)
class EpisodeStats:
    """What a list of episodes came to: the trainer's ``train/*`` and an evaluation's
    ``eval/SPLIT/*`` success, turn and invalid-action figures."""

    episodes: int
    successes: int
    mean_turns: float
    invalid_action_rate: float  # of all turns
    per_type: dict[str, tuple[int, int]]  # task type -> (successes, episodes), sorted by type

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.episodes, 1)


def episode_stats(episodes: Sequence[Episode]) -> EpisodeStats:
    """The figures of ``episodes`` (rates are 0 where there are no episodes or turns)."""
    return stats_of([(e.task.task_type, e.won, len(e.turns), e.invalid_turns) for e in episodes])


def stats_of(rows: Sequence[tuple[str, bool, int, int]]) -> EpisodeStats:
    """The figures of episodes given as (task type, won, turns, invalid turns): played ones,
    or ones read back from an episode file."""
    per_type: dict[str, tuple[int, int]] = {}
    for task_type, won, _, _ in rows:
        wins, n = per_type.get(task_type, (0, 0))
        per_type[task_type] = (wins + int(won), n + 1)
    turns = sum(row[2] for row in rows)
    return EpisodeStats(
        episodes=len(rows),
        successes=sum(bool(row[1]) for row in rows),
        mean_turns=turns / max(len(rows), 1),
        invalid_action_rate=sum(row[3] for row in rows) / max(turns, 1),
        per_type=dict(sorted(per_type.items())),
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
    drawn from the admissible actions (:mod:`epo_cli.constrain`).
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
            prompts, cuts = [], []
            for slot in active:
                if conversations is not None:
                    ids, cut = conversations[slot].prompt(states[slot], turn_index)
                else:
                    messages = build_prompt(envs.title, states[slot], turn_index, settings.max_turns, settings.history_length, settings.max_listed_actions)
                    ids, cut = encode_prompt(tokenizer, messages, settings.max_prompt_tokens, settings.on_overflow)
                prompts.append(ids)
                cuts.append(cut)
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
                if action is None:
                    turn.reward -= settings.invalid_action_penalty
                    observation = INVALID_FORMAT_OBSERVATION
                else:
                    result = results[slot]
                    turn.accepted = result.accepted
                    observation = result.observation
                    state.actions = result.actions
                    commands[slot] = result.commands
                    episode.done, episode.won, episode.score = result.done, result.won, result.score
                turn.score = episode.score
                episode.turns.append(turn)
                state.past_actions.append(action if action is not None else "(invalid)")
                state.past_observations.append(state.observation)
                state.observation = observation
                if episode.done or turn_index == settings.max_turns - 1:
                    turn.reward += settings.reward_scale * settings.outcome(episode)
                else:
                    still_active.append(slot)
            if on_turn is not None:
                on_turn(sum(len(g.token_ids) for g in generations), len(active))
            active = still_active
    finally:
        sampler.forget_prefixes()  # the weights may change before the next rollout
    return episodes
