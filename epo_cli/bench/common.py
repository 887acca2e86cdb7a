"""What several benchmark parts share: a synthetic batch of turn samples (the update and
scaling parts), timing repeated updates, and running a case in a fresh process (so that
its memory and its warm caches are its own)."""

from __future__ import annotations


def synthetic_batch(vocab: int, samples: int, prompt: int, response: int, seed: int = 0):
    """Turn samples with the CPU-scale shape: long prompts, short responses of varied length."""
    import torch

    from epo_cli.batch import TurnBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt - 16 * (i % 4),), generator=g).tolist() for i in range(samples)]
    responses = [torch.randint(3, vocab, (response - 6 * (i % 5),), generator=g).tolist() for i in range(samples)]
    n = samples
    sample_logp = [torch.zeros(len(r)) for r in responses]
    return TurnBatch(prompts, responses, torch.arange(n) // 2, torch.arange(n) // 4, torch.arange(n) % 2, torch.zeros(n), sample_logp)


def in_fresh_process(function, *args):
    """``function(*args)`` in a new spawned process (not a daemon: it may start engine
    workers of its own); its return value."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def timed_updates(step, optimizer, repeats: int) -> tuple[float, float]:
    """``step()`` (forward and backward) and ``optimizer.step()``, ``repeats`` + 1 times (the
    first warms up); the mean seconds of the others and the process's peak RSS (MB) above
    its level before the first."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):
        optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        step()
        optimizer.step()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return sum(times[1:]) / repeats, (peak - before) / 1024
