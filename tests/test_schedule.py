"""The lr schedule of RL and SFT: warmup that starts above 0, then cosine to a floor."""

import pytest
import torch

from epo_cli.models import cosine_schedule, warmup_cosine_factor
from epo_cli.spec import OptimSpec


def _lrs(optim: OptimSpec, total: int, peak: float = 1e-5) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = cosine_schedule(optimizer, optim, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_the_first_warmup_step_is_not_spent_at_lr_0():
    # int(0.1 * 16) = 1 warmup step: lr/2 there (the transformers schedule gave 0), then the peak.
    lrs = _lrs(OptimSpec(warmup_ratio=0.1), 16)
    assert lrs[:2] == pytest.approx([0.5e-5, 1e-5])
    # Three warmup steps: lr/4, 2lr/4, 3lr/4, then the peak.
    assert _lrs(OptimSpec(warmup_ratio=0.3), 10)[:4] == pytest.approx([0.25e-5, 0.5e-5, 0.75e-5, 1e-5])


def test_after_warmup_the_cosine_runs_from_the_peak_to_the_floor():
    # No warmup, half a cosine cycle over 4 steps, floor 0.2: factors 1, 0.2 + 0.8 (1 + cos(pi k / 4)) / 2.
    assert [warmup_cosine_factor(k, 0, 4, 0.5, 0.2) for k in range(5)] == pytest.approx(
        [1.0, 0.2 + 0.4 * (1 + 2 ** -0.5), 0.6, 0.2 + 0.4 * (1 - 2 ** -0.5), 0.2]
    )
    assert _lrs(OptimSpec(warmup_ratio=0.0, min_lr_ratio=0.2), 4, peak=1.0) == pytest.approx(
        [warmup_cosine_factor(k, 0, 4, 0.5, 0.2) for k in range(4)]
    )
