"""The update of one RL step on a batch of turn samples: score -> advantages -> PPO/GRPO
loss with the EPO terms -> optimizer step -> entropy history.

The passes run over units of turn samples: one turn each, or, with
``rollout.prompt_format: conversation``, one segment of an episode each (the packed update:
one sequence scores all the segment's turns, :func:`epo_cli.batch.pack`). Mini-batches are
then made of whole segments; the loss per turn is the same.

Under ``torchrun`` every rank holds the same global batch and runs the passes of the rows
it owns; loss weights are normalized over the global mini-batch, so the gradient summed
over ranks is exactly the one-process gradient of the same batch.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from epo_cli.algos.advantages import TurnRewards
from epo_cli.algos.estimators import estimator
from epo_cli.algos.history import EntropyHistory
from epo_cli.algos.losses import token_weights
from epo_cli.algos.objective import EPOLoss, LossInputs, StepCoefficients, epo_loss, step_coefficients
from epo_cli.batch import MicroBatch, TurnBatch, minibatch_count, pack, unit_chunks, unit_minibatches
from epo_cli.distributed import (
    DistContext,
    balanced_chunks,
    no_gradient_sync,
)
from epo_cli.entropy_record import EntropyRecord
from epo_cli.lora import adapter_weights, merged_weights
from epo_cli.models import trainable_parameters
from epo_cli.precision import autocast_context
from epo_cli.spec import ExperimentSpec
from epo_cli.trainables import OptimizerStep, build_trainables


# What a step without an optimizer step logs exactly: every advantage is 0 (so is the
# surrogate of either sign), the policy is the one that sampled (ratio 1: no clipping, no
# KL), and no gradient was applied.
NO_UPDATE_ZEROS = (
    "actor/pg_loss", "actor/pg_loss_pos_adv", "actor/pg_loss_neg_adv", "actor/clipfrac", "actor/approx_kl",
    "actor/grad_norm",
)


@dataclass
class UpdateStats:
    """Sums over micro-batches of weighted quantities; each mini-batch's weights sum to 1.
    A quantity added with a ``count`` is instead averaged over its own count of samples."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    minibatches: int = 0

    def add(self, name: str, value: torch.Tensor | float, count: float | None = None) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        if count is not None:
            self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def all_reduce(self, dist: DistContext) -> None:
        """Sum each quantity and count over ranks (every rank adds the same keys)."""
        names, counted = sorted(self.sums), sorted(self.counts)
        values = [self.sums[n] for n in names] + [self.counts[n] for n in counted]
        totals = dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
        self.sums = dict(zip(names, totals[: len(names)]))
        self.counts = dict(zip(counted, totals[len(names) :]))

    def means(self) -> dict[str, float]:
        """Per mini-batch, or per sample of a counted quantity (left out if it has none)."""
        return {
            name: value / self.counts[name] if name in self.counts else value / max(self.minibatches, 1)
            for name, value in self.sums.items()
            if self.counts.get(name, 1) > 0
        }


@dataclass
class _StepUpdate:
    """One step's update as it runs: its batch and how it is cut, the step's weights and
    coefficients, and what the mini-batches add up (pre-update entropies and log-probs of
    the measured rows, the sampler vs trainer difference, the counts)."""

    batch: TurnBatch
    owner: torch.Tensor
    step: int
    units: list[list[int]]
    entropy: list[torch.Tensor | None]  # row -> pre-update token entropies, filled as passes give them
    coefs: StepCoefficients
    reference: torch.Tensor | float | None
    step_weights: torch.Tensor
    n_minibatches: int
    record_entropy: bool  # the update's first forwards give the pre-update entropies
    moved_units: list[int]
    moved_rows: set[int]
    before: dict[int, torch.Tensor]  # row -> pre-update log-probs, for the step's move
    stats: UpdateStats = field(default_factory=UpdateStats)
    norms: UpdateStats = field(default_factory=UpdateStats)
    logprob_diff: float = 0.0
    signal_free: int = 0
    optimizer_steps: int = 0


def _grad_norm(term: torch.Tensor | None, params: list[torch.Tensor]) -> float:
    """L2 norm of ``d term / d params``, leaving the graph for the backward of the loss;
    0 for a term that is absent or has no gradient (the indicator penalty)."""
    if term is None or not term.requires_grad:
        return 0.0
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return float(torch.nn.utils.get_total_norm([g for g in grads if g is not None]))


class Learner:
    """One run's update: score -> advantages -> the mini-batch updates, on the models of
    :func:`~epo_cli.trainables.build_trainables`, with the entropy record of EPO's smoothing."""

    def __init__(self, spec: ExperimentSpec, pad_id: int, dist: DistContext | None = None):
        self.spec = spec
        self.dist = dist or DistContext()
        self.device = self.dist.device
        self.pad_id = pad_id
        self.entropy_record = EntropyRecord(spec, self.dist)
        # The same seed on every rank: all ranks draw the same mini-batch permutation.
        self.generator = torch.Generator().manual_seed(spec.train.seed)

        self.estimate = estimator(spec.algo.advantage)
        models = build_trainables(spec, self.dist)
        # With model.lora, self.peft wraps self.policy (adapters injected in place).
        self.policy, self.peft, self.reference = models.policy, models.peft, models.reference
        self.has_critic, self.shared_critic, self.value_head = models.has_critic, models.shared_critic, models.value_head
        self.actor, self.critic = models.actor, models.critic
        self.optimizers, self.schedulers, self.clip_groups = models.optimizers, models.schedulers, models.clip_groups
        self.optimizer_step = OptimizerStep(self.optimizers, self.clip_groups, spec.optim.max_grad_norm)

    @property
    def history(self) -> EntropyHistory:
        return self.entropy_record.history

    @property
    def turn_entropies(self) -> dict[int, float]:
        """Row of the last step's batch -> its mean decision-token entropy before the update."""
        return self.entropy_record.turn_entropies

    @property
    def sharded(self) -> bool:
        """FSDP2 across processes: the policy's parameters are shards."""
        return self.dist.enabled and self.spec.distributed.strategy == "fsdp2"

    def policy_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The full policy weights for a sampler with its own copy (every rank must call
        it under FSDP2, where it gathers the shards)."""
        if self.sharded:
            weights = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True))
        else:
            weights = self.policy.state_dict()
        if self.peft is not None:  # the sampler's copy is a plain model: adapters merged in
            weights = merged_weights(weights, self.spec.model.lora.scale_alpha / self.spec.model.lora.rank)
        return list(weights.items())

    @property
    def scorers(self) -> list[torch.nn.Module]:
        """The trained modules, one per optimizer."""
        return [self.actor] + ([self.critic] if self.critic is not None else [])

    # ------------------------------------------------------------------ step
    def learn(self, batch: TurnBatch, owner: torch.Tensor, step: int) -> dict[str, float]:
        """Score, compute advantages, update and record the entropy history of one RL
        step. ``owner[row]`` is the rank that runs the passes of each turn sample."""
        entropy = self._score(batch, owner)
        self._advantages(batch)
        metrics = self._update(batch, owner, step, entropy)
        self.step_schedules()
        return metrics

    def step_schedules(self) -> None:
        """Advance the lr schedules by one RL step, also after a step without an optimizer
        step (no signal): the schedule counts RL steps."""
        with warnings.catch_warnings():  # torch warns when no optimizer step came first
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in self.schedulers:
                scheduler.step()

    def units(self, batch: TurnBatch) -> list[list[int]]:
        """The rows of each unit the passes are made of: one turn each, or, in the packed
        update (``rollout.prompt_format: conversation``), one segment each."""
        if self.spec.rollout.prompt_format == "conversation":
            return batch.segments()
        return [[row] for row in range(len(batch))]

    def pass_tokens(self, batch: TurnBatch) -> int:
        """The sequence tokens of one pass over ``batch``: every unit's, a turn's prompt +
        response or a segment's (its last turn's), padding left out."""
        return sum(batch.sequence_length(rows[-1]) for rows in self.units(batch))

    def _my_chunks(self, batch: TurnBatch, units: list[list[int]], chosen: list[int], owner: torch.Tensor,
                   size: int) -> list[list[int] | None]:
        """This rank's length-sorted micro-batches of ``size`` of the ``chosen`` units,
        padded to the same count on every rank. A unit's rows belong to one episode, so to
        one rank."""
        by_rank = [
            unit_chunks(batch, units, [u for u in chosen if int(owner[units[u][0]]) == rank], size)
            for rank in range(self.dist.world_size)
        ]
        return balanced_chunks(by_rank, self.dist.rank)

    def _collate(self, batch: TurnBatch, units: list[list[int]], chunk: list[int] | None) -> MicroBatch:
        """A micro-batch of units on the device; ``None`` (padding) becomes unit 0, weighted zero."""
        return pack(batch, [units[u] for u in (chunk if chunk is not None else [0])], self.pad_id).to(self.device)

    def needs_old_logp(self, batch: TurnBatch) -> bool:
        """Old log-probs need their own pass only if the policy changes within the step;
        otherwise the first forward of the update yields them exactly (ratio = 1)."""
        return self.spec.algo.ppo_epochs > 1 or minibatch_count(len(batch), self.units(batch), self.spec.optim.mini_batch_size) > 1

    @torch.no_grad()
    def _score(self, batch: TurnBatch, owner: torch.Tensor) -> list[torch.Tensor | None]:
        """No-grad passes for what the update needs before it starts: V(s_t) (PPO), the
        old log-probs (when the policy moves within the step) and reference log-probs.
        Values are summed over ranks: every rank gets all of them, for GAE and whitening.

        Returns the token entropies of this rank's rows under the policy before the
        update where this pass computes them (with the old log-probs), else Nones."""
        spec = self.spec
        need_old = self.needs_old_logp(batch)
        batch.old_logp = batch.ref_logp = batch.values = None
        old_logp, ref_logp, entropy = [None] * len(batch), [None] * len(batch), [None] * len(batch)
        if not (need_old or self.has_critic or self.reference is not None):
            return entropy  # GRPO in one mini-batch: the update's own forward gives all it needs
        values = torch.zeros(len(batch), dtype=torch.float64)
        units = self.units(batch)
        for chunk in self._my_chunks(batch, units, list(range(len(units))), owner, spec.optim.micro_batch_size):
            micro = self._collate(batch, units, chunk)
            rows = micro.rows if chunk is not None else None
            with autocast_context(spec.model.autocast, self.policy):
                if need_old or self.shared_critic:
                    out = self.actor(micro, spec.rollout.temperature, spec.model.logit_chunk_tokens, with_logprobs=need_old)
                    self._keep(rows, out.values, values, out.logp if need_old else None, old_logp, micro)
                    self._keep(rows, None, None, out.entropy if need_old else None, entropy, micro)
                if self.critic is not None:
                    out = self.critic(micro, 1.0, with_logprobs=False)
                    self._keep(rows, out.values, values, None, None, micro)
                if self.reference is not None:
                    out = self.reference(micro, spec.rollout.temperature, spec.model.logit_chunk_tokens)
                    self._keep(rows, None, None, out.logp, ref_logp, micro)
        batch.old_logp = old_logp if need_old else None
        batch.ref_logp = ref_logp if self.reference is not None else None
        batch.values = self.dist.all_reduce_sum(values).float() if self.has_critic else None
        return entropy

    @staticmethod
    def _keep(rows, out_values, values, out_tokens, per_row, micro: MicroBatch) -> None:
        """Write a micro-batch's outputs into the per-row results (padding is dropped):
        values ``[B]`` into ``values``, a per-token output ``[B, R]`` into ``per_row``."""
        if rows is None:
            return
        if out_values is not None:
            values[rows] = out_values.double().cpu()
        if out_tokens is not None:
            for i, row in enumerate(rows):
                per_row[row] = out_tokens[i, : int(micro.response_lengths[i])].float().cpu().clone()

    def _advantages(self, batch: TurnBatch) -> None:
        """``algo.advantage``'s estimator (:mod:`epo_cli.algos.estimators`) over the batch."""
        turns = TurnRewards(batch.rewards, batch.episode_ids, batch.group_ids, batch.values, batch.state_ids)
        batch.advantages, batch.returns = self.estimate(turns, self.spec.algo)

    # ---------------------------------------------------------------- update
    def _update(self, batch: TurnBatch, owner: torch.Tensor, step: int, entropy: list[torch.Tensor | None]) -> dict[str, float]:
        """The mini-batch updates of one step. ``entropy``: per row, the token entropies
        under the policy before the update (from :meth:`_score`), or Nones; then the
        policy does not move before the last micro-batch and its forwards give them.

        Weights are the step's (Eq. 2 over the whole batch, :meth:`step_weights`), so an
        episode cut across mini-batches weighs what a whole one does. A mini-batch without a
        policy-gradient signal (``optim.skip_signal_free``) takes no backward and no optimizer
        step; its pre-update entropies are still recorded for ``Hbar``."""
        spec = self.spec
        units = self.units(batch)
        n_minibatches = minibatch_count(len(batch), units, spec.optim.mini_batch_size)
        moved_units = self._move_units(units, step)
        run = _StepUpdate(
            batch, owner, step, units, entropy,
            coefs=step_coefficients(spec.epo, step, spec.train.steps),
            reference=self.entropy_record.reference(batch),
            step_weights=self.step_weights(batch) * n_minibatches,  # a mini-batch's loss stays a mean
            n_minibatches=n_minibatches,
            record_entropy=not self.needs_old_logp(batch),
            moved_units=moved_units,
            moved_rows={row for u in moved_units for row in units[u]},
            before={} if batch.old_logp is None else dict(enumerate(batch.old_logp)),  # row -> pre-update log-probs
        )
        for module in self.scorers:
            module.train()
        for epoch in range(spec.algo.ppo_epochs):
            for index, minibatch in enumerate(unit_minibatches(units, len(batch), spec.optim.mini_batch_size, self.generator)):
                self._minibatch_update(run, epoch, index, minibatch)
        run.stats.all_reduce(self.dist)
        return self._step_metrics(run)

    def _minibatch_update(self, run: _StepUpdate, epoch: int, index: int, minibatch: list[int]) -> None:
        """One mini-batch of ``run``: its micro-batches' forward and backward, then one
        optimizer step; or, without a policy-gradient signal, only what its pre-update pass gives."""
        spec, batch, units = self.spec, run.batch, run.units
        rows = [row for unit in minibatch for row in units[unit]]
        if spec.optim.skip_signal_free and not bool(batch.advantages[rows].any()):
            run.signal_free += 1
            if epoch == 0:
                run.logprob_diff += self._pre_update_pass(batch, units, minibatch, run.owner, run.step_weights, run.entropy,
                                                          run.record_entropy) / run.n_minibatches
            return
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        chunks = self._my_chunks(batch, units, minibatch, run.owner, spec.optim.micro_batch_size)
        measured = self._measured_chunk(run.step, epoch, index, len(chunks)) if spec.tracking.term_grad_norms else -1
        for i, chunk in enumerate(chunks):
            micro = self._collate(batch, units, chunk)
            w = self._micro_weights(micro, chunk, run.step_weights)
            with self._gradient_sync(i == len(chunks) - 1):
                entropy_per_turn, logprob_diff, old_logp = self._micro_step(
                    batch, micro, w.to(self.device), run.coefs, run.reference, run.stats, i == measured
                )
            if epoch == 0 and chunk is not None:
                run.logprob_diff += logprob_diff / run.n_minibatches
                if run.record_entropy:
                    self._keep(micro.rows, None, None, entropy_per_turn, run.entropy, micro)
                if batch.old_logp is None:  # this forward was the pre-update policy's
                    for j, row in enumerate(micro.rows):
                        if row in run.moved_rows:
                            run.before[row] = old_logp[j, : int(micro.response_lengths[j])]
        run.optimizer_steps += self.optimizer_step(run.norms)
        run.stats.minibatches += 1
        run.norms.minibatches += 1

    def _step_metrics(self, run: _StepUpdate) -> dict[str, float]:
        """The step's update metrics: the loss terms' means, the entropy record (Hbar_k, its
        turns, the token-entropy variance), the step's move and the EPO coefficients."""
        batch = run.batch
        step_entropy, turn_means, token_variance = self.entropy_record.record(batch, run.entropy)
        logprob_diff = float(self.dist.all_reduce_sum(torch.tensor([run.logprob_diff], dtype=torch.float64))[0])
        metrics = {**run.stats.means(), **run.norms.means()}
        if not run.optimizer_steps:
            metrics.update(dict.fromkeys(NO_UPDATE_ZEROS, 0.0))
        metrics["actor/entropy"] = step_entropy
        metrics["actor/entropy_var"] = token_variance
        metrics["rollout/logprob_diff"] = logprob_diff
        metrics["actor/signal_free_minibatches"] = run.signal_free
        metrics["actor/optimizer_steps"] = run.optimizer_steps
        if run.moved_units:
            metrics["actor/step_kl"], metrics["actor/step_logprob_change"] = (
                self._step_move(batch, run.units, run.moved_units, run.owner, run.before, run.step_weights)
                if run.optimizer_steps else (0.0, 0.0)
            )
        for turn, value in sorted(turn_means.items()):
            metrics[f"actor/entropy_turn_{turn}"] = value
        metrics["epo/beta"] = run.coefs.beta
        metrics["epo/entropy_coef"] = run.coefs.entropy_coef
        if run.reference is not None:
            reference = run.reference
            metrics["epo/entropy_ref"] = float(reference.mean()) if torch.is_tensor(reference) else reference
        metrics["actor/lr"] = self.schedulers[0].get_last_lr()[0]
        metrics["actor/skipped_steps"] = self.optimizer_step.skipped
        if self.has_critic:
            metrics["critic/values_mean"] = float(batch.values.mean())
            metrics["critic/returns_mean"] = float(batch.returns.mean())
        return metrics

    def step_weights(self, batch: TurnBatch) -> torch.Tensor:
        """Eq. 2's aggregation weights over the whole step's batch (they sum to 1): each
        episode's turns weigh 1/E in total, however the step is cut into mini-batches."""
        return token_weights(batch.decision_mask(list(range(len(batch)))), batch.episode_ids, self.spec.algo.loss_agg)

    @staticmethod
    def _micro_weights(micro: MicroBatch, chunk: list[int] | None, step_weights: torch.Tensor) -> torch.Tensor:
        """The micro-batch's rows of ``step_weights``, cut to its response width; zero for padding."""
        if chunk is None:
            return torch.zeros(len(micro.rows), micro.response_width)
        return step_weights[micro.rows, : micro.response_width]

    def _move_units(self, units: list[list[int]], step: int) -> list[int]:
        """The units ``tracking.step_move_units`` measures the step's move on, drawn from
        the run's seed and the step alone (like :meth:`_measured_chunk`)."""
        count = min(self.spec.tracking.step_move_units, len(units))
        return sorted(random.Random(f"{self.spec.train.seed}:{step}:move").sample(range(len(units)), count))

    @torch.no_grad()
    def _pre_update_pass(self, batch, units, minibatch, owner, step_weights, entropy, record_entropy: bool) -> float:
        """What a skipped mini-batch still gives: its weighted sampler vs trainer log-prob
        difference, from the old log-probs, and, when no earlier pass computed them, its
        pre-update entropies (one no-grad forward: the policy has not moved)."""
        diff = 0.0
        if not record_entropy:
            for row in (r for u in minibatch for r in units[u] if int(owner[r]) == self.dist.rank):
                n = len(batch.old_logp[row])
                diff += float(((batch.sample_logp[row][:n] - batch.old_logp[row]).abs() * step_weights[row, :n]).sum())
            return diff
        for micro, chunk, out in self._policy_forwards(batch, units, minibatch, owner):
            self._keep(micro.rows, None, None, out.entropy, entropy, micro)
            w = self._micro_weights(micro, chunk, step_weights)
            sample_logp = batch.padded(batch.sample_logp, micro.rows, micro.response_width)
            diff += float(((sample_logp - out.logp.float().cpu()).abs() * w).sum())
        return diff

    def _policy_forwards(self, batch, units, chosen, owner):
        """(micro-batch, chunk, output) of the policy's forward over this rank's share of
        the ``chosen`` units (callers run under no_grad); every rank runs its padding
        chunks too (a sharded forward is collective), which are not yielded."""
        spec = self.spec
        for chunk in self._my_chunks(batch, units, chosen, owner, spec.optim.micro_batch_size):
            micro = self._collate(batch, units, chunk)
            with autocast_context(spec.model.autocast, self.policy):
                out = self.actor(micro, spec.rollout.temperature, spec.model.logit_chunk_tokens)
            if chunk is not None:
                yield micro, chunk, out

    @torch.no_grad()
    def _step_move(self, batch, units, moved_units, owner, before, step_weights) -> tuple[float, float]:
        """How far the whole RL step moved the policy, on the decision tokens of
        ``moved_units`` weighted as in the loss: ``KL(pi_before || pi_after)`` by the k3
        estimator ``exp(d) - 1 - d``, ``d = log pi_after - log pi_before`` on the sampled
        tokens (drawn by ``pi_before`` up to the sampler's numerics), and the mean ``|d|``.
        Unlike ``actor/approx_kl`` (0 on a step's first mini-batch) it sees every update."""
        totals = torch.zeros(3, dtype=torch.float64)  # KL, |d|, weight
        for micro, _, out in self._policy_forwards(batch, units, moved_units, owner):
            for i, row in enumerate(micro.rows):
                n = int(micro.response_lengths[i])
                d = out.logp[i, :n].double().cpu() - before[row][:n].double()
                w = step_weights[row, :n].double()
                totals += torch.stack([((torch.exp(d) - 1 - d) * w).sum(), (d.abs() * w).sum(), w.sum()])
        kl, change, weight = self.dist.all_reduce_sum(totals).tolist()
        return kl / max(weight, 1e-12), change / max(weight, 1e-12)

    def _gradient_sync(self, last: bool) -> contextlib.ExitStack:
        """Gradients are reduced over ranks only at the last micro-batch of a mini-batch."""
        stack = contextlib.ExitStack()
        for module in self.scorers:
            stack.enter_context(no_gradient_sync(module, last))
        return stack

    def _micro_step(
        self, batch, micro, w, coefs: StepCoefficients, reference, stats: UpdateStats, measure_terms: bool
    ) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Forward, :func:`epo_loss` and backward for one micro-batch (first the gradient norms
        of its terms with ``measure_terms``); returns its per-token entropy (detached, on the
        CPU), its weighted sampler vs trainer log-prob difference and the old log-probs."""
        spec = self.spec
        device = self.device
        with autocast_context(spec.model.autocast, self.policy):  # the forward passes; loss and backward outside
            out = self.actor(micro, spec.rollout.temperature, spec.model.logit_chunk_tokens)
            own_critic = self.critic(micro, 1.0, with_logprobs=False) if self.has_critic and not self.shared_critic else None
        rows = micro.rows
        width = micro.response_width
        old_logp = out.logp.detach().float() if batch.old_logp is None else batch.padded(batch.old_logp, rows, width).to(device)
        # Sampler vs trainer log-probs of the same tokens under the pre-update policy: large
        # values mean stale sampler weights or a numerics mismatch.
        sample_logp = batch.padded(batch.sample_logp, rows, width).to(device)
        logprob_diff = float(((sample_logp - old_logp).abs() * w).sum())
        inputs = LossInputs(
            weights=w,
            advantages=batch.advantages[rows].to(device),
            old_logp=old_logp,
            turn_index=batch.turn_index[rows].to(device),
            ref_logp=None if batch.ref_logp is None else batch.padded(batch.ref_logp, rows, width).to(device),
            entropy_ref=reference[rows].to(device) if torch.is_tensor(reference) else reference,
            old_values=batch.values[rows].to(device) if self.has_critic else None,
            returns=batch.returns[rows].to(device) if self.has_critic else None,
            sample_logp=sample_logp,
        )
        values = None
        if self.has_critic:
            values = out.values if self.shared_critic else own_critic.values
        result = epo_loss(inputs, out.logp, out.entropy, spec.algo, spec.epo, coefs, values)
        if measure_terms:
            self._term_grad_norms(result, w, stats)
        # DDP and FSDP2 average gradients over ranks; the weights already normalize over
        # the global mini-batch, so scale back up to the sum.
        (result.loss * self.dist.world_size).backward()
        for name, value in result.metrics.items():
            stats.add(name, value)
        return out.entropy.detach().float().cpu(), logprob_diff, old_logp.cpu()

    def _measured_chunk(self, step: int, epoch: int, minibatch: int, chunks: int) -> int:
        """The micro-batch of a mini-batch whose term gradient norms are measured: drawn at
        random (micro-batches are sorted by length, so a fixed one would always be the
        shortest), from the run's seed and the mini-batch's place alone, so that neither
        the update's random numbers nor a resumed run's choices change."""
        return random.Random(f"{self.spec.train.seed}:{step}:{epoch}:{minibatch}").randrange(chunks)

    def _term_grad_norms(self, result: EPOLoss, w: torch.Tensor, stats: UpdateStats) -> None:
        """``tracking.term_grad_norms``: gradient norms over the policy's parameters of the
        policy part of L_MT (surrogate + KL), ``-lambda_k L_H`` (Eq. 2) and ``+lambda_k beta_k
        L_smooth`` (Eq. 3-5) in this micro-batch, and the EPO terms' ratios to the first.
        A micro-batch without weight (padding) adds no sample, a zero policy-gradient norm
        (GRPO groups without signal) no ratio sample."""
        params = trainable_parameters(self.policy)
        counted = bool(w.any())
        norms = {}
        for name, term in (("pg", result.pg), ("entropy_bonus", result.entropy_bonus), ("smooth", result.smoothing)):
            norms[name] = _grad_norm(term, params) if counted else 0.0
            stats.add(f"grad/{name}_norm", norms[name], count=counted)
        has_signal = norms["pg"] > 0
        for name in ("entropy_bonus", "smooth"):
            stats.add(f"grad/{name}_ratio", norms[name] / norms["pg"] if has_signal else 0.0, count=has_signal)

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Full (unsharded) states on rank 0, whatever the strategy and world size; every
        rank must call it. Policy weights are returned apart, under ``"policy"``."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        actor = get_model_state_dict(self.actor, options=options)
        policy = {k.removeprefix("model."): v for k, v in actor.items() if k.startswith("model.")}
        critic = get_model_state_dict(self.critic, options=options) if self.critic is not None else None
        if self.peft is not None:  # only what trains: the frozen weights are the start model's
            policy = adapter_weights(policy)
            critic = critic and {k: v for k, v in critic.items() if ".lora_" in k or k.startswith("value_head.")}
        return {
            "policy": policy,
            "actor_value_head": {k.removeprefix("value_head."): v for k, v in actor.items() if k.startswith("value_head.")},
            "critic": critic,
            "optimizers": [get_optimizer_state_dict(m, o, options=options) for m, o in zip(self.scorers, self.optimizers)],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "history": self.history.state_dict(),
            "skipped_steps": self.optimizer_step.skipped,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, policy_state: dict) -> None:
        """Restore :meth:`state_dict` output on every rank (any world size); a LoRA run's
        states hold the adapters only (the rest stays the start model)."""
        options = StateDictOptions(full_state_dict=self.dist.enabled, strict=self.peft is None)
        actor = {f"model.{k}": v for k, v in policy_state.items()}
        actor.update({f"value_head.{k}": v for k, v in (state["actor_value_head"] or {}).items()})
        set_model_state_dict(self.actor, actor, options=options)
        if self.critic is not None:
            set_model_state_dict(self.critic, state["critic"], options=options)
        for module, optimizer, saved in zip(self.scorers, self.optimizers, state["optimizers"]):
            set_optimizer_state_dict(module, optimizer, saved, options=options)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.entropy_record.history = EntropyHistory.from_state_dict(state["history"])
        self.optimizer_step.skipped = state["skipped_steps"]
        self.generator.set_state(state["generator"])
