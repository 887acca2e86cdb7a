"""Device precision: bf16 autocast for rollout and update matmuls (``model.autocast``);
log-probs, entropies and losses stay in fp32."""

from __future__ import annotations

import contextlib

import torch


def autocast_context(mode: str, model):
    """``torch.autocast`` to bf16 on the model's device, or a no-op for ``"none"``."""
    if mode == "none":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
