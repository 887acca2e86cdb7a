"""Device precision: bf16 autocast for rollout and update matmuls (``model.autocast``);
log-probs, entropies and losses stay in fp32. And the probe of whether bf16 is native here."""

from __future__ import annotations

import contextlib

import torch


def autocast_context(mode: str, model):
    """``torch.autocast`` to bf16 on the model's device, or a no-op for ``"none"``."""
    if mode == "none":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices natively: a CUDA device that supports
    bf16, else a CPU with AVX512-BF16 or AMX (elsewhere torch emulates bf16, slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu API: absent means unknown
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
