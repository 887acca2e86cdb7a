"""The EPO objective of one micro-batch: the only place the loss is assembled. The learner
and the benchmarks both call :func:`epo_loss` (docs/algorithm.md).

``L_EPO = L_MT - lambda_k * (L_H - beta_k * L_smooth)`` (Eq. 6), where ``L_MT`` is the
PPO/GRPO clipped surrogate (dual clip, optional KL to a reference and critic loss), ``L_H``
the trajectory entropy (Eq. 2), ``L_smooth`` the corridor hinge around ``Hbar_W``
(Eq. 3-4) and ``beta_k`` the phase weight (Eq. 5). Every term is a token sum with the
aggregation weights of :func:`token_weights` (Eq. 2's nesting), which sum to 1 over a
mini-batch, so the losses of its micro-batches add up to the mini-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from epo_cli.algos.advantages import entropy_shaped_advantages
from epo_cli.algos.losses import (
    beta_schedule,
    entropy_coef_schedule,
    entropy_corridor_penalty,
    low_var_kl,
    ppo_clip_loss,
    trajectory_entropy,
    truncated_is_weights,
    turn_decay_coef,
    value_loss,
)

if TYPE_CHECKING:
    from epo_cli.spec import AlgoSpec, EPOSpec


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of RL step ``k``: ``lambda_k`` and ``beta_k``."""

    entropy_coef: float
    beta: float


def step_coefficients(epo: EPOSpec, step: int, total_steps: int) -> StepCoefficients:
    """``beta_k = 1 + exp(-gamma k / k_mid)`` (Eq. 5; ``k`` counts RL steps from 0, ``K`` is
    ``train.steps``) or the no-dw ablation's constant; ``lambda_k`` is ``epo.entropy_coef``,
    decayed over steps only by EPO-Decay's schedule."""
    weighting = epo.weighting
    beta = beta_schedule(step, total_steps, weighting.gamma) if weighting.dynamic else weighting.constant_beta
    coef = entropy_coef_schedule(epo.entropy_coef, step, total_steps, epo.decay.step_schedule, epo.decay.step_rate)
    return StepCoefficients(coef, beta)


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's loss inputs that do not depend on the trained parameters: per
    token ``[B, L]`` (zero beyond each response) or per turn sample ``[B]``."""

    weights: torch.Tensor  # [B, L] aggregation weights (token_weights of the mini-batch)
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor  # [B, L]
    turn_index: torch.Tensor  # [B], EPO-Decay's lambda_t
    ref_logp: torch.Tensor | None = None  # [B, L], the frozen reference policy (KL term)
    entropy_ref: torch.Tensor | float | None = None  # Hbar_W (Eq. 3): scalar or [B]; None at step 0
    old_values: torch.Tensor | None = None  # [B], PPO critic before the update
    returns: torch.Tensor | None = None  # [B], PPO critic targets
    sample_logp: torch.Tensor | None = None  # [B, L], the sampler's log-probs (algo.tis_cap)


@dataclass(frozen=True)
class EPOLoss:
    """Eq. 6 of one micro-batch: ``loss`` is exactly the sum of its differentiable parts
    (each a weighted token sum), which a caller may also differentiate one by one."""

    loss: torch.Tensor
    pg: torch.Tensor  # L_MT's policy part: the clipped surrogate + kl_coef * KL to the reference
    entropy_bonus: torch.Tensor  # -lambda_k L_H (Eq. 2; lambda_t per turn under EPO-Decay)
    smoothing: torch.Tensor | None  # +lambda_k beta_k L_smooth (Eq. 3-5); None when off or at step 0
    value: torch.Tensor | None  # vf_coef * the critic loss (PPO)
    metrics: dict[str, torch.Tensor]  # detached, each a weighted token sum like the loss


def epo_loss(
    inputs: LossInputs,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    algo: AlgoSpec,
    epo: EPOSpec,
    coefs: StepCoefficients,
    values: torch.Tensor | None = None,
) -> EPOLoss:
    """Eq. 6 on top of the base objective, for the policy's ``logp`` and ``entropy``
    (``[B, L]``, differentiable) and, for PPO, the critic's ``values`` (``[B]``).

    ``entropy_ref`` None (step 0, no history) or ``epo.smoothing.enabled`` False gives
    ``L_smooth = 0``: Eq. 2's ``L_ER = L_MT - lambda L_H`` (EPO-Base).
    """
    w = inputs.weights
    advantages = inputs.advantages[:, None].expand_as(logp)
    if epo.entropy_advantage.enabled:  # the EA baseline
        advantages = entropy_shaped_advantages(advantages, entropy, epo.entropy_advantage.psi, epo.entropy_advantage.kappa)
    tis = None  # the sampler correction of the surrogate's tokens
    if algo.tis_cap is not None and inputs.sample_logp is not None:
        tis = truncated_is_weights(inputs.old_logp, inputs.sample_logp, algo.tis_cap)
    pg_loss, pg_stats = ppo_clip_loss(
        logp, inputs.old_logp, advantages, w, algo.clip_eps_low, algo.clip_eps_high, algo.dual_clip_c, tis
    )
    metrics = {
        "actor/pg_loss": pg_loss.detach(),
        "actor/pg_loss_pos_adv": pg_stats["pos_adv_loss"],
        "actor/pg_loss_neg_adv": pg_stats["neg_adv_loss"],
        "actor/clipfrac": pg_stats["clipfrac"],
        "actor/approx_kl": pg_stats["approx_kl"],
    }
    if tis is not None:
        metrics["actor/tis_weight"] = (tis * w).sum()
        metrics["actor/tis_truncated_frac"] = ((tis >= algo.tis_cap).float() * w).sum()
    if algo.dual_clip_c is not None:
        metrics["actor/dual_clipfrac"] = pg_stats["dual_clipfrac"]
    pg = pg_loss
    if inputs.ref_logp is not None:
        kl = low_var_kl(logp, inputs.ref_logp, w)
        pg = pg + algo.kl_coef * kl
        metrics["actor/kl_ref"] = kl.detach()

    token_coef = turn_decay_coef(coefs.entropy_coef, inputs.turn_index, epo.decay.turn_decay)[:, None]
    entropy_bonus = -(token_coef * entropy * w).sum()  # -lambda L_H (Eq. 2)
    loss = pg + entropy_bonus
    metrics["actor/entropy_loss_term"] = trajectory_entropy(entropy.detach(), w)
    smoothing = epo.smoothing
    smooth = None
    if smoothing.enabled and inputs.entropy_ref is not None:
        ref = inputs.entropy_ref
        ref = ref[:, None] if torch.is_tensor(ref) else ref
        penalty = entropy_corridor_penalty(entropy, ref, smoothing.kappa_l, smoothing.kappa_r, smoothing.alpha, smoothing.form)
        smooth = (token_coef * coefs.beta * penalty * w).sum()  # +lambda beta_k L_smooth (Eq. 4-6)
        loss = loss + smooth
        outside = ((entropy < smoothing.kappa_l * ref) | (entropy > smoothing.kappa_r * ref)).float()
        metrics["epo/smooth_penalty"] = (penalty.detach() * w).sum()
        metrics["epo/out_of_corridor_frac"] = (outside * w).sum()

    v_term = None
    if values is not None:
        v_loss = value_loss(values, inputs.old_values, inputs.returns, w.sum(-1), algo.value_clip)
        v_term = algo.vf_coef * v_loss
        loss = loss + v_term
        metrics["critic/value_loss"] = v_loss.detach()
    metrics["actor/loss"] = loss.detach()
    return EPOLoss(loss, pg, entropy_bonus, smooth, v_term, metrics)
