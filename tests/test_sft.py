"""Expert trajectories on the real engines, SFT rendering and training, and `epo sft`."""

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from epo_cli import expert
from epo_cli.cli import app
from epo_cli.envs.base import parse_action
from epo_cli.envs.pool import LocalEnvBatch
from epo_cli.envs.registry import load_split, title_of
from epo_cli.expert import ExpertCache, cache_file, expert_trajectories
from epo_cli.rollout import RolloutSettings, play_episodes
from epo_cli.sampling.base import Generation
from epo_cli.sft import (
    SFTError,
    as_turn_batch,
    check_response_budget,
    expert_response,
    fit,
    micro_batches,
    pass_tokens,
    render_samples,
    score_targets,
    steps_per_epoch,
    teacher_forced_metrics,
)
from epo_cli.spec import resolve_spec

pytestmark = pytest.mark.slow
runner = CliRunner()
GAMES = {"alfworld": ("pick_and_place_simple", 3), "scienceworld": ("find-non-living-thing", 2)}
SETTINGS = RolloutSettings(max_turns=12, max_prompt_tokens=640, max_response_tokens=40, temperature=1.0, max_listed_actions=20)


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("expert")


@pytest.fixture(scope="module")
def trajectories(expert_dir):
    return {env: expert_trajectories(env, None, "train", [task_type], games, expert_dir) for env, (task_type, games) in GAMES.items()}


def test_alfworld_planner_wins_and_the_cache_is_reused(trajectories, expert_dir, monkeypatch):
    played = trajectories["alfworld"]
    assert len(played) == 3 and all(t.won and t.failure is None for t in played)
    assert {t.task_type for t in played} == {"pick_and_place_simple"}
    for trajectory in played:
        assert 4 <= len(trajectory.steps) <= 6 and trajectory.task_description
        assert all(step.action in step.actions for step in trajectory.steps)  # planner commands are admissible
    lines = cache_file(expert_dir, "alfworld", "train").read_text().splitlines()
    assert len(lines) == 3

    calls = []
    original = expert.ExpertPlayer.play
    monkeypatch.setattr(expert.ExpertPlayer, "play", lambda self, task: calls.append(task) or original(self, task))
    again = expert_trajectories("alfworld", None, "train", ["pick_and_place_simple"], 4, expert_dir)
    assert again[:3] == played and len(calls) == 1  # only the fourth game is new
    assert len(ExpertCache(cache_file(expert_dir, "alfworld", "train")).trajectories) == 4


def test_scienceworld_gold_path_replays_to_score_100(trajectories):
    from epo_cli.envs.scienceworld import ScienceWorldEngine

    played = trajectories["scienceworld"]
    assert len(played) == 2 and len({t.key for t in played}) == 2
    engine = ScienceWorldEngine()
    try:
        for trajectory in played:
            assert trajectory.won and trajectory.score == 100
            task_type, variation = trajectory.key.split("/")
            task = next(t for t in load_split("scienceworld", None, "train") if t.task_type == task_type and str(t.variation) == variation)
            first = engine.reset(task)
            assert first.observation == trajectory.steps[0].observation
            for step in trajectory.steps:
                result = engine.step(step.action)
            assert result.won and result.score == 100
    finally:
        engine.close()


def test_data_expert_cli_reports_the_cached_games(trajectories, expert_dir):
    result = runner.invoke(app, ["data", "expert", "--env", "scienceworld", "--split", "train", "--task-types",
                                 "find-non-living-thing", "--games", "2", "--set", f"sft.expert_dir={expert_dir}"])
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if "find-non-living-thing" in line]
    assert [cell.strip() for cell in row.split("│")[1:4]] == ["find-non-living-thing", "2", "2"]
    assert "scienceworld" in result.output and "train.jsonl" in result.output


def test_a_broken_cache_line_is_named(tmp_path):
    path = tmp_path / "alfworld" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"key": "a"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl, line 1: not a trajectory"):
        ExpertCache(path)


class ScriptedSampler:
    """Answers each turn with the expert's next action, in RL's answer format."""

    def __init__(self, tokenizer, actions):
        self.tokenizer, self.actions = tokenizer, list(actions)

    def forget_prefixes(self):
        """Nothing is kept between calls."""

    def generate(self, prompts, max_new_tokens, temperature, top_p, constraints=None):
        text = expert_response(self.actions.pop(0), "empty")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [Generation(ids, [0.0] * len(ids), text)]


@pytest.mark.parametrize("prompt_format", ["windowed", "conversation"])
@pytest.mark.parametrize("env", sorted(GAMES))
def test_rendered_prompts_are_the_prompts_rl_builds(env, prompt_format, trajectories, tokenizer):
    settings = replace(SETTINGS, prompt_format=prompt_format)
    samples = render_samples(trajectories[env], tokenizer, title_of(env), settings, "empty")
    assert len(samples) == sum(min(len(t.steps), settings.max_turns) for t in trajectories[env])
    tasks = {t.name: t for t in load_split(env, None, "train")}
    envs = LocalEnvBatch(env, {}, 1)
    try:
        rl_prompts, rl_segments = [], []
        for game, trajectory in enumerate(trajectories[env]):
            sampler = ScriptedSampler(tokenizer, [step.action for step in trajectory.steps])
            (episode,) = play_episodes(sampler, tokenizer, envs, [tasks[trajectory.key]], [0], settings)
            assert episode.won
            rl_prompts.extend(turn.prompt_ids for turn in episode.turns)
            rl_segments.extend(None if turn.segment is None else (game, turn.segment) for turn in episode.turns)
    finally:
        envs.close()
    assert [s.prompt_ids for s in samples] == rl_prompts
    assert [s.segment for s in samples] == rl_segments
    if prompt_format == "windowed":
        assert any("Actions taken so far" in tokenizer.decode(s.prompt_ids) for s in samples)
    else:  # the 640-token budget splits the longer games: a new segment restarts with the task
        assert len(set(rl_segments)) > len(trajectories[env])
        assert pass_tokens(samples) < pass_tokens([replace(s, segment=None) for s in samples])


def test_packed_sft_scores_as_the_per_step_sequences_do(trajectories, tokenizer):
    """The same conversation-format steps, one packed sequence per segment or one sequence
    per step: the same held-out loss and token accuracy, and the same gradients."""
    from epo_cli.models import load_causal_lm

    spec = resolve_spec(flags={"scale": "cpu", "model": {"name": "tiny", "autocast": "none"}}, overrides=["sft.micro_batch_size=2"])
    settings = replace(SETTINGS, prompt_format="conversation")
    packed = render_samples(trajectories["alfworld"], tokenizer, "ALFWorld", settings, "empty")
    per_step = [replace(s, segment=None) for s in packed]
    assert len(as_turn_batch(packed).segments()) < len(packed)
    model = load_causal_lm("tiny", seed=0)
    metrics = [teacher_forced_metrics(model, samples, spec, tokenizer.pad_token_id, torch.device("cpu"))
               for samples in (packed, per_step)]
    assert metrics[0]["heldout/loss"] == pytest.approx(metrics[1]["heldout/loss"], rel=1e-5)
    assert metrics[0]["heldout/token_accuracy"] == metrics[1]["heldout/token_accuracy"]
    gradients = []
    for samples in (packed, per_step):
        model.zero_grad()
        batch = as_turn_batch(samples)
        for micro in micro_batches(batch, batch.segments(), list(range(len(batch.segments()))), 2, tokenizer.pad_token_id):
            score_targets(model, micro, spec)[0].backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(gradients[0].norm()) > 0
    assert float((gradients[0] - gradients[1]).norm()) <= 1e-4 * float(gradients[1].norm())


def test_targets_parse_back_and_must_fit_the_budget(trajectories, tokenizer):
    for think in ("empty", "template"):
        assert parse_action(expert_response("take pen 1 from sidetable 1", think)) == "take pen 1 from sidetable 1"
    assert expert_response("go to desk 1", "template") == "<think>The next step is to go to desk 1.</think><action>go to desk 1</action>"
    samples = render_samples(trajectories["alfworld"], tokenizer, "ALFWorld", SETTINGS, "template")
    longest = max(len(s.response_ids) for s in samples)
    check_response_budget(samples, longest)
    with pytest.raises(SFTError, match=f"rollout.max_response_tokens={longest - 1}: .* longer"):
        check_response_budget(samples, longest - 1)


def test_a_few_sft_steps_lower_the_loss(trajectories, tokenizer):
    from epo_cli.models import load_causal_lm

    spec = resolve_spec(flags={"scale": "cpu", "model": {"name": "tiny", "autocast": "none"}},
                        overrides=["sft.lr=5e-3", "sft.epochs=4", "sft.batch_size=4", "sft.micro_batch_size=2", "optim.warmup_ratio=0"])
    samples = render_samples(trajectories["alfworld"], tokenizer, "ALFWorld", SETTINGS, "empty")
    model = load_causal_lm("tiny", seed=0)
    before = teacher_forced_metrics(model, samples, spec, tokenizer.pad_token_id, torch.device("cpu"))
    losses = []
    fit(model, samples, spec, tokenizer.pad_token_id, torch.device("cpu"), lambda step, m: losses.append(m["sft/loss"]))
    after = teacher_forced_metrics(model, samples, spec, tokenizer.pad_token_id, torch.device("cpu"))
    assert len(losses) == 4 * 4 == 4 * steps_per_epoch(samples, 4)  # 4 epochs x ceil(13 steps / 4)
    assert after["heldout/loss"] < 0.8 * before["heldout/loss"]  # measured: 10.8 -> 6.2 nats per token
    assert losses[-1] < losses[0]

    conversation = render_samples(trajectories["alfworld"], tokenizer, "ALFWorld", replace(SETTINGS, prompt_format="conversation"), "empty")
    segments = len(as_turn_batch(conversation).segments())
    assert steps_per_epoch(conversation, 4) == min(4, segments)  # whole segments per optimizer step
    losses = []
    fit(model, conversation, spec, tokenizer.pad_token_id, torch.device("cpu"), lambda step, m: losses.append(m["sft/loss"]))
    assert len(losses) == 4 * min(4, segments) and all(math.isfinite(loss) for loss in losses)


def test_sft_cli_writes_a_folder_that_train_and_eval_start_from(tmp_path, expert_dir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = tmp_path / "sft-model"
    result = runner.invoke(app, [
        "sft", "--model", "tiny", "--env", "alfworld", "--task-types", "pick_and_place_simple", "--games", "3",
        "--epochs", "1", "--out", str(folder), "--tracking-uri", uri, "--set", f"sft.expert_dir={expert_dir}",
        "--set", "sft.heldout_games=1", "--set", "sft.batch_size=4", "--set", "rollout.max_response_tokens=24",
    ])
    assert result.exit_code == 0, result.output
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    # Into a pipe: plain progress lines (at most one per 30 s, and one when a task ends).
    (done,) = [line for line in result.output.splitlines() if line.startswith("SFT steps 3/3 ")]
    assert "loss " in done and " tok/s" in done and "eta 0:00:00" in done
    assert any(line.startswith("held-out answers ") for line in result.output.splitlines())
    info = json.loads((folder / "sft.json").read_text())
    assert info["task_types"] == ["pick_and_place_simple"] and info["think"] == "empty"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == info["mlflow_run_id"]
    # CPU scale: env.max_turns=4 keeps the first 4 steps of each game (one has 5): 12 steps, batches of 4.
    assert len(client.get_metric_history(run.info.run_id, "sft/loss")) == 3
    assert {"heldout/valid_format_rate", "heldout/admissible_rate", "heldout/expert_match_rate", "heldout/token_accuracy"} <= set(run.data.metrics)

    result = runner.invoke(app, [
        "train", "--init-from", str(folder), "--env", "alfworld", "--task-types", "pick_and_place_simple", "--algo", "grpo",
        "--steps", "1", "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "env.max_turns=2",
        "--set", "rollout.tasks_per_step=1", "--set", "rollout.max_response_tokens=12",
    ])
    assert result.exit_code == 0, result.output
    assert result.output.count("warm-start the model with `epo sft`") == 1  # the tiny model still cannot act
    (train_run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id], "tags.`epo.algo` = 'grpo'")
    assert train_run.data.params["model.name"] == str(folder)
    episodes = client.download_artifacts(train_run.info.run_id, "episodes/step_00000.jsonl", str(tmp_path))
    assert {json.loads(line)["task_type"] for line in open(episodes)} == {"pick_and_place_simple"}


def test_init_from_needs_a_model_folder(tmp_path):
    result = runner.invoke(app, ["train", "--init-from", str(tmp_path)])
    assert result.exit_code == 2 and "not a model folder (no config.json)" in result.output
    result = runner.invoke(app, ["train", "--init-from", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 2 and "pass --model or --init-from, not both" in result.output


def test_a_lora_sft_writes_a_plain_model_with_the_adapters_merged_in(tmp_path, expert_dir):
    import torch

    from epo_cli.models import load_causal_lm

    folder = tmp_path / "sft-lora"
    result = runner.invoke(app, [
        "sft", "--model", "tiny", "--env", "alfworld", "--task-types", "pick_and_place_simple", "--games", "3",
        "--epochs", "1", "--out", str(folder), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--set", f"sft.expert_dir={expert_dir}", "--set", "sft.heldout_games=1", "--set", "sft.batch_size=4",
        "--set", "rollout.max_response_tokens=24", "--set", "model.lora.rank=4", "--set", "sft.lr=1e-2",
    ])
    assert result.exit_code == 0, result.output
    assert (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()
    merged, start = load_causal_lm(str(folder)).state_dict(), load_causal_lm("tiny").state_dict()
    assert merged.keys() == start.keys()  # a plain model: RL's reference is this SFT policy
    changed = [name for name in start if not torch.equal(merged[name], start[name])]
    assert changed and all(name.endswith("_proj.weight") for name in changed)  # only adapted layers moved
