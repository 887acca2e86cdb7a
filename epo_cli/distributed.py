"""Data-parallel training with PyTorch's own stack: ``torchrun`` sets the environment,
``torch.distributed`` holds the process group, and the update runs under DDP or FSDP2
(``fully_shard``). One process without ``torchrun`` is the same code with a world of 1.

The split of work: every rank plays its own slice of the step's task groups, the episodes
are gathered so that every rank holds the same global batch, and each rank runs the
forward/backward passes of the turn samples it played. Statistics that need the whole
batch (GRPO groups, whitening, the EPO entropy history) are computed from global data.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job; a world of 1 makes every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place, and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(timeout_minutes: float = 60.0) -> DistContext:
    """The context ``torchrun`` describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
    NCCL on GPUs, gloo on CPUs. Without those variables: one process, no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank, world_size, local_rank, device)


def free_local_port() -> int:
    """A TCP port free on this machine, for a one-machine rendezvous (tests, benchmarks)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group together: every rank's pending work is done, and no gloo
    worker thread outlives the interpreter (which aborts the process at exit)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def rank_slice(n_groups: int, ctx: DistContext) -> range:
    """The contiguous block of task groups this rank plays; a group never straddles ranks."""
    if n_groups % ctx.world_size:
        raise ValueError(
            f"rollout.tasks_per_step={n_groups} must be divisible by the number of processes ({ctx.world_size})"
        )
    per_rank = n_groups // ctx.world_size
    return range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


def balanced_chunks(chunks_by_rank: list[list[list[int]]], rank: int) -> list[list[int] | None]:
    """This rank's micro-batches, padded with ``None`` (an empty micro-batch) up to the
    largest count of any rank: DDP and FSDP2 need every rank to run as many forward and
    backward passes as the others."""
    longest = max(len(chunks) for chunks in chunks_by_rank)
    mine = chunks_by_rank[rank]
    return mine + [None] * (longest - len(mine))


def wrap_for_training(module: nn.Module, strategy: str, ctx: DistContext) -> nn.Module:
    """DDP around ``module``, or FSDP2: each decoder layer and then the whole module
    sharded with ``fully_shard`` over a 1-D device mesh. A world of 1 leaves it as is."""
    if not ctx.enabled:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers causal LM (its ``layers`` list)."""
    for sub in module.modules():
        layers = getattr(sub, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return []


def unwrap(module: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(module, "module", module)


def no_gradient_sync(module: nn.Module, last: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) for every micro-batch
    of a mini-batch but the last; gradients accumulate locally in between."""
    import contextlib

    if hasattr(module, "no_sync"):
        return contextlib.nullcontext() if last else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters, gradients and norms) as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
