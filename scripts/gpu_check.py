"""The GPU check (docs/performance.md): prove the CUDA training path in one short run.

Stages, each recorded even when another fails:
1. parity: per-token log-probs and entropies of one batch, CPU fp32 vs DEVICE fp32 (and
   DEVICE bf16 autocast, reported), through the trainer's own forward (``forward_turns``);
2. train: ``epo train --env toy --algo ppo+epo`` for a few steps with bf16 autocast, for a
   SmolLM2-135M-shaped and a ~1B-shaped (Llama-3.2-1B) model, randomly initialized (no
   weights travel): rollout and update tokens/s, peak GPU memory, update MFU;
3. stage 2's small model with ``model.compile_lm_head`` on; with ``rollout.fast_forward``
   off (one forward pass per forced token, the slow baseline); and on the multi-turn toy
   in the windowed prompt format (one sequence per turn) and in the conversation format
   (the packed update: one sequence per episode).

Writes ``gpu_check.json`` and ``gpu_check.md`` (the tables for docs/benchmarks.md) under
``--out``. ``--device cpu --dry`` runs every stage at tiny sizes (CI keeps it working).
``--merge REPORT.json`` puts a report's tables into docs/benchmarks.md (its ``gpu`` block).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

SHAPES = {  # LlamaConfig fields of randomly initialized models
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0),
    "dry": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0),
}
# The training runs: (name, env, --set settings). The first shape runs them all, the
# larger ones only the first.
VARIANTS = (
    ("", "toy", ()),
    ("compile_lm_head", "toy", ("model.compile_lm_head=true",)),
    ("no fast_forward", "toy", ("rollout.fast_forward=false",)),
    ("multiturn windowed", "toy-multiturn", ()),
    ("multiturn packed", "toy-multiturn", ("rollout.prompt_format=conversation",)),
)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per card (vendor figures)
FP32_TOLERANCE = 2e-3  # max |difference| of log-probs and entropies, CPU fp32 vs GPU fp32 (nats)
PROMPTS = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1 and a fridge 1.",
    "Your task is to: put a clean apple in the fridge. You pick up the apple 1 from the countertop 1.",
    "Each turn, answer with the target word that the observation names. The target is: gold.",
    "This room is called the kitchen. In it, you see: a thermometer, a sink, a stove, a table and a glass cup.",
)
RESPONSE = "<think>The next step is to go to the fridge.</think><action>go to fridge 1</action>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="A tokenizer folder, or a model name epo knows.")
    parser.add_argument("--out", type=Path, required=True, help="Where the report goes.")
    parser.add_argument("--work", type=Path, help="Where models and runs go (default: OUT/work).")
    parser.add_argument("--dry", action="store_true", help="Tiny model, 2 steps: checks that the script runs.")
    parser.add_argument("--steps", type=int, default=4, help="RL steps per training stage (the first is warm-up).")
    parser.add_argument("--stage-timeout", type=int, default=200, help="Seconds allowed to one training stage.")
    parser.add_argument("--merge", type=Path, help="Only merge this gpu_check.json into --out (a benchmarks.md).")
    parser.add_argument("--stages", nargs="*", help="Run only the stages whose names contain one of these words.")
    args = parser.parse_args()
    if args.merge:
        from epo_cli.bench import merge_part

        report = json.loads(args.merge.read_text())
        args.out.write_text(merge_part(args.out.read_text(), "gpu", markdown_table(report)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    report: dict = {"environment": environment(args.device), "stages": []}
    shapes = ["dry"] if args.dry else ["smollm2-135m", "llama-1b"]
    steps = 2 if args.dry else args.steps
    episodes = 8 if args.dry else 256

    def record(name: str, run) -> dict | None:
        started = time.perf_counter()
        try:
            result = {"stage": name, "ok": True, **run()}
        except Exception as err:  # one failed stage must not hide the others' results
            result = {"stage": name, "ok": False, "error": f"{err.__class__.__name__}: {err}"[-2000:],
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["stages"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}), flush=True)
        write_report(report, args.out)
        return result

    def chosen(name: str) -> bool:
        return not args.stages or any(word in name for word in args.stages)

    model_dirs = {}
    for shape in shapes:
        runs = [(f"train {shape} bf16 {name}".strip(), env, settings)
                for name, env, settings in (VARIANTS if shape == shapes[0] else VARIANTS[:1])]
        runs = [run for run in runs if chosen(run[0])]
        parity_stage = f"parity {shape}" if shape == shapes[0] and chosen("parity") else None
        if not runs and parity_stage is None:
            continue
        made = record(f"model {shape}", lambda: make_model(shape, args.tokenizer, work / shape, args.device, model_dirs))
        if not made["ok"]:
            continue
        if parity_stage:
            record(parity_stage, lambda: parity(model_dirs[shape], args.device))
        for name, env, settings in runs:
            record(name, lambda: train(model_dirs[shape], made["parameters"], report["environment"]["card"], args, work,
                                       name.replace(" ", "-"), env, steps, episodes, settings))
    print(markdown_table(report))
    failed = [s["stage"] for s in report["stages"] if not s["ok"]]
    if failed:
        print(f"failed stages: {', '.join(failed)} (tracebacks in {args.out / 'gpu_check.json'})")
    sys.exit(1 if failed else 0)


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device, "card": "cpu"}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def make_model(shape: str, tokenizer_name: str, target: Path, device: str, made: dict) -> dict:
    """A randomly initialized Llama of ``shape`` saved with the real tokenizer (bf16 weights:
    half the bytes to write; the trainer loads them in its own dtype)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from epo_cli.models import load_tokenizer

    if Path(tokenizer_name).is_dir():  # a bare tokenizer folder (scripts/prepare_gpu_check.sh)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, local_files_only=True)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(tokenizer_name)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    made[shape] = target
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": parameters}


def parity(model_dir: Path, device: str) -> dict:
    """Log-probs and entropies of the same turns on CPU fp32 and on ``device``."""
    import torch

    from epo_cli.batch import TurnBatch, collate
    from epo_cli.forward import forward_turns
    from epo_cli.models import load_causal_lm, load_tokenizer
    from epo_cli.precision import autocast_context

    tokenizer = load_tokenizer(str(model_dir))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    response = tokenizer(RESPONSE)["input_ids"]
    rows = len(prompts)
    batch = TurnBatch(prompt_ids=prompts, response_ids=[response] * rows, episode_ids=torch.arange(rows),
                      group_ids=torch.arange(rows), turn_index=torch.zeros(rows, dtype=torch.long), rewards=torch.zeros(rows))
    micro = collate(batch, list(range(rows)), tokenizer.pad_token_id)

    def score(target: str, autocast: str):
        model = load_causal_lm(str(model_dir), "float32").to(target).eval()
        with torch.no_grad(), autocast_context(autocast, model):
            out = forward_turns(model, micro.to(torch.device(target)), temperature=1.0)
        return out.logp.float().cpu(), out.entropy.float().cpu()

    mask = micro.response_mask.bool()
    ref_logp, ref_entropy = score("cpu", "none")
    result = {"tokens": int(mask.sum()), "mean_entropy": round(float(ref_entropy[mask].mean()), 4), "tolerance": FP32_TOLERANCE}
    for label, autocast in (("fp32", "none"), ("bf16", "bf16")):
        logp, entropy = score(device, autocast)
        result[f"{label}_max_abs_logp"] = float((logp - ref_logp)[mask].abs().max())
        result[f"{label}_max_abs_entropy"] = float((entropy - ref_entropy)[mask].abs().max())
        result[f"{label}_mean_abs_logp"] = float((logp - ref_logp)[mask].abs().mean())
    worst = max(result["fp32_max_abs_logp"], result["fp32_max_abs_entropy"])
    if worst > FP32_TOLERANCE:
        raise AssertionError(f"fp32 {device} differs from CPU by {worst:.2e} > {FP32_TOLERANCE}: {result}")
    return result


def train(model_dir: Path, parameters: int, card: str, args, work: Path, label: str, env: str, steps: int,
          episodes: int, settings: tuple[str, ...] = ()) -> dict:
    """``epo train --env ENV`` (a toy) in its own process (JSONL tracking: no MLflow needed); the
    rates are means over the steps after the first (warm-up, compilation). MFU counts 6 N
    FLOPs per update token (one forward and backward pass) and 2 N per generated token."""
    from epo_cli.tracking import read_jsonl_metrics

    runs = work / f"runs-{label}"
    command = [
        sys.executable, "-m", "epo_cli", "train", "--env", env, "--algo", "ppo+epo", "--scale", "paper",
        "--model", str(model_dir), "--steps", str(steps), "--run-name", f"gpu-check-{label}",
        "--set", "tracking.backend=jsonl", "--set", f"tracking.uri={runs}",
        "--set", f"checkpoint.dir={work / f'checkpoints-{label}'}", "--set", "checkpoint.every=0",
        "--set", "model.autocast=bf16", *[part for setting in settings for part in ("--set", setting)],
        "--set", "optim.lr=1e-5", "--set", "optim.critic_lr=1e-5",
        "--set", f"rollout.tasks_per_step={episodes}", "--set", f"optim.mini_batch_size={min(episodes, 256)}",
        "--set", f"optim.micro_batch_size={min(episodes, 64)}", "--set", f"rollout.generation_batch_size={min(episodes, 128)}",
    ]
    environment = dict(os.environ, EPO_HOME=str(work / "home"))
    if args.device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=args.stage_timeout)
    (work / f"train-{label}.log").write_text(finished.stdout + finished.stderr)
    if finished.returncode != 0:
        raise RuntimeError(f"epo train exited {finished.returncode}: {(finished.stderr or finished.stdout)[-1500:]}")
    run_folder = next((runs / "epo").iterdir())
    lines = read_jsonl_metrics(run_folder)
    timed = lines[1:] or lines

    def mean(key: str) -> float | None:
        return mean_of([line for line in timed if key in line], lambda line: line[key])

    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in card), None)
    update_rate, rollout_rate = mean("perf/update_tokens_per_s"), mean("perf/rollout_tokens_per_s")
    return {
        "steps": len(lines),
        "episodes_per_step": episodes,
        "step_s": mean("perf/step_s"),
        "rollout_s": mean("perf/rollout_s"),
        "update_s": mean("perf/update_s"),
        "rollout_tokens_per_s": rollout_rate,
        "update_tokens_per_s": update_rate,
        "update_tokens": mean_of(timed, lambda line: line["perf/update_tokens_per_s"] * line["perf/update_s"]),
        "peak_gpu_memory_gib": mean("perf/peak_gpu_memory_gb"),
        "update_mfu": 6 * parameters * update_rate / peak if peak and update_rate else None,
        "rollout_mfu": 2 * parameters * rollout_rate / peak if peak and rollout_rate else None,
        "success_rate_last": lines[-1].get("train/success_rate"),
    }


def mean_of(lines: list[dict], value) -> float | None:
    values = [value(line) for line in lines]
    return sum(values) / len(values) if values else None


def write_report(report: dict, out: Path) -> None:
    staged = out / "gpu_check.json.tmp"
    staged.write_text(json.dumps(report, indent=1))
    staged.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown_table(report))


TRAIN_COLUMNS = (  # (header, key, format)
    ("episodes/step", "episodes_per_step", "{:d}"),
    ("step s", "step_s", "{:.2f}"),
    ("rollout s", "rollout_s", "{:.2f}"),
    ("update s", "update_s", "{:.2f}"),
    ("update tokens", "update_tokens", "{:,.0f}"),
    ("rollout tok/s", "rollout_tokens_per_s", "{:,.0f}"),
    ("update tok/s", "update_tokens_per_s", "{:,.0f}"),
    ("peak GiB", "peak_gpu_memory_gib", "{:.1f}"),
    ("update MFU", "update_mfu", "{:.1%}"),
    ("rollout MFU", "rollout_mfu", "{:.2%}"),
)


def markdown_table(report: dict) -> str:
    """The report as the tables docs/benchmarks.md shows: parity, then training."""
    env = report["environment"]
    stages = report["stages"]
    lines = [
        "## GPU check (`scripts/gpu_check.sh`, docs/performance.md)",
        "",
        f"Measured {env['date']} on {env['card']}; Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}. Random-weight models with the real tokenizer; `epo train --env toy --algo ppo+epo "
        "--scale paper`, bf16 autocast, fp32 weights; rates are means over the steps after the first.",
        "",
    ]
    for stage in (s for s in stages if s["stage"].startswith("parity") and s["ok"]):
        lines += [
            f"Parity ({stage['stage']}, {stage['tokens']} response tokens, mean entropy {stage['mean_entropy']} nats), "
            f"difference from CPU fp32 (tolerance for fp32: {stage['tolerance']}):",
            "",
            "| device precision | max abs log-prob | mean abs log-prob | max abs entropy |",
            "|---|---:|---:|---:|",
        ]
        for label in ("fp32", "bf16"):
            lines.append(f"| {env['device']} {label} | {stage[f'{label}_max_abs_logp']:.2e} | "
                         f"{stage[f'{label}_mean_abs_logp']:.2e} | {stage[f'{label}_max_abs_entropy']:.2e} |")
        lines.append("")
    trained = [s for s in stages if s["stage"].startswith("train") and s["ok"]]
    if trained:
        parameters = {s["stage"].split()[1]: s["parameters"] for s in stages if s["stage"].startswith("model") and s["ok"]}
        lines += ["| run | parameters | " + " | ".join(h for h, _, _ in TRAIN_COLUMNS) + " |",
                  "|---|---:|" + "---:|" * len(TRAIN_COLUMNS)]
        for stage in trained:
            count = parameters.get(stage["stage"].split()[1])
            cells = [fmt.format(stage[key]) if stage.get(key) is not None else "n/a" for _, key, fmt in TRAIN_COLUMNS]
            lines.append(f"| {stage['stage']} | {count / 1e6:.0f}M | " + " | ".join(cells) + " |")
        lines.append("")
    for stage in (s for s in stages if not s["ok"]):
        lines.append(f"- {stage['stage']} FAILED after {stage['seconds']} s: {stage['error'].splitlines()[-1][:300]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
