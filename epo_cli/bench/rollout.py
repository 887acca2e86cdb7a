"""The ``rollout`` part: generated tokens per second, our samplers (``TransformersSampler``,
and ``VLLMSampler`` where vLLM is installed) against raw ``model.generate``."""

from __future__ import annotations

import time
from pathlib import Path

from epo_cli.bench.common import in_fresh_process


def _rollout_case(case: str, model_name: str, prompts: int, new_tokens: int) -> dict:
    """Tokens per second generating ``new_tokens`` for a batch of real prompts."""
    import torch

    from epo_cli.envs.base import PromptState, build_prompt
    from epo_cli.models import load_causal_lm, load_tokenizer
    from epo_cli.prompts import encode_prompt
    from epo_cli.sampling.transformers import TransformersSampler

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name).eval()
    observation = "This room is called the kitchen. In it, you see: " + ", ".join(f"a thing {i}" for i in range(40))
    batch = [
        encode_prompt(tokenizer, build_prompt("ScienceWorld", PromptState(f"boil water {i}", observation, ["open OBJ", "go OBJ"]), 0, 30), 2048, "truncate")[0]
        for i in range(prompts)
    ]
    if case == "ours":
        sampler = TransformersSampler(model, tokenizer, batch_size=prompts, generator=torch.Generator().manual_seed(0))
        run = lambda: sum(len(g.token_ids) for g in sampler.generate(batch, new_tokens, 1.0, 1.0))  # noqa: E731
    elif case == "vllm":
        import tempfile

        from epo_cli.models import model_directory
        from epo_cli.sampling.build import build_sampler
        from epo_cli.spec import resolve_spec

        spec = resolve_spec(None, {"model": {"name": model_name}, "rollout": {"backend": "vllm"}}, ["scale=cpu"])
        model_dir = model_directory(model_name, tokenizer, Path(tempfile.mkdtemp(prefix="epo-bench-")))
        sampler = build_sampler(spec, None, tokenizer, torch.Generator().manual_seed(0), model_dir)
        run = lambda: sum(len(g.token_ids) for g in sampler.generate(batch, new_tokens, 1.0, 1.0))  # noqa: E731
    else:
        tokenizer.padding_side = "left"
        encoded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")

        def run():
            with torch.no_grad():
                out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, pad_token_id=tokenizer.pad_token_id)
            return int((out[:, encoded["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum())

    run()
    started = time.perf_counter()
    tokens = run()
    result = {"tokens_per_s": tokens / (time.perf_counter() - started), "tokens": tokens}
    if case == "vllm":
        import vllm

        result["version"] = vllm.__version__
    return result


def rollout_rows(model_name: str, prompts: int, new_tokens: int):
    """Raw generate, ours, and the vLLM backend where vLLM is installed (``nox -s vllm``)."""
    import importlib.util

    raw = in_fresh_process(_rollout_case, "raw", model_name, prompts, new_tokens)
    ours = in_fresh_process(_rollout_case, "ours", model_name, prompts, new_tokens)
    vllm = in_fresh_process(_rollout_case, "vllm", model_name, prompts, new_tokens) if importlib.util.find_spec("vllm") else None
    return raw, ours, vllm


def render_rollout(model_name: str, prompts: int, new_tokens: int, raw: dict, ours: dict, vllm: dict | None = None) -> str:
    import transformers

    lines = [
        "",
        "## Rollout: ours vs raw `model.generate`",
        "",
        f"{model_name}, {prompts} ScienceWorld-style prompts, up to {new_tokens} sampled tokens each "
        "(temperature 1.0), KV cache on in both, second of two runs timed.",
        "",
        "| sampler | generated tokens | tokens/s | ratio |",
        "|---|---:|---:|---:|",
        f"| `model.generate` (baseline) | {raw['tokens']} | {raw['tokens_per_s']:.1f} | 1.00x |",
        f"| ours (`TransformersSampler`) | {ours['tokens']} | {ours['tokens_per_s']:.1f} | {ours['tokens_per_s'] / raw['tokens_per_s']:.2f}x |",
    ]
    if vllm is not None:
        lines.append(f"| ours (`VLLMSampler`, vLLM {vllm['version']} on CPU, fp32) | {vllm['tokens']} | "
                     f"{vllm['tokens_per_s']:.1f} | {vllm['tokens_per_s'] / raw['tokens_per_s']:.2f}x |")
    lines += ["", f"transformers {transformers.__version__}. Both of ours stop a response at `</action>` or EOS; "
              "`model.generate` runs to the token limit."]
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block: 8 prompts, up to 32 new tokens each, with the command line's ``--model``."""
    return render_rollout(args.model, 8, 32, *rollout_rows(args.model, 8, 32))
