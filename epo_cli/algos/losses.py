"""The terms of the objective; :func:`epo_cli.algos.objective.epo_loss`
assembles them (Eq. 6). Per-token tensors are ``[N, L]`` with a mask.

Every loss is a weighted token sum ``sum(x * weights)``; :func:`token_weights` makes the
weights of an aggregation mode sum to 1 over a mini-batch, so summing the losses of its
micro-batches gives exactly the mini-batch loss.
"""

from __future__ import annotations

import math

import torch


def token_weights(mask: torch.Tensor, episode_ids: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights of an aggregation, summing to 1 over the batch.

    - ``traj-mean`` (paper, Eq. 2): mean over the tokens of a turn, then over the turns
      of a trajectory, then over trajectories.
    - ``token-mean`` (reference code): flat mean over all response tokens.
    """
    mask = mask.float()
    if mode == "token-mean":
        return mask / mask.sum().clamp(min=1.0)
    if mode != "traj-mean":
        raise ValueError(f"unknown loss aggregation {mode!r}")
    tokens_per_turn = mask.sum(-1).clamp(min=1.0)
    _, episode_index, turns_per_episode = torch.unique(episode_ids, return_inverse=True, return_counts=True)
    n_episodes = len(turns_per_episode)
    turn_weight = 1.0 / (turns_per_episode[episode_index].float() * n_episodes)
    return mask * (turn_weight / tokens_per_turn).unsqueeze(-1)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_clip = agg max(-r A, -clip(r, 1-eps_low, 1+eps_high) A)``, ``r = exp(logp - old)``.

    ``is_weights`` (detached, per token) scale each token's term of the loss, not the stats
    (:func:`truncated_is_weights`).

    ``dual_clip_c`` (dual-clip PPO, verl's ``clip_ratio_c``): a token with ``A < 0`` has
    its loss capped at ``-c A``, so a large ratio on it cannot dominate (no gradient there).
    Stats: ``clipfrac`` (the ratio clip is active), ``dual_clipfrac`` (the cap is active),
    ``approx_kl = agg 0.5 (logp - old)^2``, the second-order ("k2") estimate of
    ``KL(pi_old || pi)`` (a diagnostic, not in the loss), and the loss of the tokens with
    ``A > 0`` and with ``A < 0`` apart (``pos_adv_loss``, ``neg_adv_loss``): with whole
    GRPO groups at ratio 1 they cancel in the loss, but each is 0 only without signal.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip_c is not None:
        cap = -dual_clip_c * advantages
        dual = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    loss = (per_token * (weights if is_weights is None else weights * is_weights)).sum()
    with torch.no_grad():
        stats = {
            "clipfrac": ((clipped > unclipped).float() * weights).sum(),
            "dual_clipfrac": (dual.float() * weights).sum(),
            "approx_kl": (0.5 * (logp - old_logp) ** 2 * weights).sum(),
            "pos_adv_loss": (per_token * weights * (advantages > 0)).sum(),
            "neg_adv_loss": (per_token * weights * (advantages < 0)).sum(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    sample_weights: torch.Tensor,
    clip: float = 0.5,
) -> torch.Tensor:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, per turn sample."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    per_sample = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_sample * sample_weights).sum()


def truncated_is_weights(old_logp: torch.Tensor, sample_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(pi_old / pi_sampler, C)`` per token (detached), for
    a sampler whose numerics differ from the trainer's (a bf16 copy, vLLM): they make the
    surrogate's expectation under the sampler's tokens that under ``pi_old``'s, up to the
    truncation (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; verl's TIS)."""
    return torch.exp(old_logp - sample_logp).clamp(max=cap).detach()


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of ``KL(pi || pi_ref)`` as verl's ``low_var_kl``: ``k3 = exp(d) - d - 1``
    with ``d = ref - logp`` clamped to [-20, 20], then ``k3`` clamped to [-10, 10]."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)
    k3 = (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10, 10)
    return (k3 * weights).sum()


def trajectory_entropy(entropy: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``L_H`` of Eq. 2: token entropy aggregated over turns and trajectories."""
    return (entropy * weights).sum()


def entropy_corridor_penalty(
    entropy: torch.Tensor,
    reference: torch.Tensor | float,
    kappa_l: float,
    kappa_r: float,
    alpha: float,
    form: str = "hinge",
) -> torch.Tensor:
    """Per-token smoothing penalty around the corridor ``[kappa_l Hbar, kappa_r Hbar]``.

    ``hinge`` (Eq. 4): ``alpha * (relu(kappa_l Hbar - H) + relu(H - kappa_r Hbar))``, whose
    gradient pushes entropy back into the corridor. ``indicator`` (the released code):
    ``alpha * 1[H outside corridor]``, a constant with zero gradient.
    """
    low = kappa_l * reference
    high = kappa_r * reference
    if form == "hinge":
        return alpha * (torch.relu(low - entropy) + torch.relu(entropy - high))
    if form == "indicator":
        outside = (entropy < low) | (entropy > high)
        return alpha * outside.to(entropy.dtype)
    raise ValueError(f"unknown penalty form {form!r}")


def beta_schedule(step: int, total_steps: int, gamma: float = 3.0) -> float:
    """Eq. 5: ``beta_k = 1 + exp(-gamma * k / k_mid)``, ``k_mid = floor(K / 2)``."""
    k_mid = max(total_steps // 2, 1)
    return 1.0 + math.exp(-gamma * step / k_mid)


def entropy_coef_schedule(coef: float, step: int, total_steps: int, schedule: str, rate: float = 5.0) -> float:
    """EPO-Decay's training-step decay of ``lambda``: none, linear to 0, or ``exp(-rate k/K)``."""
    if schedule == "none":
        return coef
    progress = step / max(total_steps, 1)
    if schedule == "linear":
        return coef * max(0.0, 1.0 - progress)
    if schedule == "exponential":
        return coef * math.exp(-rate * progress)
    raise ValueError(f"unknown entropy schedule {schedule!r}")


def turn_decay_coef(coef: float, turn_index: torch.Tensor, decay: float | None) -> torch.Tensor:
    """EPO-Decay's per-turn weight ``lambda_t = lambda * d**t`` (constant without decay)."""
    base = torch.full(turn_index.shape, coef, dtype=torch.float32, device=turn_index.device)
    return base if decay is None else base * decay ** turn_index.float()
