"""The transformers rollout backend: a KV-cached sampling loop on the policy itself (any
device), with shared-prefix reuse across the turns of a conversation and constrained
decoding (``rollout.constrain``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from epo_cli.precision import autocast_context
from epo_cli.sampling.base import STOP_STRING, Generation


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
