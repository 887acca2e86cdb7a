"""The ``recipe_rollout`` part: rollout seconds of one RL step of each CPU recipe
(real engines, constrained actions), one forward pass per token vs forced-token runs fed
in one pass (``rollout.fast_forward``), from the same seed."""

from __future__ import annotations

import time
from pathlib import Path

from epo_cli.bench.common import in_fresh_process

RECIPE_FOLDER = Path(__file__).resolve().parents[2] / "experiments" / "cpu"  # the repository's recipes
RECIPES = {
    "ALFWorld pick_and_place_simple": RECIPE_FOLDER / "alfworld_pick_grpo_epo.yaml",
    "ScienceWorld find-non-living-thing": RECIPE_FOLDER / "scienceworld_find_grpo_epo.yaml",
}


def _recipe_case(spec_file: Path, model_name: str, fast_forward: bool) -> dict:
    """Play one RL step's episodes of a recipe with the base model; time the whole rollout
    (sampling and engine steps), as ``perf/rollout_s`` does."""
    import torch

    from epo_cli.envs.base import TaskSampler, grouped_tasks, of_task_types
    from epo_cli.envs.pool import env_batch_for
    from epo_cli.envs.registry import load_split
    from epo_cli.models import load_causal_lm, load_tokenizer
    from epo_cli.rollout import RolloutSettings, TransformersSampler, play_episodes
    from epo_cli.spec import resolve_spec

    spec = resolve_spec(spec_file, {"model": {"name": model_name}})
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, spec.model.dtype).eval()
    split = of_task_types(load_split(spec.env.name, spec.env.data_dir, spec.env.train_split), spec.env.task_types, "train")
    tasks, groups = grouped_tasks(TaskSampler(split, spec.train.seed), spec.rollout.tasks_per_step, spec.rollout.group_size)
    sampler = TransformersSampler(model, tokenizer, spec.rollout.generation_batch_size, torch.Generator().manual_seed(0),
                                  spec.model.autocast, fast_forward)
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


def recipe_rows(model_name: str) -> list[tuple[str, dict, dict]]:
    """(recipe, one pass per token, fast-forward) for each recipe, each in a fresh process."""
    return [
        (name, in_fresh_process(_recipe_case, spec_file, model_name, False), in_fresh_process(_recipe_case, spec_file, model_name, True))
        for name, spec_file in RECIPES.items()
    ]


def render_recipe_rollout(model_name: str, rows: list[tuple[str, dict, dict]]) -> str:
    lines = [
        "",
        "## Rollout of one RL step of the CPU recipes: one pass per token vs fast-forward",
        "",
        f"{model_name} (base weights), each recipe's episodes of one step (`rollout.tasks_per_step` x `group_size`) "
        "on the real engines with `rollout.constrain: admissible`, the same seed in both settings; the time includes "
        "the engines' steps. `same responses`: both settings sampled identical tokens, as they must.",
        "",
        "| recipe | episodes | turns | prompt tokens / turn | response tokens | one pass per token (s) | fast-forward (s) | speed-up | same responses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, slow, fast in rows:
        same = "yes" if slow["responses"] == fast["responses"] else "NO"
        lines.append(f"| {name} | {fast['episodes']} | {fast['turns']} | {fast['prompt_tokens']:.0f} | {fast['tokens']} | "
                     f"{slow['seconds']:.1f} | {fast['seconds']:.1f} | {slow['seconds'] / fast['seconds']:.2f}x | {same} |")
    return "\n".join(lines) + "\n"


def measure(args) -> str:
    """This part's block, with the command line's ``--model``."""
    return render_recipe_rollout(args.model, recipe_rows(args.model))
