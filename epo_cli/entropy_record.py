"""The step's entropy record behind EPO's smoothing (Eq. 3-4): ``Hbar_k``, the token
entropy of the whole batch under the policy before the step's first update, aggregated like
``L_H`` (Eq. 2), and per turn index, gathered over ranks and appended to the run's
:class:`~epo_cli.algos.history.EntropyHistory`; and the reference ``Hbar_W`` the next
step's smoothing term compares with."""

from __future__ import annotations

import torch

from epo_cli.algos.history import EntropyHistory
from epo_cli.algos.losses import token_weights
from epo_cli.batch import TurnBatch
from epo_cli.distributed import DistContext
from epo_cli.spec import ExperimentSpec


class EntropyRecord:
    """The run's entropy history and the last step's per-row entropies."""

    def __init__(self, spec: ExperimentSpec, dist: DistContext):
        self.spec = spec
        self.dist = dist
        self.history = EntropyHistory()
        # Row of the last step's TurnBatch -> its mean decision-token entropy under the
        # policy before the update (all ranks; rows without a sampled decision are absent).
        self.turn_entropies: dict[int, float] = {}

    def reference(self, batch: TurnBatch):
        """``Hbar_W`` for this step: a scalar (step history) or one value per turn sample
        (turn history); None at the first step, where ``L_smooth = 0``."""
        smoothing = self.spec.epo.smoothing
        if smoothing.history == "turn":
            return self.history.turn_reference(batch.turn_index, smoothing.window)
        return self.history.reference(smoothing.window)

    def record(self, batch: TurnBatch, entropy: list[torch.Tensor | None]) -> tuple[float, dict[int, float], float]:
        """Append the step's ``Hbar_k`` and per-turn means (over all ranks) to the history;
        ``entropy``: per row, its token entropies (None for other ranks' rows). Returns them,
        and the variance of the step's decision-token entropies (each token counted once:
        the spread that Section 4's analysis says EPO makes fall)."""
        step_entropy, turn_sums, row_means, moments = self._rank_share(batch, entropy)
        totals = self.dist.all_reduce_sum(torch.tensor([step_entropy, *moments], dtype=torch.float64)).tolist()
        step_entropy, tokens, total, squares = totals
        turn_means = self._global_turn_means(turn_sums, row_means)
        self.history.append(step_entropy, turn_means)
        variance = max(squares / tokens - (total / tokens) ** 2, 0.0) if tokens else 0.0
        return step_entropy, turn_means, variance

    def _rank_share(
        self, batch: TurnBatch, entropy: list[torch.Tensor | None]
    ) -> tuple[float, dict[int, list[float]], dict[int, float], list[float]]:
        """This rank's share of ``Hbar_k`` (weights over the whole batch), per turn index
        [sum of turn means, count], its rows' means, and its decision tokens' [count, sum of
        entropies, sum of squares]. Rows of other ranks are None."""
        rows = list(range(len(batch)))
        mask = batch.decision_mask(rows)
        weights = token_weights(mask, batch.episode_ids, self.spec.algo.loss_agg)
        total, turn_sums, row_means, moments = 0.0, {}, {}, [0.0, 0.0, 0.0]
        for row, values in enumerate(entropy):
            if values is None:
                continue
            n = len(values)
            total += float((values * weights[row, :n]).sum())
            decisions = float(mask[row, :n].sum())
            mean = float((values * mask[row, :n]).sum()) / max(decisions, 1.0)
            chosen = values[mask[row, :n].bool()].double()
            moments[0] += decisions
            moments[1] += float(chosen.sum())
            moments[2] += float(chosen.square().sum())
            if decisions:
                row_means[row] = mean
            entry = turn_sums.setdefault(int(batch.turn_index[row]), [0.0, 0])
            entry[0] += mean
            entry[1] += 1
        return total, turn_sums, row_means, moments

    def _global_turn_means(self, turn_sums: dict[int, list[float]], row_means: dict[int, float]) -> dict[int, float]:
        """Mean entropy per turn index over the turn samples of all ranks; also gathers
        every rank's per-row means into :attr:`turn_entropies`."""
        merged: dict[int, list[float]] = {}
        self.turn_entropies = {}
        for part, rows in self.dist.all_gather_objects((turn_sums, row_means)):
            self.turn_entropies.update(rows)
            for turn, (total, count) in part.items():
                entry = merged.setdefault(turn, [0.0, 0])
                entry[0] += total
                entry[1] += count
        return {turn: total / count for turn, (total, count) in sorted(merged.items())}
