"""Turn samples: one training sample per turn, padded into micro-batches on demand.

A micro-batch holds one right-padded token sequence per row: a turn's ``prompt +
response`` (:func:`collate`), or, in the packed update (``rollout.prompt_format:
conversation``), a whole segment of an episode, whose sequence holds every turn of it
(:func:`pack`). Either way its per-turn fields (response spans, allowed sets) are per turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from epo_cli.rollout import Episode


FILLED_IN_LATER = frozenset({"old_logp", "ref_logp", "values", "advantages", "returns"})


@dataclass
class TurnBatch:
    """The turns of a step's episodes, ordered by episode then turn. Only the fields of
    :data:`FILLED_IN_LATER` may be assigned after construction (``dataclasses.replace``
    makes a changed copy)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    episode_ids: torch.Tensor
    group_ids: torch.Tensor
    turn_index: torch.Tensor
    rewards: torch.Tensor
    sample_logp: list[torch.Tensor] | None = None  # the sampler's own log-probs, per turn
    allowed: list[list[list[int] | None] | None] | None = None  # rollout.constrain: per turn, per token
    # The batch-wide segment of each turn: the turns of a segment (rollout.prompt_format:
    # conversation, see epo_cli.prompts) are prefixes of one token sequence, the last
    # one's prompt + response. None: every turn is a segment of its own.
    segment_ids: torch.Tensor | None = None
    # The environment state each turn answered, as ids of its observation text (equal text,
    # equal id): GiGPO's anchor states. None where a batch is not built from episodes.
    state_ids: torch.Tensor | None = None
    # Filled in by the trainer before the update.
    old_logp: list[torch.Tensor] | None = None
    ref_logp: list[torch.Tensor] | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @classmethod
    def from_episodes(cls, episodes: list[Episode]) -> TurnBatch:
        turns = [(episode, turn) for episode in episodes for turn in episode.turns]
        keys = [(e.episode_id, "turn", t.turn_index) if t.segment is None else (e.episode_id, t.segment) for e, t in turns]
        segment_of = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # ids in row order
        state_of = {text: i for i, text in enumerate(dict.fromkeys(t.observation for _, t in turns))}
        return cls(
            prompt_ids=[turn.prompt_ids for _, turn in turns],
            response_ids=[turn.response_ids for _, turn in turns],
            episode_ids=torch.tensor([e.episode_id for e, _ in turns], dtype=torch.long),
            group_ids=torch.tensor([e.group_id for e, _ in turns], dtype=torch.long),
            turn_index=torch.tensor([t.turn_index for _, t in turns], dtype=torch.long),
            rewards=torch.tensor([t.reward for _, t in turns], dtype=torch.float32),
            sample_logp=[torch.tensor(t.sample_logprobs, dtype=torch.float32) for _, t in turns],
            allowed=[t.allowed_tokens for _, t in turns] if any(t.allowed_tokens for _, t in turns) else None,
            segment_ids=torch.tensor([segment_of[key] for key in keys], dtype=torch.long),
            state_ids=torch.tensor([state_of[t.observation] for _, t in turns], dtype=torch.long),
        )

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__ and name not in FILLED_IN_LATER:
            raise AttributeError(f"TurnBatch.{name} is fixed once the batch is built")
        super().__setattr__(name, value)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def sequence_length(self, row: int) -> int:
        return len(self.prompt_ids[row]) + len(self.response_ids[row])

    def segments(self) -> list[list[int]]:
        """The rows of each segment, by segment id, each in row (turn) order."""
        if self.segment_ids is None:
            return [[row] for row in range(len(self))]
        rows: dict[int, list[int]] = {}
        for row, segment in enumerate(self.segment_ids.tolist()):
            rows.setdefault(segment, []).append(row)
        return [rows[segment] for segment in sorted(rows)]

    def response_mask(self, rows: list[int], width: int | None = None) -> torch.Tensor:
        lengths = torch.tensor([len(self.response_ids[r]) for r in rows])
        width = int(lengths.max()) if width is None else width
        return (torch.arange(width)[None, :] < lengths[:, None]).float()

    def decision_mask(self, rows: list[int]) -> torch.Tensor:
        """:meth:`response_mask` without forced tokens (an allowed set of one, under
        ``rollout.constrain``): they are no decision of the policy, so they carry no loss
        weight and do not count in the entropy statistics."""
        mask = self.response_mask(rows)
        if self.allowed is not None:
            for i, row in enumerate(rows):
                for j, allowed in enumerate(self.allowed[row] or []):
                    if allowed is not None and len(allowed) == 1:
                        mask[i, j] = 0.0
        return mask

    def padded(self, per_row: list[torch.Tensor], rows: list[int], width: int) -> torch.Tensor:
        """Stack per-turn token vectors of ``rows`` into ``[len(rows), width]``, zero-padded."""
        out = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            values = per_row[row][:width]
            out[i, : len(values)] = values
        return out


@dataclass
class MicroBatch:
    """Right-padded token sequences ``[S, W]`` and where the response tokens of its ``B``
    turns are: turn ``i``'s response starts at column ``prompt_lengths[i]`` of sequence
    ``sequence_rows[i]``."""

    rows: list[int]  # the turns (TurnBatch rows)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor  # [B]
    response_lengths: torch.Tensor  # [B]
    # ``[B, R, K]`` allowed token ids of each response token, -1-padded; a row of all -1
    # is the full vocabulary. None: no constrained token in the micro-batch.
    allowed: torch.Tensor | None = None
    # [B] the sequence of each turn; None: one sequence per turn, in order.
    sequence_rows: torch.Tensor | None = None

    @property
    def turn_sequences(self) -> torch.Tensor:
        """``sequence_rows``, filled in."""
        if self.sequence_rows is not None:
            return self.sequence_rows
        return torch.arange(len(self.rows), device=self.input_ids.device)

    @property
    def response_width(self) -> int:
        return int(self.response_lengths.max()) if len(self.rows) else 0

    @property
    def response_mask(self) -> torch.Tensor:
        positions = torch.arange(self.response_width, device=self.response_lengths.device)
        return (positions[None, :] < self.response_lengths[:, None]).float()

    @property
    def decision_mask(self) -> torch.Tensor:
        """The response mask without forced tokens (see :meth:`TurnBatch.decision_mask`)."""
        if self.allowed is None:
            return self.response_mask
        return self.response_mask * (~forced_tokens(self.allowed)).float()

    def to(self, device: torch.device) -> MicroBatch:
        if self.input_ids.device == device:
            return self
        tensors = (self.input_ids, self.attention_mask, self.prompt_lengths, self.response_lengths, self.allowed,
                   self.sequence_rows)
        return MicroBatch(self.rows, *(t.to(device, non_blocking=True) if t is not None else None for t in tensors))


def forced_tokens(allowed: torch.Tensor) -> torch.Tensor:
    """True where a -1-padded allowed set (last dimension) holds exactly one token."""
    return (allowed >= 0).sum(-1) == 1


def collate(batch: TurnBatch, rows: list[int], pad_id: int) -> MicroBatch:
    """One right-padded ``prompt + response`` sequence per turn of ``rows``."""
    return pack(batch, [[row] for row in rows], pad_id)


def pack(batch: TurnBatch, segments: list[list[int]], pad_id: int) -> MicroBatch:
    """One right-padded sequence per segment (its turns' rows, in turn order): the last
    turn's ``prompt + response``, of which every earlier turn's ``prompt + response`` must
    be a prefix. Sequences never share a row, so attention never crosses a segment."""
    sequences = [batch.prompt_ids[rows[-1]] + batch.response_ids[rows[-1]] for rows in segments]
    for rows, sequence in zip(segments, sequences):
        for row in rows[:-1]:
            prompt, response = batch.prompt_ids[row], batch.response_ids[row]
            end = len(prompt) + len(response)
            if sequence[: len(prompt)] != prompt or sequence[len(prompt) : end] != response:
                raise ValueError(f"turn sample {row}: its prompt and response are no prefix of its segment's sequence")
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention[i, : len(sequence)] = 1
    rows = [row for segment in segments for row in segment]
    return MicroBatch(
        rows=rows,
        input_ids=input_ids,
        attention_mask=attention,
        prompt_lengths=torch.tensor([len(batch.prompt_ids[r]) for r in rows]),
        response_lengths=torch.tensor([len(batch.response_ids[r]) for r in rows]),
        allowed=_allowed_tensor(batch, rows),
        sequence_rows=torch.tensor([i for i, segment in enumerate(segments) for _ in segment]),
    )


def _allowed_tensor(batch: TurnBatch, rows: list[int]) -> torch.Tensor | None:
    """The ``[B, R, K]`` allowed-set tensor of :class:`MicroBatch`, or None."""
    per_row = [batch.allowed[r] or [] for r in rows] if batch.allowed is not None else []
    sets = [s for row in per_row for s in row if s is not None]
    if not sets:
        return None
    width = max(len(batch.response_ids[r]) for r in rows)
    out = torch.full((len(rows), width, max(len(s) for s in sets)), -1, dtype=torch.long)
    for i, (row, row_sets) in enumerate(zip(rows, per_row)):
        for j, allowed in enumerate(row_sets):
            if allowed is not None:
                if batch.response_ids[row][j] not in allowed:
                    raise ValueError(f"turn sample {row}: response token {j} is outside the set it was drawn from")
                out[i, j, : len(allowed)] = torch.tensor(allowed, dtype=torch.long)
    return out


def minibatch_count(turns: int, units: list[list[int]], size: int) -> int:
    """Mini-batches per epoch: as many as ``turns`` in slices of ``size`` turns make (at
    most one per unit)."""
    return min(math.ceil(turns / size), len(units))


def unit_minibatches(units: list[list[int]], turns: int, size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's mini-batches of unit indices, in a fresh random order: slices of
    ``size`` units when every unit is one turn, else :func:`minibatch_count` mini-batches
    of whole units (segments), as even in unit count as can be."""
    order = torch.randperm(len(units), generator=generator)
    if all(len(unit) == 1 for unit in units):
        return [order[start : start + size].tolist() for start in range(0, len(order), size)]
    return [part.tolist() for part in order.tensor_split(minibatch_count(turns, units, size))]


def length_sorted_chunks(batch: TurnBatch, rows: list[int], size: int, length=None) -> list[list[int]]:
    """Split ``rows`` into micro-batches of similar length to cut padding waste (``length``
    of an item: its sequence's by default, for items that are rows)."""
    ordered = sorted(rows, key=length or batch.sequence_length)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def unit_chunks(batch: TurnBatch, units: list[list[int]], chosen: list[int], size: int) -> list[list[int]]:
    """The ``chosen`` unit indices in length-sorted micro-batches of ``size`` (a unit's
    length: its sequence's, the last turn's prompt + response)."""
    return length_sorted_chunks(batch, chosen, size, lambda unit: batch.sequence_length(units[unit][-1]))
