"""Per-token reference formulas of the EPO reference code's base (verl), written with
scalar ``math`` one token at a time: an independent statement to test the batched
tensor code against."""

import math


def dual_clip_token_loss(logp: float, old_logp: float, advantage: float, eps_low: float, eps_high: float, c: float) -> float:
    """verl ``compute_policy_loss`` for one token, with ``clip_ratio_c = c``:
    ``max(-r A, -clip(r) A)``, and for ``A < 0`` also at most ``-c A``."""
    ratio = math.exp(logp - old_logp)
    clipped_ratio = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
    loss = max(-ratio * advantage, -clipped_ratio * advantage)
    if advantage < 0:
        loss = min(loss, -c * advantage)
    return loss


def k3_token_kl(logp: float, ref_logp: float) -> float:
    """verl ``kl_penalty(..., "low_var_kl")`` for one token: ``d = ref - logp`` clamped to
    [-20, 20], ``k3 = exp(d) - d - 1`` clamped to [-10, 10]."""
    d = min(max(ref_logp - logp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1.0, -10.0), 10.0)
