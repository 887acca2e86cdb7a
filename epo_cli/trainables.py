"""What one run trains, built from its spec: the policy (with LoRA adapters under
``model.lora``), the critic (a value head on the policy, or on a copy of the backbone), the
frozen KL reference, the scorers wrapped for data-parallel training, AdamW and the lr
schedules."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from epo_cli.algos.estimators import ESTIMATORS
from epo_cli.distributed import DistContext, full_tensor, unwrap, wrap_for_training
from epo_cli.forward import TurnScorer
from epo_cli.lora import AdaptersOff
from epo_cli.models import ValueHead, cosine_schedule, trainable_model, trainable_parameters
from epo_cli.spec import ExperimentSpec


@dataclass
class Trainables:
    policy: nn.Module
    peft: nn.Module | None  # the peft wrapper of policy under model.lora
    reference: nn.Module | None  # the start policy for the KL term (algo.kl_coef > 0); not sharded
    has_critic: bool  # the estimator needs a value model
    shared_critic: bool  # its value head sits on the policy (model.critic: shared)
    value_head: ValueHead | None
    actor: nn.Module  # the policy's scorer (with the shared value head), wrapped
    critic: nn.Module | None  # a separate critic's scorer, wrapped
    optimizers: list[torch.optim.Optimizer]  # the actor's, then a separate critic's
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    clip_groups: list[tuple[str, list[torch.Tensor]]]  # gradient-norm clipping: policy and critic apart


@dataclass
class OptimizerStep:
    """Clip each group's gradients on its own (the policy's and the critic's) and step every
    optimizer; a non-finite gradient anywhere skips the whole step, and is counted. Under
    torchrun gradients are already global here, so every rank takes the same decision."""

    optimizers: list[torch.optim.Optimizer]
    clip_groups: list[tuple[str, list[torch.Tensor]]]
    max_grad_norm: float
    skipped: int = 0  # steps skipped over the run
    consecutive_skips: int = 0  # skipped in a row, up to now

    def __call__(self, norms) -> bool:
        """Adds each group's pre-clip ``NAME/grad_norm`` to ``norms``; returns whether it stepped."""
        grad_norms = []
        for name, params in self.clip_groups:
            norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
            norms.add(f"{name}/grad_norm", norm)
            grad_norms.append(norm)
        if not all(torch.isfinite(norm) for norm in grad_norms):
            self.skipped += 1
            self.consecutive_skips += 1
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            return False
        self.consecutive_skips = 0
        for optimizer in self.optimizers:
            optimizer.step()
        return True


def build_trainables(spec: ExperimentSpec, dist: DistContext) -> Trainables:
    """The models, optimizers and schedules of a run on this rank (DDP / FSDP2 wrapped under
    torchrun); the weights are the start model's (``train.seed`` draws new ones and LoRA's A)."""
    # With model.lora, peft wraps policy (adapters injected in place).
    policy, peft = trainable_model(spec.model, spec.train.seed, dist.device)
    has_critic = ESTIMATORS[spec.algo.advantage].needs_critic
    shared_critic = has_critic and spec.model.critic == "shared"
    value_head = ValueHead(policy.config.hidden_size).to(dist.device) if has_critic else None
    critic_model = None
    if has_critic and not shared_critic:
        critic_model, _ = trainable_model(spec.model, spec.train.seed, dist.device)
    reference = None  # the frozen start policy, for the KL term (not sharded)
    if spec.algo.kl_coef > 0 and peft is not None:
        reference = AdaptersOff(TurnScorer(policy, compiled_head=spec.model.compile_lm_head), peft)
    elif spec.algo.kl_coef > 0:
        frozen = copy.deepcopy(policy).eval().requires_grad_(False)
        reference = TurnScorer(frozen, compiled_head=spec.model.compile_lm_head)

    strategy = spec.distributed.strategy
    compiled = spec.model.compile_lm_head
    actor = wrap_for_training(TurnScorer(policy, value_head if shared_critic else None, compiled), strategy, dist)
    critic = None
    if critic_model is not None:
        critic = wrap_for_training(TurnScorer(critic_model, value_head), strategy, dist)
    # Optimizers come after wrapping: FSDP2 replaces the parameters by sharded ones.
    # Fused AdamW (one kernel over all tensors) where the parameters are plain tensors.
    adamw = {"weight_decay": spec.optim.weight_decay, "fused": not (dist.enabled and strategy == "fsdp2")}
    actor_module = unwrap(actor)
    actor_groups = [{"params": trainable_parameters(actor_module.model), "lr": spec.optim.lr}]
    if shared_critic:
        actor_groups.append({"params": list(actor_module.value_head.parameters()), "lr": spec.optim.critic_lr})
    optimizers = [torch.optim.AdamW(actor_groups, **adamw)]
    if critic is not None:
        optimizers.append(torch.optim.AdamW(trainable_parameters(unwrap(critic)), lr=spec.optim.critic_lr, **adamw))
    # Policy and critic are clipped apart, as two models are: a shared critic's value
    # head, learning from zero, has a gradient norm several times the policy's, and one clip
    # over both scales the policy's gradient by a factor that the critic's error sets.
    critic_params = [p for group in actor_groups[1:] for p in group["params"]]
    if critic is not None:
        critic_params = trainable_parameters(unwrap(critic))
    clip_groups = [("actor", actor_groups[0]["params"])] + ([("critic", critic_params)] if critic_params else [])
    schedulers = [cosine_schedule(opt, spec.optim, spec.train.steps) for opt in optimizers]
    return Trainables(policy, peft, reference, has_critic, shared_critic, value_head, actor, critic, optimizers,
                      schedulers, clip_groups)
