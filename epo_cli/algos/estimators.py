"""Advantage estimators by name (``algo.advantage``): one function in
:mod:`epo_cli.algos.advantages` and one entry here. The table imports no torch, so the spec
can check a name without loading the math; :func:`estimator` loads the function."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class EstimatorInfo:
    """``function``: ``module:name`` of ``f(turns: TurnRewards, algo: AlgoSpec) -> (advantages, returns)``
    (per-turn tensors; ``returns`` the critic's targets, None without a critic)."""

    function: str
    needs_critic: bool  # a value model is trained beside the policy and feeds the estimate
    uses_groups: bool  # advantages compare the episodes of one task (rollout.group_size >= 2; filter_groups)
    help: str


ESTIMATORS: dict[str, EstimatorInfo] = {
    "gae": EstimatorInfo(
        "epo_cli.algos.advantages:gae_estimator", needs_critic=True, uses_groups=False,
        help="GAE over turns with a critic (PPO; gamma = lam = 1 gives R_j - V(s_t)), whitened over the batch "
        "with algo.whiten_advantages",
    ),
    "grpo": EstimatorInfo(
        "epo_cli.algos.advantages:grpo_estimator", needs_critic=False, uses_groups=True,
        help="GRPO: an episode's return against its group's mean, over the group's std, on every turn",
    ),
    "rloo": EstimatorInfo(
        "epo_cli.algos.advantages:rloo_estimator", needs_critic=False, uses_groups=True,
        help="RLOO: an episode's return against the mean of the other episodes of its group",
    ),
    "gigpo": EstimatorInfo(
        "epo_cli.algos.advantages:gigpo_estimator", needs_critic=False, uses_groups=True,
        help="GiGPO: GRPO's episode advantage plus a step advantage among the turns of a group that met the same "
        "state (algo.gigpo_gamma, algo.gigpo_step_weight)",
    ),
    "reinforce++": EstimatorInfo(
        "epo_cli.algos.advantages:reinforce_pp_estimator", needs_critic=False, uses_groups=False,
        help="REINFORCE++: the episodes' returns whitened over the batch (its KL: algo.kl_coef)",
    ),
}


def estimator(name: str) -> Callable:
    """The function registered as ``name``."""
    module, function = ESTIMATORS[name].function.split(":")
    return getattr(importlib.import_module(module), function)
