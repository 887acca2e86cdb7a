"""The RL step in the order it happens: rollout -> score -> advantages -> update ->
entropy history -> log -> checkpoint. Under ``torchrun`` each rank plays
its slice of the step's task groups; rank 0 alone writes MLflow and checkpoints."""

from __future__ import annotations

import dataclasses
import random
import signal
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from epo_cli import checkpoint as ckpt
from epo_cli.algos.advantages import groups_with_signal
from epo_cli.batch import TurnBatch
from epo_cli.distributed import DistContext, rank_slice
from epo_cli.envs.base import TaskSampler, grouped_tasks, of_task_types
from epo_cli.envs.pool import env_batch_for
from epo_cli.envs.registry import load_split
from epo_cli.evaluate import evaluate_splits, log_evaluation
from epo_cli.learner import Learner
from epo_cli.lora import read_adapter
from epo_cli.models import load_causal_lm, load_tokenizer, model_directory
from epo_cli.progress import OverallProgress, progress_bar
from epo_cli.rollout import RolloutSettings, episode_stats, play_episodes
from epo_cli.sampling.base import Sampler
from epo_cli.sampling.build import build_sampler, sampler_dtype
from epo_cli.precision import native_bf16
from epo_cli.spec import ExperimentSpec, flatten, spec_to_yaml
from epo_cli.tracking import RunTracker, check_store, open_tracker
from epo_cli.transcripts import episodes_jsonl, train_file


MAX_CONSECUTIVE_SKIPS = 3
CANNOT_ACT_RATE = 0.9  # invalid-action rate at step 0 that earns the warm-start hint
RANK_SEED_STRIDE = 1_000_003  # rank r samples tokens from seed + r * stride


class TrainingStopped(RuntimeError):
    """Training stopped early: Ctrl-C or diverging gradients (after writing a checkpoint),
    SIGTERM or a disk too full to checkpoint (``checkpoint``: the last one written,
    ``<checkpoint.dir>/<run id>/step_N``, or None when none was)."""

    def __init__(self, message: str, checkpoint: Path | None, run_id: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.run_id = run_id or checkpoint.parent.name


class TrainingDiverged(TrainingStopped):
    """Training stopped because the gradients kept being non-finite."""


class TrainingPreempted(TrainingStopped):
    """SIGTERM (a scheduler's preemption): the step in progress was abandoned within seconds."""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler wherever the step is (not an Exception: no engine or
    pool handler may take it for a worker failure)."""


class Trainer:
    """Owns the learner, the engines and the task stream of one training run (one rank)."""

    def __init__(self, spec: ExperimentSpec, console: Console | None = None, dist: DistContext | None = None):
        self.spec = spec
        self.dist = dist or DistContext()
        self.console = console or Console()
        self.step = 0
        self.stop_requested = False
        self.my_groups = rank_slice(spec.rollout.tasks_per_step, self.dist)  # fails early on a bad split
        random.seed(spec.train.seed)
        torch.manual_seed(spec.train.seed)
        self.sample_generator = torch.Generator().manual_seed(self._rank_seed())

        # Every rank draws the same global task stream and plays its own groups of it.
        split = load_split(spec.env.name, spec.env.data_dir, spec.env.train_split)
        self.train_tasks = of_task_types(split, spec.env.task_types, spec.env.train_split)
        self.task_sampler = TaskSampler(self.train_tasks, spec.train.seed)

        self.tokenizer = load_tokenizer(spec.model.name)
        self.learner = Learner(spec, self.tokenizer.pad_token_id, self.dist)
        self.scratch = tempfile.TemporaryDirectory(prefix="epo-sampler-")
        self.sampler, self.sampler_has_own_weights = self._build_sampler()
        self._sync_sampler()
        self.episodes_per_rank = len(self.my_groups) * spec.rollout.group_size
        self.envs = env_batch_for(spec, self.episodes_per_rank)  # last: worker processes to close

    def _build_sampler(self) -> tuple[Sampler, bool]:
        """The rollout sampler, and whether it holds its own copy of the weights (vLLM, a
        copy in ``rollout.dtype``, or a full copy beside an FSDP2-sharded policy) that must
        follow every update."""
        spec = self.spec
        if spec.rollout.backend == "vllm":
            model_dir = model_directory(spec.model.name, self.tokenizer, Path(self.scratch.name), spec.model.dtype)
            return build_sampler(spec, None, self.tokenizer, self.sample_generator, model_dir), True
        if sampler_dtype(spec) == "bfloat16" and spec.model.dtype != "bfloat16" and not native_bf16():
            self.console.print("[yellow]rollout.dtype bfloat16: this machine has no native bf16 (AVX512-BF16, AMX or "
                               "a bf16 GPU), so torch emulates it, slower than float32[/]")
        if self.learner.sharded or sampler_dtype(spec) != spec.model.dtype:
            copy = load_causal_lm(spec.model.name, sampler_dtype(spec), spec.train.seed).to(self.dist.device).requires_grad_(False)
            return build_sampler(spec, copy, self.tokenizer, self.sample_generator), True
        return build_sampler(spec, self.learner.policy, self.tokenizer, self.sample_generator), False

    def _sync_sampler(self) -> None:
        if self.sampler_has_own_weights:
            self.sampler.update_weights(self.learner.policy_weights())

    def _rank_seed(self) -> int:
        return self.spec.train.seed + RANK_SEED_STRIDE * self.dist.rank

    # ----------------------------------------------------------------- the run
    def fit(
        self, tracker: RunTracker | None, checkpoint_root: Path, run_id: str, overall: OverallProgress | None = None
    ) -> dict[str, float]:
        """Train for the remaining steps, logging each to ``tracker`` (rank 0; None on the
        others); checkpoint every ``checkpoint.every`` steps, at the end, and when stopped
        early. ``overall``: a bar above this run's that counts the steps of all runs of an
        ablation or sweep."""
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        previous_term = signal.signal(signal.SIGTERM, _terminate)
        try:
            with progress_bar(self.console, self.spec.tracking.progress) as progress:
                overall_task = None
                if overall is not None:
                    overall_task = progress.add_task(overall.description, total=overall.total_steps,
                                                     completed=overall.steps_before + self.step, info="", each=True)
                last = self._loop(progress, tracker, checkpoint_root, run_id, overall_task)
        except _Terminated:
            raise TrainingPreempted(
                f"stopped by SIGTERM during step {self.step + 1}, which was abandoned", ckpt.latest_checkpoint(checkpoint_root),
                run_id,
            ) from None
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            signal.signal(signal.SIGTERM, previous_term)
        return last

    def _request_stop(self, signum, frame) -> None:
        """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop now."""
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.console.print("[yellow]stopping after this step (Ctrl-C again to abort at once)[/]")

    def _loop(
        self, progress: Progress, tracker: RunTracker | None, checkpoint_root: Path, run_id: str, overall_task=None
    ) -> dict[str, float]:
        spec = self.spec
        last: dict[str, float] = {}
        steps_task = progress.add_task("RL steps", total=spec.train.steps, completed=self.step, info="", each=True)
        turns_task = progress.add_task("rollout", total=spec.env.max_turns, info="", visible=False)
        while self.step < spec.train.steps:
            last, episodes = self.train_step(progress, turns_task)
            if self.step == 0 and last["train/invalid_action_rate"] >= CANNOT_ACT_RATE:
                self.console.print(cannot_act_hint(last["train/invalid_action_rate"]))
            if tracker is not None:
                written = time.perf_counter()
                tracker.log_text(episodes_jsonl(episodes, spec.tracking.transcripts), train_file(self.step))
                last["perf/transcript_s"] = time.perf_counter() - written
                tracker.log_metrics(last, step=self.step)
            self.step += 1
            info = (
                f"succ {last['train/success_rate']:.2f}, "
                f"reward {last['train/reward_mean']:.3f}, "
                f"H {last.get('actor/entropy', float('nan')):.3f}, "
                f"step KL {last.get('actor/step_kl', float('nan')):.2g}, "
                f"{last['perf/step_s']:.0f} s/step"
            )
            progress.update(steps_task, advance=1, info=info)
            if overall_task is not None:
                progress.update(overall_task, advance=1)
            if spec.eval.every and (self.step % spec.eval.every == 0 or self.step == spec.train.steps):
                results = evaluate_splits(self.sampler, self.tokenizer, self.envs, spec, ("iid", "ood"), progress, self.dist)
                if tracker is not None:
                    log_evaluation(tracker, results, self.step, spec.tracking.transcripts)
            # Any rank's Ctrl-C stops all ranks after the same step.
            stop_requested = bool(self.dist.all_reduce_sum(torch.tensor([float(self.stop_requested)])) > 0)
            diverged = self.learner.optimizer_step.consecutive_skips >= MAX_CONSECUTIVE_SKIPS
            periodic = spec.checkpoint.every and self.step % spec.checkpoint.every == 0
            if stop_requested or diverged or periodic or self.step == spec.train.steps:
                try:
                    path = self.save(checkpoint_root, run_id)
                except ckpt.CheckpointSpaceError as err:  # stop where a resume can start: the last checkpoint
                    raise TrainingStopped(f"{err}; stopped after step {self.step}", ckpt.latest_checkpoint(checkpoint_root),
                                          run_id) from None
            if stop_requested:
                raise TrainingStopped(f"stopped after step {self.step}", path)
            if diverged:
                raise TrainingDiverged(
                    f"{self.learner.optimizer_step.consecutive_skips} optimizer steps in a row had a non-finite gradient; "
                    f"stopped after step {self.step}", path
                )
        return last

    def train_step(self, progress: Progress | None = None, turns_task=None) -> tuple[dict[str, float], list]:
        """One RL step; returns its metrics and the episodes of all ranks."""
        on_cuda = self.dist.device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.dist.device)
        started = time.perf_counter()
        episodes, kept, restarts, rounds = self._rollout(progress, turns_task, started)
        rollout_s = time.perf_counter() - started
        update_started = time.perf_counter()
        batch, update_metrics = self._update(episodes, kept, rounds)
        update_s = time.perf_counter() - update_started
        for row, turn in enumerate(turn for episode in kept for turn in episode.turns):  # the batch's row order
            turn.entropy = self.learner.turn_entropies.get(row)
        metrics = step_metrics(self.spec, episodes, update_metrics, restarts, rollout_s)
        metrics.update({
            "perf/update_s": update_s,
            "perf/update_tokens_per_s": (self.learner.pass_tokens(batch) if batch is not None else 0) / max(update_s, 1e-9),
            "perf/step_s": time.perf_counter() - started,
        })
        if on_cuda:
            metrics["perf/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return metrics, episodes

    def _rollout(self, progress: Progress | None, turns_task, started: float) -> tuple[list, list, int, int]:
        """The step's rounds of episodes: one, or with ``algo.filter_groups`` up to
        ``algo.filter_max_rounds`` until the step holds its groups with a signal. Returns
        every episode played, the kept ones (at most a step's worth), the worker restarts
        and the rounds played."""
        spec = self.spec
        generated = {"tokens": 0}

        def on_turn(new_tokens: int, active: int) -> None:
            generated["tokens"] += new_tokens
            if progress is not None:
                rate = generated["tokens"] / max(time.perf_counter() - started, 1e-9)
                progress.update(turns_task, advance=1, info=f"{active} running, {rate:.1f} tok/s")

        episodes, kept, restarts, rounds = [], [], 0, 0
        max_rounds = spec.algo.filter_max_rounds if spec.algo.filter_groups else 1
        while rounds < max_rounds and len(kept) < spec.episodes_per_step:
            if progress is not None:
                progress.reset(turns_task, total=spec.env.max_turns, visible=True,
                               description=f"rollout step {self.step + 1}" + (f" round {rounds + 1}" if rounds else ""), info="")
            played, round_restarts = self._play_round(rounds, on_turn)
            episodes += played
            restarts = round_restarts  # the pools' running count
            kept += self._groups_kept(played)
            rounds += 1
        if progress is not None:
            progress.update(turns_task, visible=False)
        return episodes, kept[: spec.episodes_per_step], restarts, rounds

    def _update(self, episodes: list, kept: list, rounds: int) -> tuple[TurnBatch | None, dict[str, float]]:
        """The learner's update on the kept episodes, numbered in order (GRPO groups stay
        whole), and the sampler's weights after it; returns the batch and the update's metrics."""
        spec = self.spec
        batch = None
        if kept:
            batch = TurnBatch.from_episodes([dataclasses.replace(e, episode_id=i) for i, e in enumerate(kept)])
            owner = batch.episode_ids * self.dist.world_size // len(kept)
            update_metrics = self.learner.learn(batch, owner, self.step)
            self._sync_sampler()
        else:  # every group tied: nothing to update on, but the step (and its lr schedule) passes
            self.learner.step_schedules()
            self.learner.entropy_record.turn_entropies = {}
            update_metrics = {"actor/optimizer_steps": 0}
        if spec.algo.filter_groups:
            update_metrics["rollout/groups_kept"] = len(kept) // spec.rollout.group_size
            update_metrics["rollout/groups_played"] = len(episodes) // spec.rollout.group_size
            update_metrics["rollout/rounds"] = rounds
            # What the filter saved: the sequence tokens one update pass would have had to
            # score for the dropped episodes (at perf/update_tokens_per_s).
            kept_ids = {id(e) for e in kept}
            dropped = [e for e in episodes if id(e) not in kept_ids]
            update_metrics["perf/dropped_update_tokens"] = self.learner.pass_tokens(TurnBatch.from_episodes(dropped)) if dropped else 0
        return batch, update_metrics

    def _play_round(self, round_index: int, on_turn) -> tuple[list, int]:
        """``rollout.tasks_per_step`` groups of fresh tasks, each rank playing its own; returns
        the episodes of all ranks (ids and group ids unique within the step) and the worker
        pools' running count of worker restarts. Later rounds (``algo.filter_max_rounds``) number on after the earlier ones."""
        spec = self.spec
        tasks, group_ids = grouped_tasks(self.task_sampler, spec.rollout.tasks_per_step, spec.rollout.group_size)
        first = self.my_groups.start * spec.rollout.group_size
        mine = slice(first, first + self.episodes_per_rank)
        offset = round_index * spec.episodes_per_step
        local = play_episodes(self.sampler, self.tokenizer, self.envs, tasks[mine], group_ids[mine], RolloutSettings.from_spec(spec), on_turn)
        for episode in local:
            episode.episode_id += offset + first  # global episode ids, in the one-process order
            episode.group_id += round_index * spec.rollout.tasks_per_step
        gathered = self.dist.all_gather_objects((local, self.envs.restarts))
        return [episode for part, _ in gathered for episode in part], sum(restarts for _, restarts in gathered)

    def _groups_kept(self, episodes: list) -> list:
        """The episodes the update uses: all of them, or with ``algo.filter_groups`` those
        of groups whose returns differ (:func:`groups_with_signal`)."""
        if not self.spec.algo.filter_groups:
            return episodes
        returns = torch.tensor([e.total_reward for e in episodes], dtype=torch.float64)
        keep = groups_with_signal(returns, torch.tensor([e.group_id for e in episodes]))
        return [episode for episode, kept in zip(episodes, keep.tolist()) if kept]

    # ------------------------------------------------------------- persistence
    def save(self, root: Path, run_id: str) -> Path:
        """A consolidated checkpoint written by rank 0 (every rank takes part in gathering
        the sharded states); loadable with any number of processes."""
        learner_state = self.learner.state_dict()
        lora = self.spec.model.lora
        merged = dict(self.learner.policy_weights()) if lora.enabled and lora.save_merged else None  # gathered on every rank
        rng_states = self.dist.all_gather_objects(ckpt.rng_state(self.sample_generator))
        path = root / f"step_{self.step:06d}"
        if self.dist.is_main:
            policy_state = learner_state.pop("policy")
            state = {
                "step": self.step,
                "learner": learner_state,
                "sampler_position": self.task_sampler.position,
                "rng": rng_states,  # one per rank
            }
            meta = {"mlflow_run_id": run_id, "entropy_history": self.learner.history.step_means, "world_size": self.dist.world_size}
            path = ckpt.save_checkpoint(
                root, self.step, self._model_folders(policy_state, merged), self.tokenizer, state, meta,
                spec_to_yaml(self.spec), self.spec.checkpoint.keep,
            )
        self.dist.barrier()
        return path

    def _model_folders(self, policy_state: dict, merged: dict | None) -> list[ckpt.ModelFolder]:
        """The policy's folders: its full weights, or a LoRA run's adapters (and, under
        ``model.lora.save_merged``, the ``merged`` weights beside them)."""
        learner = self.learner
        if learner.peft is None:
            return [ckpt.ModelFolder(ckpt.POLICY_DIR, learner.policy, policy_state)]
        # Embeddings are never adapted here; "auto" would ask the model hub whether they were.
        adapters = ckpt.ModelFolder(ckpt.ADAPTER_DIR, learner.peft, {f"base_model.model.{k}": v for k, v in policy_state.items()},
                                    {"save_embedding_layers": False})
        return [adapters] + ([ckpt.ModelFolder(ckpt.POLICY_DIR, learner.policy, merged)] if merged is not None else [])

    def load(self, checkpoint_dir: Path) -> str:
        """Restore everything a checkpoint holds; return its MLflow run id. With another
        number of processes than the one that wrote it, each rank's sampling stream is
        reseeded (the models, optimizers and EPO state are restored exactly)."""
        meta = ckpt.read_meta(checkpoint_dir)
        state = ckpt.read_state(checkpoint_dir)
        if self.learner.peft is not None:
            policy_state = read_adapter(checkpoint_dir / ckpt.ADAPTER_DIR)
        else:
            policy_state = ckpt.load_policy(checkpoint_dir, self.spec.model.dtype).state_dict()
        self.learner.load_state_dict(state["learner"], policy_state)
        self._sync_sampler()
        self.step = state["step"]
        self.task_sampler.position = state["sampler_position"]
        if len(state["rng"]) == self.dist.world_size:
            ckpt.restore_rng_state(state["rng"][self.dist.rank], self.sample_generator)
        else:
            self.sample_generator.manual_seed(self._rank_seed() + self.step)
        return meta["mlflow_run_id"]

    def close(self) -> None:
        self.sampler.close()
        self.envs.close()
        self.scratch.cleanup()


def _terminate(signum, frame) -> None:
    """SIGTERM: stop now. Schedulers give a short grace period and a step can take minutes,
    so the step in progress is abandoned and the last checkpoint is what resumes."""
    raise _Terminated()


def cannot_act_hint(invalid_rate: float) -> str:
    """One line for a policy that almost never writes a valid ``<think>/<action>`` answer."""
    return (
        f"[yellow]hint:[/] {invalid_rate:.0%} of the first step's turns had no valid <think>/<action> answer, so "
        "RL has almost nothing to learn from: warm-start the model with `epo sft` (then `epo train --init-from DIR`) "
        "or restrict it to admissible actions with rollout.constrain=admissible"
    )


def run_training(
    spec: ExperimentSpec,
    console: Console,
    tags: dict[str, str] | None = None,
    resume_from: Path | None = None,
    dist: DistContext | None = None,
    overall: OverallProgress | None = None,
) -> tuple[str, dict[str, float], Path]:
    """Validate the store, build the trainer, train, and return (run id, last metrics,
    checkpoint root). ``tags`` go on a new run (``mlflow.parentRunId`` makes it a child);
    ``resume_from`` continues a checkpoint's own run from its step. Only rank 0 talks to
    MLflow; the others learn the run id from it."""
    dist = dist or DistContext()
    if dist.is_main:
        check_store(spec.tracking)  # an unusable store fails here, before any work
    trainer = Trainer(spec, console, dist)  # data, model and engines: failures here leave no run behind
    tracker = None
    status = "FAILED"
    try:
        if resume_from is not None:
            run_id = trainer.load(resume_from)
            if trainer.step >= spec.train.steps:
                raise TrainingFinished(f"run {run_id} already finished all {spec.train.steps} steps; nothing to train")
            if dist.is_main:
                tracker = open_tracker(spec.tracking, run_id=run_id, resume=True)
            console.print(f"resuming run {run_id} at step {trainer.step} of {spec.train.steps}")
        elif dist.is_main:
            run_tags = {"epo.env": spec.env.name, "epo.algo": spec.algo.name, "epo.variant": spec.algo.variant,
                        "epo.scale": spec.scale, "epo.world_size": str(dist.world_size), **(tags or {})}
            tracker = open_tracker(spec.tracking, spec.tracking.run_name, tags=run_tags)
            tracker.log_params(flatten(spec.model_dump(mode="json")))
            tracker.log_text(spec_to_yaml(spec), "spec.yaml")
        if resume_from is None:
            run_id = dist.all_gather_objects(tracker.run_id if tracker is not None else None)[0]
        checkpoint_root = Path(spec.checkpoint.dir) / run_id
        try:
            last = trainer.fit(tracker, checkpoint_root, run_id, overall)
            status = "FINISHED"
        except (KeyboardInterrupt, TrainingStopped):
            status = "KILLED"
            raise
        finally:
            if tracker is not None:
                tracker.finish(status)
    finally:
        trainer.close()
    return run_id, last, checkpoint_root


class TrainingFinished(RuntimeError):
    """A resumed run had no steps left."""


def step_metrics(spec: ExperimentSpec, episodes: list, update_metrics: dict[str, float], restarts: int,
                 rollout_s: float) -> dict[str, float]:
    """The step's metrics of what was played (every episode, kept or dropped, in
    ``rollout_s`` seconds) beside the update's."""
    turns = [turn for episode in episodes for turn in episode.turns]
    response_tokens = sum(len(t.response_ids) for t in turns)
    stats = episode_stats(episodes)
    metrics = {
        "train/reward_mean": sum(e.total_reward for e in episodes) / len(episodes),
        "train/success_rate": stats.success_rate,
        "train/episode_turns": stats.mean_turns,
        "train/invalid_action_rate": stats.invalid_action_rate,
        "train/inadmissible_action_rate": sum(t.valid and not t.accepted for t in turns) / len(turns),
        "rollout/response_tokens_mean": response_tokens / len(turns),
        "rollout/prompt_tokens_mean": sum(len(t.prompt_ids) for t in turns) / len(turns),
        "rollout/truncated_prompts": sum(t.prompt_tokens_cut > 0 for t in turns),
        "rollout/truncated_responses": sum(len(t.response_ids) >= spec.rollout.max_response_tokens for t in turns),
        "perf/rollout_tokens_per_s": response_tokens / max(rollout_s, 1e-9),
        "perf/rollout_s": rollout_s,
        "env/worker_restarts": restarts,
        **update_metrics,
    }
    if stats.decoy_rate is not None:
        metrics["train/decoy_rate"] = stats.decoy_rate
    for task_type, (wins, n) in stats.per_type.items():
        metrics[f"train/success/{task_type}"] = wins / n
    return metrics
