"""Preset tables (data only): the algorithm names, the paper's per-algorithm sizes, the
CPU scale, and the named ablation variants. :func:`epo_cli.spec.resolve_spec` layers them
(the order is in spec.py's docstring); an environment's own presets live in its registry
entry (envs/registry.py)."""

from __future__ import annotations

from typing import Any, Literal, get_args

# Every base algorithm, named alone or with +epo: the family whose preset sizes it takes
# (ALGO_PRESETS) and its advantage estimator (algos/estimators.py). Names are parsed here only.
BASE_ALGOS: dict[str, tuple[Literal["ppo", "grpo"], str]] = {
    "ppo": ("ppo", "gae"),
    "grpo": ("grpo", "grpo"),
    "rloo": ("grpo", "rloo"),
    "gigpo": ("grpo", "gigpo"),
    "reinforce++": ("grpo", "reinforce++"),
}
ALGOS: tuple[str, ...] = tuple(f"{base}{suffix}" for base in BASE_ALGOS for suffix in ("", "+epo"))
Variant = Literal["epo", "epo-base", "no-dw", "indicator", "decay", "ea"]
VARIANTS: tuple[str, ...] = get_args(Variant)


# PPO and GRPO differ in batch sizes, lr and group size (paper §5, ScienceWorld column);
# applied before the environment's own presets (envs/registry.py), whose settings win.
ALGO_PRESETS: dict[str, dict[str, Any]] = {
    "ppo": {"rollout": {"group_size": 1}},
    "grpo": {"rollout": {"group_size": 8}, "optim": {"lr": 5e-6, "mini_batch_size": 128, "micro_batch_size": 16}},
}

# Plain PPO/GRPO: the base objective only, unless the user sets the entropy terms.
NO_EPO: dict[str, Any] = {"epo": {"entropy_coef": 0.0, "smoothing": {"enabled": False}}}

# Layer 3: a run that fits 2 CPU cores in minutes. Every field here is one a user would
# otherwise have to shrink by hand; `epo spec show` prints the result.
CPU_SCALE: dict[str, Any] = {
    "model": {"critic": "shared"},
    "env": {"max_turns": 4},
    "train": {"steps": 3},
    "rollout": {
        "tasks_per_step": 4,
        "max_prompt_tokens": 640,
        "max_response_tokens": 40,
        "max_listed_actions": 25,
        "generation_batch_size": 8,
    },
    "optim": {"lr": 1e-5, "mini_batch_size": 32, "micro_batch_size": 4},
    "eval": {"every": 0, "episodes": 8},
    "tracking": {"transcripts": "all"},
}
CPU_SCALE_GRPO: dict[str, Any] = {"rollout": {"tasks_per_step": 2, "group_size": 2}}
# On a processor with bf16 matrix instructions a bf16 copy of the weights prefills about
# 2.4x faster than fp32, and an update under bf16 autocast (fp32 weights, AdamW state and
# LM head) runs about 2x faster (docs/performance.md); the update corrects for the
# sampler's other numerics with truncated importance weights.
CPU_SCALE_BF16: dict[str, Any] = {
    "model": {"autocast": "bf16"},
    "rollout": {"dtype": "bfloat16"},
    "algo": {"tis_cap": 2.0},
}


# The paper's ablations as named spec changes. ``ea`` shapes the
# advantages: alone on ppo/grpo (the paper's EA baseline), beside L_H on the +epo names.
VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "epo": {},
    "epo-base": {"epo": {"smoothing": {"enabled": False}}},
    "no-dw": {"epo": {"weighting": {"dynamic": False}}},
    "indicator": {"epo": {"smoothing": {"form": "indicator"}}},
    "decay": {"epo": {"smoothing": {"enabled": False}, "decay": {"turn_decay": 0.9, "step_schedule": "linear"}}},
    "ea": {"epo": {"smoothing": {"enabled": False}, "entropy_advantage": {"enabled": True}}},
}


# Variants that only change lambda * (L_H - beta L_smooth): nothing to change without it.
ENTROPY_BONUS_VARIANTS = ("epo-base", "no-dw", "indicator", "decay")


# The ablations of `epo ablate NAME`, each arm a spec layer over the base algorithm.
def algo_layer(name: str) -> dict[str, Any]:
    return {"algo": {"name": name}}


def _epo(**fields: Any) -> dict[str, Any]:
    return {"epo": fields}


def ablation_variants(ablation: str, base: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, spec layer) pairs for an ablation of the ``base`` algorithm (ppo or grpo)."""
    epo = algo_layer(f"{base}+epo")
    with_variant = lambda variant: {"algo": {"name": f"{base}+epo", "variant": variant}}  # noqa: E731
    table = {
        "smoothing": [("epo", epo), ("epo-base", with_variant("epo-base"))],
        "weighting": [("epo", epo), ("no-dw", with_variant("no-dw"))],
        "penalty-form": [("hinge", epo), ("indicator", with_variant("indicator"))],
        "history": [
            ("cumulative", epo),
            ("window-5", {**epo, **_epo(smoothing={"window": 5})}),
            ("per-turn", {**epo, **_epo(smoothing={"history": "turn"})}),
        ],
        "decay": [("epo", epo), ("decay", with_variant("decay"))],
        "ea": [("epo", epo), ("ea", with_variant("ea"))],
        "baseline": [(base, algo_layer(base)), (f"{base}+epo", epo)],
    }
    if ablation not in table:
        raise ValueError(f"ablation {ablation!r} is unknown; expected one of {', '.join(table)}")
    return table[ablation]
