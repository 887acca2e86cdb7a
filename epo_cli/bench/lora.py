"""The ``lora`` part: full fine-tuning against LoRA adapters of ranks 1, 8 and 32 on the
same update (peak memory, update tokens/s, checkpoint size), each in a fresh process."""

from __future__ import annotations


from epo_cli.bench.common import in_fresh_process, synthetic_batch, timed_updates

RANKS = (1, 8, 32)


def lora_case(rank: int | None, model_name: str, samples: int, micro: int, repeats: int) -> dict:
    """One update (forward, EPO loss, backward, fused AdamW step), meant for a fresh process, of full fine-tuning
    (``rank`` None) or of LoRA adapters of ``rank``; seconds per update, peak RSS above the
    level after loading, tokens, trained parameters and the bytes one checkpoint writes."""
    import tempfile
    from pathlib import Path

    import torch

    from epo_cli.bench.update import epo_update
    from epo_cli.models import load_tokenizer, trainable_model, trainable_parameters
    from epo_cli.spec import ModelSpec

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_name)
    model, peft_model = trainable_model(ModelSpec(name=model_name, lora={"rank": rank}), 0, torch.device("cpu"))
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    batch = synthetic_batch(len(tokenizer), samples, 480, 40)
    seconds, peak_mb = timed_updates(lambda: epo_update(model, batch, micro, tokenizer.pad_token_id), optimizer, repeats)
    with tempfile.TemporaryDirectory() as folder:  # what a checkpoint writes for the policy
        (peft_model or model).save_pretrained(folder, **({"save_embedding_layers": False} if peft_model else {}))
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    tokens = sum(batch.sequence_length(r) for r in range(samples))
    return {"seconds": seconds, "peak_mb": peak_mb, "tokens": tokens,
            "trained": sum(p.numel() for p in params), "checkpoint_mb": size / 2**20}


def lora_rows(model_name: str, samples: int, micro: int, repeats: int) -> list[tuple[int | None, dict]]:
    return [(rank, in_fresh_process(lora_case, rank, model_name, samples, micro, repeats)) for rank in (None, *RANKS)]


def render_lora(model_name: str, samples: int, micro: int, rows: list[tuple[int | None, dict]]) -> str:
    full = rows[0][1]
    lines = [
        "",
        "## LoRA adapters against full fine-tuning",
        "",
        f"{model_name}, the update of the table above ({samples} turn samples, {full['tokens']} tokens, micro-batches "
        f"of {micro}, fp32, fused AdamW), each setting in its own fresh process. `model.lora.rank=R` trains "
        "adapters on every attention and MLP projection (alpha = 2R); the checkpoint column is the policy folder a "
        "checkpoint writes (safetensors: full weights, or the adapters).",
        "",
        "| policy | trained parameters | s / update | update tokens/s | peak memory above model (MB) | "
        "checkpoint (MB) | speed vs full | memory vs full | checkpoint vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, result in rows:
        lines.append(
            f"| {'full fine-tuning (baseline)' if rank is None else f'LoRA rank {rank}'} | {result['trained']:,} | "
            f"{result['seconds']:.2f} | {result['tokens'] / result['seconds']:.0f} | {result['peak_mb']:.0f} | "
            f"{result['checkpoint_mb']:.1f} | {full['seconds'] / result['seconds']:.2f}x | "
            f"{result['peak_mb'] / max(full['peak_mb'], 1):.2f}x | {result['checkpoint_mb'] / full['checkpoint_mb']:.3f}x |"
        )
    state = ", ".join(f"{'full' if rank is None else f'rank {rank}'} {optimizer_state_mb(result['trained']):,.0f} MB"
                      for rank, result in rows)
    lines += ["", f"What the adapters save in memory is the trained parameters' gradients and AdamW moments, 12 bytes "
                  f"each in fp32: {state}. The peak column is the process's RSS high-water mark, which the micro-batch's "
                  "activations and logits set; it does not show that saving."]
    return "\n".join(lines) + "\n"


def optimizer_state_mb(trained: int) -> float:
    """Gradients and AdamW's two moments of ``trained`` fp32 parameters, in MB."""
    return 12 * trained / 2**20


def measure(args) -> str:
    """This part's block, measured with the command line's ``--model``, ``--samples``, ``--micro`` and ``--repeats``."""
    return render_lora(args.model, args.samples, args.micro, lora_rows(args.model, args.samples, args.micro, args.repeats))
