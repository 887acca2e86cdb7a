"""The entropy history behind the smoothing reference ``Hbar_W`` (Eq. 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EntropyHistory:
    """Per RL step: the batch's mean token entropy, and the mean per turn index.

    ``Hbar_k`` is appended after step ``k``'s update, so step ``k`` reads steps ``< k``.
    Turn indices are only averaged over turns that were played: finished episodes add no
    zero padding (a defect of the reference code).
    """

    step_means: list[float] = field(default_factory=list)
    turn_means: list[dict[int, float]] = field(default_factory=list)

    def append(self, step_mean: float, turn_means: dict[int, float]) -> None:
        self.step_means.append(float(step_mean))
        self.turn_means.append({int(t): float(v) for t, v in turn_means.items()})

    def reference(self, window: int | None = None) -> float | None:
        """``Hbar_W``: the cumulative mean (``window=None``, the paper) or the last N steps."""
        recent = self.step_means[-window:] if window else self.step_means
        return sum(recent) / len(recent) if recent else None

    def turn_reference(self, turn_index: torch.Tensor, window: int | None = None) -> torch.Tensor | None:
        """Per-sample reference from the history of each sample's turn index.

        A turn index never seen before falls back to the step-level reference.
        """
        step_ref = self.reference(window)
        if step_ref is None:
            return None
        recent = self.turn_means[-window:] if window else self.turn_means
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        for entry in recent:
            for turn, value in entry.items():
                sums[turn] = sums.get(turn, 0.0) + value
                counts[turn] = counts.get(turn, 0) + 1
        return torch.tensor(
            [sums[t] / counts[t] if t in counts else step_ref for t in turn_index.tolist()],
            dtype=torch.float32,
        )

    def state_dict(self) -> dict:
        return {"step_means": self.step_means, "turn_means": [{str(k): v for k, v in d.items()} for d in self.turn_means]}

    @classmethod
    def from_state_dict(cls, state: dict) -> EntropyHistory:
        return cls(
            step_means=[float(v) for v in state["step_means"]],
            turn_means=[{int(k): float(v) for k, v in d.items()} for d in state["turn_means"]],
        )
