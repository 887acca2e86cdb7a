"""Token log-probabilities and entropies, computed on response positions only."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Token entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v``."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def _chunk_logprobs_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.T).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


@functools.cache
def _compiled_chunk():
    """The chunk under ``torch.compile``: logsumexp, softmax-weighted sum and gather fuse,
    so the ``[chunk, vocab]`` softmax is never stored (compiled once, dynamic shapes)."""
    return torch.compile(_chunk_logprobs_entropy, dynamic=True)


def logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of its distribution, in one pass.

    ``hidden`` is ``[N, d]``: the final hidden states at the N positions that predict the
    N response tokens ``targets``. The LM head runs on ``chunk_tokens`` rows at a time and,
    when gradients are needed, each chunk is recomputed in the backward pass, so no
    ``[N, vocab]`` logits tensor is ever held for the whole batch. ``compiled`` runs each
    chunk through ``torch.compile``.
    """
    chunk = _compiled_chunk() if compiled else _chunk_logprobs_entropy
    logps, entropies = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start : start + chunk_tokens], lm_head_weight, targets[start : start + chunk_tokens], temperature)
        if needs_grad:
            logp, entropy = checkpoint(chunk, *args, use_reentrant=False)
        else:
            logp, entropy = chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)


def restricted_logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    allowed: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy under ``softmax(z / T)`` restricted to an allowed token set
    (constrained decoding, ``epo_cli/sampling/constrain.py``).

    ``allowed`` is ``[N, K]`` token ids padded with -1; each row's ``targets`` entry must
    be among its ids. Only the ``K`` allowed logits of each row are formed. A row with one
    allowed token (a forced token) has log-prob 0 and entropy 0 exactly, and no gradient.
    """
    valid = allowed >= 0
    ids = allowed.clamp(min=0)
    logits = torch.einsum("nd,nkd->nk", hidden, lm_head_weight[ids]).float() / temperature
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    target_column = (ids == targets[:, None]) & valid
    logp = logits.masked_fill(~target_column, 0.0).sum(-1) - lse
    weighted = (torch.softmax(logits, dim=-1) * logits.masked_fill(~valid, 0.0)).sum(-1)
    return logp, lse - weighted
