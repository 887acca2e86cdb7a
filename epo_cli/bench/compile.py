"""The ``compile`` part: the LM head's log-probs + entropy chunk (forward and backward),
eager against ``torch.compile`` (``model.compile_lm_head``), at several response lengths."""

from __future__ import annotations

import time

from epo_cli.bench.common import in_fresh_process


def _chunk_case(compiled: bool, model_name: str, tokens: int, repeats: int) -> float:
    """Seconds for log-probs + entropy of ``tokens`` response positions through the LM head
    (forward and backward), eager or under ``torch.compile`` (compiled in the warm-up)."""
    import torch

    from epo_cli.algos.entropy import logprobs_and_entropy
    from epo_cli.models import load_causal_lm

    weight = load_causal_lm(model_name).get_output_embeddings().weight.detach().clone().requires_grad_()
    hidden = torch.randn(tokens, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (tokens,))
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        logp, entropy = logprobs_and_entropy(hidden, weight, targets, 1.0, 1024, compiled)
        (logp.sum() + 0.01 * entropy.sum()).backward()
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / repeats


def compile_rows(model_name: str, repeats: int) -> list[tuple[int, float, float]]:
    return [
        (tokens, in_fresh_process(_chunk_case, False, model_name, tokens, repeats), in_fresh_process(_chunk_case, True, model_name, tokens, repeats))
        for tokens in (160, 1024, 4096)
    ]


def render_compile(model_name: str, rows) -> str:
    lines = [
        "",
        "## LM-head chunk: eager vs `torch.compile`",
        "",
        f"{model_name}'s LM head (vocabulary x hidden), log-probs + entropy of N response positions, forward and "
        "backward (chunks of 1024, recomputed in backward), fp32; compilation excluded (warm-up).",
        "",
        "| response tokens | eager (s) | compiled (s) | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {tokens} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f}x |" for tokens, eager, compiled in rows]
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block, measured with the command line's ``--model`` and ``--repeats``."""
    return render_compile(args.model, compile_rows(args.model, args.repeats))
