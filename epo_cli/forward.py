"""The training forward pass over turn samples: response log-probs, entropy and values.

The same pass serves both micro-batch layouts of :mod:`epo_cli.batch`: a sequence per turn,
or a packed sequence per segment holding several turns (``rollout.prompt_format:
conversation``); outputs are per turn either way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from epo_cli.algos.entropy import logprobs_and_entropy, restricted_logprobs_and_entropy
from epo_cli.batch import MicroBatch, forced_tokens


@dataclass
class TurnOutputs:
    """Per response token ``[B, R]`` (zero beyond each response) and per turn ``[B]``."""

    logp: torch.Tensor | None
    entropy: torch.Tensor | None
    values: torch.Tensor | None


def response_positions(micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(turn, its sequence, column-in-sequence, column-in-response) of every response token."""
    rows, cols = torch.nonzero(micro.response_mask, as_tuple=True)
    return rows, micro.turn_sequences[rows], micro.prompt_lengths[rows] + cols, cols


def forward_turns(
    model: nn.Module,
    micro: MicroBatch,
    temperature: float,
    chunk_tokens: int = 1024,
    value_head: nn.Module | None = None,
    with_logprobs: bool = True,
    compiled_head: bool = False,
) -> TurnOutputs:
    """Run the backbone once over the micro-batch's sequences; apply the LM head only at
    the response positions of its turns (the logits of prompt tokens are never formed) and
    the value head at each turn's last prompt token, ``V(s_t)``."""
    hidden = model.base_model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).last_hidden_state
    # The heads run in the weights' own dtype even under bf16 autocast (fp32 logits and values
    # from fp32 weights): they see response positions and turn ends only, a small share of the pass.
    with torch.autocast(hidden.device.type, enabled=False):
        return _heads(model, micro, hidden, temperature, chunk_tokens, value_head, with_logprobs, compiled_head)


def _heads(model, micro: MicroBatch, hidden: torch.Tensor, temperature: float, chunk_tokens: int,
           value_head: nn.Module | None, with_logprobs: bool, compiled_head: bool) -> TurnOutputs:
    """:func:`forward_turns` after the backbone: the LM head at response positions, the value
    head at each turn's last prompt token."""
    logp = entropy = values = None
    if with_logprobs:
        rows, sequences, seq_cols, resp_cols = response_positions(micro)
        head = model.get_output_embeddings().weight
        flat_logp, flat_entropy = response_logprobs_and_entropy(
            hidden[sequences, seq_cols - 1].to(head.dtype),
            head,
            micro.input_ids[sequences, seq_cols],
            micro.allowed[rows, resp_cols] if micro.allowed is not None else None,
            temperature,
            chunk_tokens,
            compiled_head,
        )
        shape = (len(micro.rows), micro.response_width)
        logp = torch.zeros(shape, dtype=flat_logp.dtype, device=hidden.device).index_put((rows, resp_cols), flat_logp)
        entropy = torch.zeros(shape, dtype=flat_entropy.dtype, device=hidden.device).index_put((rows, resp_cols), flat_entropy)
    if value_head is not None:
        last_prompt = hidden[micro.turn_sequences, micro.prompt_lengths - 1]
        values = value_head(last_prompt)
    return TurnOutputs(logp, entropy, values)


def response_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    allowed: torch.Tensor | None,
    temperature: float,
    chunk_tokens: int,
    compiled_head: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token: over the full vocabulary, or over its allowed set where
    ``allowed`` (``[N, K]``, -1-padded; all -1 = full vocabulary) constrains it."""
    if allowed is None:
        return logprobs_and_entropy(hidden, weight, targets, temperature, chunk_tokens, compiled_head)
    constrained = allowed[:, 0] >= 0
    free, choice = ~constrained, constrained & ~forced_tokens(allowed)
    # A forced token has log-prob 0 and entropy 0 exactly: it is left at zero.
    logp = hidden.new_zeros(len(targets), dtype=torch.float32)
    entropy = hidden.new_zeros(len(targets), dtype=torch.float32)
    logp[free], entropy[free] = logprobs_and_entropy(
        hidden[free], weight, targets[free], temperature, chunk_tokens, compiled_head
    )
    picked = choice.nonzero().flatten()
    width = int((allowed[picked] >= 0).sum(-1).max()) if len(picked) else 0
    for start in range(0, len(picked), chunk_tokens):
        rows = picked[start : start + chunk_tokens]
        logp[rows], entropy[rows] = restricted_logprobs_and_entropy(
            hidden[rows], weight, allowed[rows, :width], targets[rows], temperature
        )
    return logp, entropy


class TurnScorer(nn.Module):
    """A backbone and, optionally, its value head as one module, so that DDP and FSDP2
    see one ``forward`` per micro-batch (their hooks run on ``__call__``)."""

    def __init__(self, model: nn.Module, value_head: nn.Module | None = None, compiled_head: bool = False):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.compiled_head = compiled_head

    def forward(
        self, micro: MicroBatch, temperature: float = 1.0, chunk_tokens: int = 1024, with_logprobs: bool = True
    ) -> TurnOutputs:
        return forward_turns(self.model, micro, temperature, chunk_tokens, self.value_head, with_logprobs, self.compiled_head)
