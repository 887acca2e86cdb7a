"""`epo sft`: a warm start by supervised fine-tuning on expert trajectories.

Every expert step is rendered exactly as RL renders a turn, in the spec's
``rollout.prompt_format``: ``windowed`` (``build_prompt`` then ``encode_prompt``: task,
step count, actions so far, the history window, the listed actions, the prompt budget) or
``conversation`` (a :class:`~epo_cli.prompts.Conversation` per expert game, whose
segments are scored as packed sequences, one forward per segment). The target is an answer in RL's
format, ``<think>...</think><action>A</action>``; generation stops at ``</action>``, so no
end-of-turn token is trained. The loss is the token-mean negative log-likelihood of the
target tokens, from the LM head at response positions only (``forward_turns``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from epo_cli.batch import TurnBatch, minibatch_count, pack, unit_chunks, unit_minibatches
from epo_cli.checkpoint import atomic_folder
from epo_cli.envs.base import PromptState, build_prompt, parse_action
from epo_cli.envs.registry import title_of
from epo_cli.expert import ExpertTrajectory, expert_trajectories
from epo_cli.forward import forward_turns
from epo_cli.models import cosine_schedule, trainable_parameters
from epo_cli.precision import autocast_context
from epo_cli.prompts import Conversation, encode_prompt
from epo_cli.rollout import RolloutSettings
from epo_cli.sampling.transformers import TransformersSampler
from epo_cli.spec import ExperimentSpec

THINK_TEMPLATE = "The next step is to {action}."
CONFIDENT_LOGP = math.log(0.5)  # a token given p > 0.5 is certainly the model's argmax
INFO_FILE = "sft.json"


class SFTError(ValueError):
    """The SFT data or budget does not fit; the message names the field to change."""


def expert_response(action: str, think: str) -> str:
    """The answer RL expects, with an empty or a one-sentence templated ``<think>``."""
    thought = THINK_TEMPLATE.format(action=action) if think == "template" else ""
    return f"<think>{thought}</think><action>{action}</action>"


def prompt_states(trajectory: ExpertTrajectory) -> list[PromptState]:
    """The prompt state of each expert step, as ``play_episodes`` builds it."""
    states, past_actions, past_observations = [], [], []
    for step in trajectory.steps:
        states.append(PromptState(trajectory.task_description, step.observation, step.actions, list(past_actions), list(past_observations)))
        past_actions.append(step.action)
        past_observations.append(step.observation)
    return states


@dataclass
class SFTSample:
    """One expert step as tokens, with what the held-out metrics compare against."""

    prompt_ids: list[int]
    response_ids: list[int]
    action: str
    actions: list[str]  # the actions listed at that step
    segment: tuple[int, int] | None = None  # conversation format: (game, segment); None: a segment of its own


def render_samples(trajectories: list[ExpertTrajectory], tokenizer, title: str, settings: RolloutSettings, think: str) -> list[SFTSample]:
    """The first ``settings.max_turns`` steps of every won trajectory (RL never plays a
    later turn), in ``settings.prompt_format``; failed experts are left out."""
    samples = []
    for game, trajectory in enumerate(t for t in trajectories if t.won):
        conversation = Conversation(tokenizer, title, settings) if settings.prompt_format == "conversation" else None
        for turn, (state, step) in enumerate(zip(prompt_states(trajectory), trajectory.steps[: settings.max_turns])):
            response_ids = tokenizer(expert_response(step.action, think), add_special_tokens=False)["input_ids"]
            if conversation is None:
                messages = build_prompt(title, state, turn, settings.max_turns, settings.history_length, settings.max_listed_actions)
                prompt_ids, _ = encode_prompt(tokenizer, messages, settings.max_prompt_tokens, settings.on_overflow)
                segment = None
            else:
                prompt_ids, _ = conversation.prompt(state, turn)
                conversation.answer(response_ids)
                segment = (game, conversation.segment)
            samples.append(SFTSample(prompt_ids, response_ids, step.action, step.actions, segment))
    return samples


def check_response_budget(samples: list[SFTSample], max_response_tokens: int) -> None:
    """Every target must fit the tokens RL lets the policy write."""
    lengths = [len(s.response_ids) for s in samples]
    over = sum(n > max_response_tokens for n in lengths)
    if over:
        raise SFTError(
            f"rollout.max_response_tokens={max_response_tokens}: {over} of {len(lengths)} expert targets are longer "
            f"(longest {max(lengths)} tokens); raise it or use sft.think=empty"
        )


def as_turn_batch(samples: list[SFTSample]) -> TurnBatch:
    """Samples in the container ``pack`` scores (episode fields unused), with their segments."""
    zeros = torch.zeros(len(samples), dtype=torch.long)
    keys = [s.segment if s.segment is not None else ("step", i) for i, s in enumerate(samples)]
    segment_of = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return TurnBatch([s.prompt_ids for s in samples], [s.response_ids for s in samples], zeros, zeros, zeros, zeros.float(),
                     segment_ids=torch.tensor([segment_of[key] for key in keys], dtype=torch.long))


def micro_batches(batch: TurnBatch, units: list[list[int]], chosen: list[int], size: int, pad_id: int):
    """Length-sorted micro-batches of ``size`` of the ``chosen`` units (segments), packed."""
    for chunk in unit_chunks(batch, units, chosen, size):
        yield pack(batch, [units[u] for u in chunk], pad_id)


def pass_tokens(samples: list[SFTSample]) -> int:
    """Sequence tokens of one pass over ``samples``: a step's prompt + target, or in
    conversation format a segment's (the packed sequence), padding left out."""
    batch = as_turn_batch(samples)
    return sum(batch.sequence_length(rows[-1]) for rows in batch.segments())


def steps_per_epoch(samples: list[SFTSample], batch_size: int) -> int:
    """Optimizer steps per epoch: ``sft.batch_size`` expert steps each, in whole segments."""
    batch = as_turn_batch(samples)
    return minibatch_count(len(batch), batch.segments(), batch_size)


def score_targets(model, micro, spec: ExperimentSpec) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the micro-batch's target tokens, and how many of
    them the model gives p > 0.5."""
    out = forward_turns(model, micro, 1.0, spec.model.logit_chunk_tokens, compiled_head=spec.model.compile_lm_head)
    mask = micro.response_mask
    nll = -(out.logp * mask).sum()
    confident = int(((out.logp.detach() > CONFIDENT_LOGP) & mask.bool()).sum())
    return nll, confident


@torch.no_grad()
def teacher_forced_metrics(model, samples: list[SFTSample], spec: ExperimentSpec, pad_id: int, device) -> dict[str, float]:
    """Held-out loss and token accuracy (share of target tokens given p > 0.5)."""
    batch = as_turn_batch(samples)
    units = batch.segments()
    was_training = model.training
    model.eval()
    nll = confident = tokens = 0.0
    for micro in micro_batches(batch, units, list(range(len(units))), spec.sft.micro_batch_size, pad_id):
        micro = micro.to(device)
        with autocast_context(spec.model.autocast, model):
            micro_nll, micro_confident = score_targets(model, micro, spec)
        nll += float(micro_nll)
        confident += micro_confident
        tokens += int(micro.response_lengths.sum())
    model.train(was_training)
    return {"heldout/loss": nll / tokens, "heldout/token_accuracy": confident / tokens}


def greedy_metrics(model, tokenizer, samples: list[SFTSample], spec: ExperimentSpec, on_batch=None) -> dict[str, float]:
    """Greedy answers to held-out expert states: well-formed, admissible (ALFWorld, whose
    listed actions are complete commands) and equal to the expert's action.
    ``on_batch(n)`` reports each generated batch."""
    size = spec.rollout.generation_batch_size
    sampler = TransformersSampler(model, tokenizer, size, autocast=spec.model.autocast)
    actions = []
    for start in range(0, len(samples), size):
        chunk = [s.prompt_ids for s in samples[start : start + size]]
        actions.extend(parse_action(g.text) for g in sampler.generate(chunk, spec.rollout.max_response_tokens, 0.0, 1.0))
        if on_batch is not None:
            on_batch(len(chunk))
    n = max(len(samples), 1)
    metrics = {
        "heldout/valid_format_rate": sum(a is not None for a in actions) / n,
        "heldout/expert_match_rate": sum(a == s.action for a, s in zip(actions, samples)) / n,
    }
    if spec.env.name == "alfworld":
        metrics["heldout/admissible_rate"] = sum(a in s.actions for a, s in zip(actions, samples)) / n
    return metrics


def fit(model, train: list[SFTSample], spec: ExperimentSpec, pad_id: int, device, on_step) -> None:
    """AdamW on the token-mean target NLL of each batch of ``sft.batch_size`` steps
    (whole segments in conversation format; micro-batches of ``sft.micro_batch_size``
    segments accumulate), lr warmup then cosine; ``on_step(step, metrics)``."""
    sft = spec.sft
    batch = as_turn_batch(train)
    units = batch.segments()
    total_steps = sft.epochs * steps_per_epoch(train, sft.batch_size)
    params = trainable_parameters(model)  # with model.lora: the adapters
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=spec.optim.weight_decay)
    scheduler = cosine_schedule(optimizer, spec.optim, total_steps)
    generator = torch.Generator().manual_seed(spec.train.seed)
    model.train()
    step = 0
    for epoch in range(sft.epochs):
        for chosen in unit_minibatches(units, len(batch), sft.batch_size, generator):
            started = time.perf_counter()
            rows = [row for unit in chosen for row in units[unit]]
            target_tokens = sum(len(batch.response_ids[r]) for r in rows)
            loss = confident = 0.0
            for micro in micro_batches(batch, units, chosen, sft.micro_batch_size, pad_id):
                with autocast_context(spec.model.autocast, model):
                    nll, micro_confident = score_targets(model, micro.to(device), spec)
                (nll / target_tokens).backward()
                loss += float(nll.detach()) / target_tokens
                confident += micro_confident
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.optim.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise SFTError(f"non-finite gradient at SFT step {step}; lower sft.lr (now {sft.lr})")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = sum(batch.sequence_length(units[unit][-1]) for unit in chosen)
            on_step(step, {
                "sft/loss": loss,
                "sft/token_accuracy": confident / target_tokens,
                "sft/lr": lr,
                "sft/grad_norm": grad_norm,
                "sft/epoch": epoch,
                "perf/tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9),
            })
            step += 1


def save_model(model, tokenizer, target: Path, info: dict, spec_yaml: str) -> Path:
    """Write a transformers model folder (weights, tokenizer, ``sft.json``, ``spec.yaml``)
    atomically: it appears complete or not at all."""
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        (staging / "spec.yaml").write_text(spec_yaml)
    return target


def load_expert_data(spec: ExperimentSpec, progress=None) -> tuple[list[ExpertTrajectory], list[ExpertTrajectory]]:
    """(train, held-out) expert trajectories, played where the cache lacks them."""
    env, sft = spec.env, spec.sft
    return tuple(
        expert_trajectories(env.name, env.data_dir, split, env.task_types, games, sft.expert_dir, env.jvm_heap, progress)
        for split, games in ((sft.train_split, sft.train_games), (sft.heldout_split, sft.heldout_games))
    )


@dataclass
class SFTResult:
    run_id: str
    output_dir: Path
    metrics: dict[str, float]


def run_sft(spec: ExperimentSpec, console: Console) -> SFTResult:
    """Expert data -> rendered steps -> fine-tuning -> held-out metrics -> model folder,
    logged as one MLflow run."""
    from epo_cli.models import load_tokenizer, trainable_model
    from epo_cli.progress import progress_bar
    from epo_cli.spec import flatten, spec_to_yaml
    from epo_cli.tracking import check_store, open_tracker

    check_store(spec.tracking)  # an unusable store fails before any work
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = load_tokenizer(spec.model.name)
    settings = RolloutSettings.from_spec(spec)
    with progress_bar(console, spec.tracking.progress) as progress:
        train_trajectories, heldout_trajectories = load_expert_data(spec, progress)
    title = title_of(spec.env.name)
    train = render_samples(train_trajectories, tokenizer, title, settings, spec.sft.think)
    heldout = render_samples(heldout_trajectories, tokenizer, title, settings, spec.sft.think)
    if not train or not heldout:
        raise SFTError(f"no won expert game among sft.{'train' if not train else 'heldout'}_games; see the failures in the expert cache")
    check_response_budget(train + heldout, spec.rollout.max_response_tokens)
    target_lengths = [len(s.response_ids) for s in train + heldout]
    data = {
        "data/train_games_won": sum(t.won for t in train_trajectories),
        "data/expert_failures": sum(not t.won for t in train_trajectories + heldout_trajectories),
        "data/train_steps": len(train),
        "data/heldout_steps": len(heldout),
        "data/target_tokens_mean": sum(target_lengths) / len(target_lengths),
        "data/target_tokens_max": max(target_lengths),
        "data/prompt_tokens_mean": sum(len(s.prompt_ids) for s in train) / len(train),
        "data/epoch_tokens": pass_tokens(train),
    }
    console.print(
        f"[bold]epo sft[/] {spec.env.name}, model {spec.model.name}: {len(train)} expert steps of "
        f"{data['data/train_games_won']} games, {len(heldout)} held-out steps, targets {data['data/target_tokens_mean']:.1f} "
        f"tokens on average (max {data['data/target_tokens_max']}, budget {spec.rollout.max_response_tokens})"
    )
    model, peft_model = trainable_model(spec.model, spec.train.seed, device)
    tags = {"epo.kind": "sft", "epo.env": spec.env.name, "epo.scale": spec.scale}
    tracker = open_tracker(spec.tracking, spec.tracking.run_name, tags=tags)
    status = "FAILED"
    try:
        tracker.log_params(flatten(spec.model_dump(mode="json")))
        tracker.log_text(spec_to_yaml(spec), "spec.yaml")
        tracker.log_metrics(data, step=0)
        epoch_steps = steps_per_epoch(train, spec.sft.batch_size)
        total_steps = spec.sft.epochs * epoch_steps
        final: dict[str, float] = {}
        with progress_bar(console, spec.tracking.progress) as progress:
            bar = progress.add_task("SFT steps", total=total_steps, info="")

            def on_step(step: int, metrics: dict[str, float]) -> None:
                """Log the step; at an epoch's end, the held-out metrics of the model after ``step + 1`` updates."""
                tracker.log_metrics(metrics, step=step)
                if (step + 1) % epoch_steps == 0:
                    final.update(teacher_forced_metrics(model, heldout, spec, tokenizer.pad_token_id, device))
                    tracker.log_metrics(final, step=step + 1)
                progress.update(bar, advance=1, info=f"loss {metrics['sft/loss']:.3f}, {metrics['perf/tokens_per_s']:.0f} tok/s")

            fit(model, train, spec, tokenizer.pad_token_id, device, on_step)
            bar = progress.add_task("held-out answers", total=len(heldout), info="greedy")
            answers = greedy_metrics(model, tokenizer, heldout, spec, lambda n: progress.update(bar, advance=n))
        tracker.log_metrics(answers, step=total_steps)
        final.update(answers)
        output_dir = Path(spec.sft.output_dir or Path(spec.checkpoint.dir) / "sft" / tracker.run_id)
        info = {"mlflow_run_id": tracker.run_id, "env": spec.env.name, "task_types": spec.env.task_types,
                "base_model": spec.model.name, "think": spec.sft.think, "steps": total_steps, **data, **final}
        if peft_model is not None:  # the RL start (and its KL reference) is the SFT policy: adapters merged in
            model = peft_model.merge_and_unload()
        save_model(model, tokenizer, output_dir, info, spec_to_yaml(spec))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    return SFTResult(tracker.run_id, output_dir, {**data, **final})
