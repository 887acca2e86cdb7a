"""The ``recipe_rollout`` part: rollout seconds of one RL step of each CPU recipe (real
engines, constrained actions, the same seed) through the transformers sampler's paths:
one forward pass per token (the baseline), forced-token runs fed in one pass
(``rollout.fast_forward``), identical prompts of a batch prefilled once, a bf16 copy of
the weights (``rollout.dtype``), then the conversation format with each episode's KV cache
kept between turns (``rollout.prefix_cache``)."""

from __future__ import annotations

import time
from pathlib import Path

from epo_cli.bench.common import in_fresh_process

RECIPE_FOLDER = Path(__file__).resolve().parents[2] / "experiments" / "cpu"  # the repository's recipes
RECIPES = {
    "ALFWorld pick_and_place_simple": RECIPE_FOLDER / "alfworld_pick_grpo_epo.yaml",
    "ScienceWorld find-non-living-thing": RECIPE_FOLDER / "scienceworld_find_grpo_epo.yaml",
}


# (label, fast_forward, share_prompts, prefix_cache, prompt_format, dtype): each adds one path to the one before.
SETTINGS = (
    ("one pass per token", False, False, False, "windowed", "float32"),
    ("fast-forward", True, False, False, "windowed", "float32"),
    ("+ shared prompts", True, True, False, "windowed", "float32"),
    ("+ bf16 weights", True, True, False, "windowed", "bfloat16"),
    ("+ conversation, prefix cache", True, True, True, "conversation", "bfloat16"),
)


def recipe_setting(spec_file: Path) -> int | None:
    """Index in :data:`SETTINGS` of the path the recipe itself takes on this machine: the last
    setting (each turns on one more default path) with the recipe's prompt format and the
    sampler dtype its scale preset gives; None if no setting has both."""
    from epo_cli.sampling.build import sampler_dtype
    from epo_cli.spec import resolve_spec

    spec = resolve_spec(spec_file, {})
    matching = [index for index, setting in enumerate(SETTINGS)
                if setting[4:] == (spec.rollout.prompt_format, sampler_dtype(spec))]
    return matching[-1] if matching else None


def _recipe_case(spec_file: Path, model_name: str, fast_forward: bool, share_prompts: bool, prefix_cache: bool,
                 prompt_format: str, dtype: str) -> dict:
    """Play one RL step's episodes of a recipe with the base model; time the whole rollout
    (sampling and engine steps), as ``perf/rollout_s`` does."""
    import torch

    from epo_cli.envs.base import TaskSampler, grouped_tasks, of_task_types
    from epo_cli.envs.pool import env_batch_for
    from epo_cli.envs.registry import load_split
    from epo_cli.models import load_causal_lm, load_tokenizer
    from epo_cli.rollout import RolloutSettings, play_episodes
    from epo_cli.sampling.transformers import TransformersSampler
    from epo_cli.spec import resolve_spec

    spec = resolve_spec(spec_file, {"model": {"name": model_name}, "rollout": {"prompt_format": prompt_format}})
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, dtype).eval()
    split = of_task_types(load_split(spec.env.name, spec.env.data_dir, spec.env.train_split), spec.env.task_types, "train")
    tasks, groups = grouped_tasks(TaskSampler(split, spec.train.seed), spec.rollout.tasks_per_step, spec.rollout.group_size)
    # No autocast: each setting's weight dtype alone sets the sampler's precision.
    sampler = TransformersSampler(model, tokenizer, spec.rollout.generation_batch_size, torch.Generator().manual_seed(0),
                                  "none", fast_forward, prefix_cache=prefix_cache, share_prompts=share_prompts)
    envs = env_batch_for(spec, len(tasks))
    try:
        started = time.perf_counter()
        episodes = play_episodes(sampler, tokenizer, envs, tasks, groups, RolloutSettings.from_spec(spec))
        seconds = time.perf_counter() - started
    finally:
        envs.close()
    turns = [turn for episode in episodes for turn in episode.turns]
    return {
        "seconds": seconds,
        "episodes": len(episodes),
        "turns": len(turns),
        "tokens": sum(len(t.response_ids) for t in turns),
        "prompt_tokens": sum(len(t.prompt_ids) for t in turns) / len(turns),
        "responses": [t.response_ids for t in turns],
    }


def recipe_rows(model_name: str) -> list[tuple[str, list[dict], int | None]]:
    """(recipe, its figures in each of :data:`SETTINGS`, the index of its own path) for each
    recipe, each case in a fresh process."""
    return [(name, [in_fresh_process(_recipe_case, spec_file, model_name, *setting[1:]) for setting in SETTINGS],
             recipe_setting(spec_file)) for name, spec_file in RECIPES.items()]


def render_recipe_rollout(model_name: str, rows: list[tuple[str, list[dict], int | None]]) -> str:
    labels = [label for label, *_ in SETTINGS]
    lines = [
        "",
        "## Rollout of one RL step of the CPU recipes: the transformers sampler's paths",
        "",
        f"{model_name} (base weights), each recipe's episodes of one step (`rollout.tasks_per_step` x `group_size`) "
        "on the real engines with `rollout.constrain: admissible`, the same seed in every setting; the time includes "
        "the engines' steps. Each setting adds one path to the one before: forced-token runs fed in one pass "
        "(`rollout.fast_forward`), identical prompts of a batch (a group's first turn) prefilled once, a bf16 copy "
        "of the weights (`rollout.dtype: bfloat16`, which the CPU scale sets on processors with native bf16), and "
        "the conversation prompt format with each episode's KV cache kept between turns (`rollout.prefix_cache`: a "
        "turn prefills only its new message; a segment restart reuses the system text and task). In every "
        "setting prompts with unlike numbers of tokens to feed are prefilled in passes of their own (at most 25% "
        "padding per pass). Speed-ups are against the first setting; `recipe's path`: the setting the recipe "
        "itself runs on this machine (its prompt format, its scale's sampler dtype). `same responses`: the fp32 "
        "windowed settings sampled identical tokens, as they must (bf16 numerics move the samples; the "
        "conversation format's prompts, and so its episodes, differ).",
        "",
        "| recipe | episodes | turns (windowed / conversation) | prompt tokens / turn (windowed / conversation) | "
        + " | ".join(f"{label} (s)" for label in labels) + " | " + " | ".join(f"speed-up {label}" for label in labels[1:])
        + " | recipe's path | same responses |",
        "|---|---:|---:|---:|" + "---:|" * (2 * len(labels) - 1) + "---|---|",
    ]
    for name, cases, own in rows:
        exact = [case for case, setting in zip(cases, SETTINGS) if setting[4:] == ("windowed", "float32")]
        windowed = cases[0]
        conversation = next(case for case, setting in zip(cases, SETTINGS) if setting[4] == "conversation")
        same = "yes" if all(case["responses"] == windowed["responses"] for case in exact) else "NO"
        path = "none measured" if own is None else f"{labels[own]}: {windowed['seconds'] / cases[own]['seconds']:.2f}x"
        lines.append(
            f"| {name} | {windowed['episodes']} | {windowed['turns']} / {conversation['turns']} | "
            f"{windowed['prompt_tokens']:.0f} / {conversation['prompt_tokens']:.0f} | "
            + " | ".join(f"{case['seconds']:.1f}" for case in cases) + " | "
            + " | ".join(f"{windowed['seconds'] / case['seconds']:.2f}x" for case in cases[1:]) + f" | {path} | {same} |"
        )
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block, with the command line's ``--model``."""
    return render_recipe_rollout(args.model, recipe_rows(args.model))
