"""What every rollout backend is (:class:`Sampler`) and returns (:class:`Generation`):
:mod:`epo_cli.sampling.transformers` and :mod:`epo_cli.sampling.vllm` implement it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from epo_cli.sampling.constrain import ResponseConstraint

STOP_STRING = "</action>"


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    # Per token, the set it was drawn from under rollout.constrain (None: full vocabulary).
    allowed: list[list[int] | None] | None = None


class Sampler(Protocol):
    """A rollout backend: token prompts in, sampled responses (tokens, their log-probs under
    the tempered distribution, text) out. Backends: :class:`epo_cli.sampling.transformers.TransformersSampler` and
    ``epo_cli.sampling.vllm.VLLMSampler``."""

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
