"""Advantage estimators over the turns of multi-turn episodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TurnRewards:
    """What an estimator reads, one entry per turn sample, ordered by episode then turn."""

    rewards: torch.Tensor  # [N], the turn's reward (the final one on the last turn)
    episode_ids: torch.Tensor  # [N]
    group_ids: torch.Tensor  # [N], the task instance the episode played
    values: torch.Tensor | None = None  # [N], the critic's V(s_t) (estimators that need one)
    state_ids: torch.Tensor | None = None  # [N], the state each turn answered (equal id: equal observation)


def episode_returns(turns: TurnRewards) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each episode's return ``R_j``, its group, each turn's episode index), episodes in
    order of first appearance's id."""
    episodes, episode_of_turn = torch.unique(turns.episode_ids, return_inverse=True)
    returns = torch.zeros(len(episodes)).index_add(0, episode_of_turn, turns.rewards.float())
    groups = torch.zeros(len(episodes), dtype=torch.long).scatter(0, episode_of_turn, turns.group_ids)
    return returns, groups, episode_of_turn


def gae_estimator(turns: TurnRewards, algo) -> tuple[torch.Tensor, torch.Tensor]:
    """``algo.advantage: gae``: :func:`gae_over_turns` with ``algo.gamma``, ``algo.lam``,
    then :func:`whiten` with ``algo.whiten_advantages``; returns the critic's targets too."""
    advantages, returns = gae_over_turns(turns.rewards, turns.values, turns.episode_ids, algo.gamma, algo.lam)
    return (whiten(advantages) if algo.whiten_advantages else advantages), returns


def grpo_estimator(turns: TurnRewards, algo) -> tuple[torch.Tensor, None]:
    """``algo.advantage: grpo``: :func:`grpo_advantages` of the episodes' returns, given to
    each of an episode's turns."""
    returns, groups, episode_of_turn = episode_returns(turns)
    return grpo_advantages(returns, groups)[episode_of_turn], None


def gae_over_turns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    episode_ids: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE where one time step is one turn; returns (advantages, returns), each ``[N]``.

    Samples are turns ordered by episode then turn. The last turn of an episode is
    terminal (no bootstrap), so with ``gamma = lam = 1`` the advantage is
    ``A_t = sum_{t' >= t} r_t' - V(s_t)``: the paper's ``R_j - V(s_t)``.
    """
    advantages = torch.zeros_like(values, dtype=torch.float32)
    next_value, next_advantage = 0.0, 0.0
    for i in range(len(rewards) - 1, -1, -1):
        if i == len(rewards) - 1 or episode_ids[i + 1] != episode_ids[i]:
            next_value, next_advantage = 0.0, 0.0
        delta = rewards[i] + gamma * next_value - values[i]
        advantages[i] = delta + gamma * lam * next_advantage
        next_value, next_advantage = values[i], advantages[i]
    return advantages, advantages + values.float()


def grpo_advantages(returns: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``A_j = (R_j - mean_g R) / (std_g R + eps)`` over episodes of one task instance.

    ``std`` is the unbiased sample standard deviation, as in GRPO and verl. A group of one
    episode, like a group whose episodes all have the same return, has ``A = 0`` exactly:
    no policy-gradient signal (the entropy terms still apply). The spec refuses
    ``rollout.group_size < 2`` for GRPO.
    """
    advantages = torch.zeros_like(returns, dtype=torch.float32)
    for group in torch.unique(group_ids):
        members = group_ids == group
        group_returns = returns[members].float()
        std = group_returns.std() if members.sum() > 1 else torch.tensor(0.0)
        advantages[members] = (group_returns - group_returns.mean()) / (std + eps)
    return advantages


def rloo_advantages(returns: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740): each episode's
    return against the mean of the *other* episodes of its group,
    ``A_j = R_j - (sum_g R - R_j) / (G - 1)``, not scaled by a std. A group of one has ``A = 0``."""
    advantages = torch.zeros_like(returns, dtype=torch.float32)
    for group in torch.unique(group_ids):
        members = group_ids == group
        size = int(members.sum())
        if size > 1:
            group_returns = returns[members].float()
            advantages[members] = group_returns - (group_returns.sum() - group_returns) / (size - 1)
    return advantages


def groups_with_signal(returns: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per episode: whether its group's returns differ, i.e. whether :func:`grpo_advantages`
    gives the group any non-zero advantage. DAPO's dynamic sampling (arXiv 2503.14476,
    ``algo.filter_groups``) keeps only these groups."""
    keep = torch.zeros(len(returns), dtype=torch.bool)
    for group in torch.unique(group_ids):
        members = group_ids == group
        keep[members] = bool(returns[members].max() > returns[members].min())
    return keep


def rloo_estimator(turns: TurnRewards, algo) -> tuple[torch.Tensor, None]:
    """``algo.advantage: rloo``: :func:`rloo_advantages` of the episodes' returns, on every turn."""
    returns, groups, episode_of_turn = episode_returns(turns)
    return rloo_advantages(returns, groups)[episode_of_turn], None


def reinforce_pp_estimator(turns: TurnRewards, algo) -> tuple[torch.Tensor, None]:
    """``algo.advantage: reinforce++`` (REINFORCE++, Hu et al. 2025, arXiv 2501.03262): the
    episodes' returns whitened over the whole batch (each episode once), no critic and no
    group baseline, on every turn. The paper's token-level KL penalty in the reward is here
    the loss's KL term (``algo.kl_coef``), since advantages are per turn, not per token."""
    returns, _, episode_of_turn = episode_returns(turns)
    return whiten(returns)[episode_of_turn], None


def discounted_returns(rewards: torch.Tensor, episode_ids: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma G_{t+1}`` within each episode (turns ordered by episode then turn)."""
    returns = torch.zeros(len(rewards), dtype=torch.float32)
    following = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        if i == len(rewards) - 1 or episode_ids[i + 1] != episode_ids[i]:
            following = 0.0
        following = float(rewards[i]) + gamma * following
        returns[i] = following
    return returns


def anchor_state_advantages(step_returns: torch.Tensor, group_ids: torch.Tensor, state_ids: torch.Tensor,
                            eps: float = 1e-6) -> torch.Tensor:
    """GiGPO's step-level advantage: among the turns of one group that answered the same
    state (an anchor state), each turn's discounted return against their mean, over their
    std. A state met once in its group gives 0; equal states of different groups are not pooled."""
    advantages = torch.zeros(len(step_returns), dtype=torch.float32)
    for key in torch.unique(torch.stack([group_ids, state_ids], dim=1), dim=0):
        members = (group_ids == key[0]) & (state_ids == key[1])
        if members.sum() > 1:
            cluster = step_returns[members]
            advantages[members] = (cluster - cluster.mean()) / (cluster.std() + eps)
    return advantages


def gigpo_estimator(turns: TurnRewards, algo) -> tuple[torch.Tensor, None]:
    """``algo.advantage: gigpo`` (GiGPO, Feng et al. 2025, arXiv 2505.10978): GRPO's
    episode-level advantage plus ``algo.gigpo_step_weight`` (paper: 1) times the step-level
    :func:`anchor_state_advantages` of the returns discounted by ``algo.gigpo_gamma``
    (paper: 0.95); anchor states are turns with the same observation text."""
    if turns.state_ids is None:
        raise ValueError("algo.advantage: gigpo needs the turns' states (a batch built from episodes)")
    episode_level, _ = grpo_estimator(turns, algo)
    step_returns = discounted_returns(turns.rewards, turns.episode_ids, algo.gigpo_gamma)
    step_level = anchor_state_advantages(step_returns, turns.group_ids, turns.state_ids)
    return episode_level + algo.gigpo_step_weight * step_level, None


def whiten(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the batch."""
    if values.numel() < 2:
        return values - values.mean()
    return (values - values.mean()) / (values.std() + eps)


def entropy_shaped_advantages(
    advantages: torch.Tensor, entropy: torch.Tensor, psi: float, kappa: float
) -> torch.Tensor:
    """The EA baseline (Cheng et al. 2025): ``A' = A + min(psi * H.detach(), |A| / kappa)``.

    The bonus is at most ``|A| / kappa``: a zero advantage (a GRPO group of one, or with
    equal returns) stays zero."""
    return advantages + torch.minimum(psi * entropy.detach(), advantages.abs() / kappa)
