"""The ``packed`` part: the update on real ALFWorld and ScienceWorld episodes in the
conversation prompt format (``rollout.prompt_format: conversation``), one sequence per turn
against one packed sequence per segment: tokens run through the backbone and seconds per
update, with the settings of the CPU recipes (experiments/cpu/*_grpo_epo.yaml)."""

from __future__ import annotations

import time
from pathlib import Path

from epo_cli.bench.common import in_fresh_process
from epo_cli.bench.recipe_rollout import RECIPES


def _packed_case(spec_file: Path, model_name: str, episodes: int, repeats: int, max_turns: int | None = None) -> dict:
    """Play ``episodes`` episodes of a recipe's tasks (``group_size`` per task) in each
    prompt format (one timed rollout each, same tasks and seed), then time ``repeats``
    updates (after one warm-up): on the conversation episodes through each path, and on
    the windowed episodes per turn (the windowed format's own step)."""
    import torch

    from epo_cli.batch import TurnBatch
    from epo_cli.envs.base import of_task_types
    from epo_cli.envs.pool import env_batch_for
    from epo_cli.envs.registry import load_split
    from epo_cli.learner import Learner
    from epo_cli.models import load_tokenizer
    from epo_cli.rollout import RolloutSettings, play_episodes
    from epo_cli.sampling.build import build_sampler
    from epo_cli.spec import resolve_spec

    # fp32 throughout (not the CPU scale's bf16 where the processor has it): the two layouts' costs.
    overrides = [f"model.name={model_name}", "rollout.prompt_format=conversation", "env.workers=0", "model.autocast=none",
                 "rollout.dtype=float32", "algo.tis_cap=null"]
    if max_turns is not None:
        overrides.append(f"env.max_turns={max_turns}")
    spec = resolve_spec(spec_file, None, overrides)
    torch.manual_seed(spec.train.seed)
    tokenizer = load_tokenizer(model_name)
    learner = Learner(spec, tokenizer.pad_token_id)
    group = min(spec.rollout.group_size, episodes)
    split = of_task_types(load_split(spec.env.name, spec.env.data_dir, spec.env.train_split), spec.env.task_types, spec.env.train_split)
    tasks = [split[i // group] for i in range(episodes)]

    def play(prompt_format: str) -> tuple[TurnBatch, float]:
        """The episodes in ``prompt_format`` and the seconds their rollout took."""
        envs = env_batch_for(spec, episodes)
        try:
            played_spec = spec.model_copy(deep=True)
            played_spec.rollout.prompt_format = prompt_format  # the sampler keeps KV caches in conversation format only
            sampler = build_sampler(played_spec, learner.policy, tokenizer, torch.Generator().manual_seed(spec.train.seed))
            settings = RolloutSettings.from_spec(played_spec)
            started = time.perf_counter()
            played = play_episodes(sampler, tokenizer, envs, tasks, [i // group for i in range(episodes)], settings)
            return TurnBatch.from_episodes(played), time.perf_counter() - started
        finally:
            envs.close()

    def update_seconds(batch: TurnBatch, prompt_format: str) -> float:
        """Mean seconds of ``repeats`` updates on ``batch`` through ``prompt_format``'s path."""
        learner.spec.rollout.prompt_format = prompt_format  # the learner's path; the episodes stay
        owner = torch.zeros(len(batch), dtype=torch.long)
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            learner.learn(batch, owner, 0)
            times.append(time.perf_counter() - started)
        return sum(times[1:]) / repeats

    batch, rollout_s = play("conversation")
    windowed, windowed_rollout_s = play("windowed")
    result = {"episodes": episodes, "turns": len(batch), "segments": len(batch.segments()),
              "rollout_conversation_s": rollout_s, "rollout_windowed_s": windowed_rollout_s}
    for path, prompt_format in (("per_turn", "windowed"), ("packed", "conversation")):
        learner.spec.rollout.prompt_format = prompt_format
        result[f"{path}_tokens"] = learner.pass_tokens(batch)
        result[f"{path}_s"] = update_seconds(batch, prompt_format)
    result["windowed_turns"] = len(windowed)
    result["windowed_update_s"] = update_seconds(windowed, "windowed")
    return result


def packed_rows(model_name: str, episodes: int, repeats: int, max_turns: int | None = None) -> list[tuple[str, dict]]:
    """(recipe, its figures) for each CPU recipe, each in a fresh process."""
    return [(name, in_fresh_process(_packed_case, spec_file, model_name, episodes, repeats, max_turns))
            for name, spec_file in RECIPES.items()]


def render_packed(model_name: str, rows: list[tuple[str, dict]]) -> str:
    lines = [
        "",
        "## Packed update: one forward per episode segment",
        "",
        f"{model_name}, episodes played in the conversation prompt format (`rollout.prompt_format: conversation`) "
        "with the CPU recipes' settings (experiments/cpu/alfworld_pick_grpo_epo.yaml, "
        "experiments/cpu/scienceworld_find_grpo_epo.yaml: `rollout.constrain: admissible`, GRPO+EPO, their "
        "mini- and micro-batch sizes), then the same update on the same episodes through each path: one sequence "
        "per turn (each turn re-reads its whole prompt) or one packed sequence per segment. Tokens: the sequence "
        "tokens of one pass over the batch; seconds: one `Learner.learn` (scoring passes, forward, EPO loss, "
        "backward, AdamW), mean of timed repeats after one warm-up. A last column below 1 means a packed token "
        "costs more than a per-turn one: packed sequences are longer (attention grows with their square) and a "
        "micro-batch of segments holds fewer, longer rows.",
        "",
        "| recipe | episodes | turns | segments | tokens per-turn | tokens packed | token ratio | s per-turn | "
        "s packed | time ratio | time ratio / token ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        token_ratio = r["per_turn_tokens"] / r["packed_tokens"]
        time_ratio = r["per_turn_s"] / r["packed_s"]
        lines.append(
            f"| {name} | {r['episodes']} | {r['turns']} | {r['segments']} | {r['per_turn_tokens']} | {r['packed_tokens']} | "
            f"{token_ratio:.2f}x | {r['per_turn_s']:.2f} | {r['packed_s']:.2f} | {time_ratio:.2f}x | "
            f"{time_ratio / token_ratio:.2f} |"
        )
    lines += [
        "",
        "Whole steps, each format as a run would use it: the same tasks played in the windowed format (the "
        "paper's, per-turn update) and in the conversation format (packed update, and the sampler's prefix cache: "
        "a turn prefills only its new tokens). Rollout seconds: one timed rollout each, the conversation one first "
        "(it pays the warm-up); update seconds as above, on each format's own episodes. Turns differ where the two "
        "formats' episodes do.",
        "",
        "| recipe | turns windowed | turns conversation | rollout s windowed | rollout s conversation | "
        "update s windowed | update s packed | step s windowed | step s conversation | step ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        windowed = r["rollout_windowed_s"] + r["windowed_update_s"]
        conversation = r["rollout_conversation_s"] + r["packed_s"]
        lines.append(
            f"| {name} | {r['windowed_turns']} | {r['turns']} | {r['rollout_windowed_s']:.1f} | "
            f"{r['rollout_conversation_s']:.1f} | {r['windowed_update_s']:.1f} | {r['packed_s']:.1f} | {windowed:.1f} | "
            f"{conversation:.1f} | {windowed / conversation:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block, measured with the command line's ``--model``, ``--episodes`` and ``--repeats``."""
    return render_packed(args.model, packed_rows(args.model, args.episodes, args.repeats))
