"""What every rollout backend returns (``epo_cli.rollout``, ``epo_cli.vllm_sampler``)."""

from __future__ import annotations

from dataclasses import dataclass

STOP_STRING = "</action>"


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    # Per token, the set it was drawn from under rollout.constrain (None: full vocabulary).
    allowed: list[list[int] | None] | None = None
