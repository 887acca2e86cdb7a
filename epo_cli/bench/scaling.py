"""The ``scaling`` part: seconds per data-parallel update (``Learner.learn``) with one
process against two (DDP and FSDP2, gloo on CPU)."""

from __future__ import annotations

import time

from epo_cli.bench.common import synthetic_batch


def _scaling_rank(rank: int, world: int, port: int, strategy: str, model_name: str, samples: int, repeats: int, out: str) -> None:
    """One rank of a data-parallel update benchmark: ``Learner.learn`` (scoring passes,
    GRPO+EPO loss, backward, gradient reduction, AdamW) on a fixed global batch."""
    import os

    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from epo_cli.distributed import init_distributed, shutdown_distributed
    from epo_cli.learner import Learner
    from epo_cli.models import load_tokenizer
    from epo_cli.spec import resolve_spec

    dist = init_distributed()
    spec = resolve_spec(None, {"algo": {"name": "grpo+epo"}, "model": {"name": model_name}, "distributed": {"strategy": strategy}},
                        ["scale=cpu", "model.autocast=none", f"optim.mini_batch_size={samples}", "optim.micro_batch_size=2"])
    tokenizer = load_tokenizer(model_name)
    learner = Learner(spec, tokenizer.pad_token_id, dist)
    batch = synthetic_batch(len(tokenizer), samples, 480, 40)
    episodes_per_rank = (samples // 2) // world
    times = []
    for step in range(repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        learner.learn(batch, batch.episode_ids // episodes_per_rank, step)
        dist.barrier()
        times.append(time.perf_counter() - started)
    if dist.is_main:
        tokens = sum(batch.sequence_length(r) for r in range(len(batch)))
        torch.save({"seconds": sum(times[1:]) / repeats, "tokens": tokens}, out)
    shutdown_distributed(dist)


def scaling_rows(model_name: str, samples: int, repeats: int) -> list[tuple[str, int, dict]]:
    """Seconds per global update for 1 process and for 2 processes (DDP, FSDP2)."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from epo_cli.distributed import free_local_port

    rows = []
    for world, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp2")):
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result.pt"
            args = (world, free_local_port(), strategy, model_name, samples, repeats, out)
            mp.spawn(_scaling_rank, args=args, nprocs=world, join=True)
            rows.append((strategy if world > 1 else "one process", world, torch.load(out)))
    return rows


def render_scaling(model_name: str, samples: int, rows) -> str:
    base = rows[0][2]
    lines = [
        "",
        "## Data parallel: 2 processes vs 1 (gloo, CPU)",
        "",
        f"{model_name}, one GRPO+EPO `Learner.learn` (scoring pass, loss, backward, gradient reduction, AdamW) on a "
        f"fixed global batch of {samples} turn samples ({base['tokens']} tokens), fp32, micro-batches of 2. "
        f"The machine's {__import__('os').cpu_count()} cores are split between the processes (threads per process = "
        "cores / processes), so the ideal ratio here is 1.0x: this measures the cost of the data-parallel machinery, "
        "not a speed-up, which needs more devices.",
        "",
        "| setting | processes | s / update | tokens/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, world, result in rows:
        rate = result["tokens"] / result["seconds"]
        lines.append(f"| {label} | {world} | {result['seconds']:.1f} | {rate:.0f} | {base['seconds'] / result['seconds']:.2f}x |")
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block, measured with the command line's ``--model``, ``--samples`` and ``--repeats``."""
    return render_scaling(args.model, args.samples, scaling_rows(args.model, args.samples, args.repeats))
