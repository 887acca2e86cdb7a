"""What resolving and checking a spec needs beyond its layers: the machine's and the
environments' facts. spec.py takes them as :class:`Facts` (tests pass their own) and probes
nothing itself; :func:`facts_here` probes this machine (through torch) and asks the
environment modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Facts:
    cuda: bool  # a CUDA device: the scale defaults to paper
    native_bf16: bool  # bf16 matrix instructions: the CPU scale samples from a bf16 copy (presets.CPU_SCALE_BF16)
    task_types: Callable[[str], tuple[str, ...]]  # an environment's task types (env.task_types)
    splits: Callable[[str], tuple[str, ...]]  # an environment's split names (sft.train_split, sft.heldout_split)


def facts_here() -> Facts:
    """This machine's facts (torch is imported here, when first asked, not by spec.py)."""
    import torch

    from epo_cli import precision
    from epo_cli.envs.registry import splits_of, task_types_of

    return Facts(cuda=torch.cuda.is_available(), native_bf16=precision.native_bf16(), task_types=task_types_of, splits=splits_of)
