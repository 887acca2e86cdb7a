"""End-to-end CLI runs: real ScienceWorld, the tiny model, a real SQLite MLflow store."""

import importlib.util

import pytest
import yaml
from typer.testing import CliRunner

from epo_cli.cli import app

runner = CliRunner()
REQUIRED_KEYS = {
    "train/reward_mean", "train/success_rate", "train/episode_turns", "train/invalid_action_rate",
    "actor/entropy", "actor/entropy_turn_0", "epo/beta", "actor/pg_loss", "actor/clipfrac",
    "actor/approx_kl", "actor/grad_norm", "actor/lr", "perf/rollout_tokens_per_s", "perf/update_s",
    "rollout/logprob_diff",
}
SMALL = ["--model", "tiny", "--steps", "2", "--set", "env.max_turns=2", "--set", "rollout.max_response_tokens=12"]


def _run(tmp_path, *args):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = runner.invoke(app, ["train", "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt", *SMALL, *args])
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    return client, run


@pytest.mark.slow
def test_train_ppo_epo_end_to_end(tmp_path):
    # fp32 throughout (the CPU scale samples with a bf16 copy and updates under bf16 autocast
    # where the processor has bf16).
    client, run = _run(tmp_path, "--algo", "ppo+epo", "--run-name", "e2e", "--set", "rollout.dtype=float32",
                       "--set", "model.autocast=none")
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    keys = set(run.data.metrics)
    assert REQUIRED_KEYS | {"critic/value_loss", "epo/entropy_ref", "epo/smooth_penalty", "epo/out_of_corridor_frac"} <= keys
    # The sampler (left-padded, KV cache) and the trainer (right-padded, one pass) agree.
    assert run.data.metrics["rollout/logprob_diff"] < 1e-3
    history = client.get_metric_history(run.info.run_id, "epo/beta")
    assert [m.step for m in history] == [0, 1]
    assert history[0].value == pytest.approx(2.0)
    # The smoothing reference at step 1 is the entropy recorded after step 0 (Eq. 3).
    entropy0 = client.get_metric_history(run.info.run_id, "actor/entropy")[0].value
    assert client.get_metric_history(run.info.run_id, "epo/entropy_ref")[0].value == pytest.approx(entropy0)
    assert run.data.params["algo.name"] == "ppo+epo" and run.data.params["scale"] == "cpu"
    spec = yaml.safe_load(client.download_artifacts(run.info.run_id, "spec.yaml", str(tmp_path)) and (tmp_path / "spec.yaml").read_text())
    assert spec["train"]["steps"] == 2
    checkpoint = tmp_path / "ckpt" / run.info.run_id / "step_000002"
    assert (checkpoint / "policy" / "config.json").exists() and (checkpoint / "trainer_state.safetensors").exists()

    # `epo eval` by run id finds that checkpoint, plays fixed episodes, logs at its step.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    outputs = []
    for _ in range(2):
        result = runner.invoke(app, ["eval", run.info.run_id, "--split", "iid", "--episodes", "2", "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        outputs.append([line for line in result.output.splitlines() if "│" in line])
    assert any("iid" in line for line in outputs[0])
    assert any(line.startswith("eval iid 2/2") for line in result.output.splitlines())  # its plain progress line
    assert outputs[0] == outputs[1]  # same checkpoint, same episodes, same numbers
    (logged,) = client.get_metric_history(run.info.run_id, "eval/iid/success_rate")[:1]
    assert logged.step == 2


@pytest.mark.slow
def test_train_grpo_end_to_end(tmp_path):
    client, run = _run(tmp_path, "--algo", "grpo", "--set", "rollout.tasks_per_step=1",
                       "--set", "eval.every=1", "--set", "eval.episodes=2", "--set", "model.autocast=bf16")
    assert REQUIRED_KEYS <= set(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/ood/success_rate")]
    assert steps == [1, 2]
    assert "critic/value_loss" not in run.data.metrics
    assert "epo/smooth_penalty" not in run.data.metrics  # plain GRPO: no smoothing term


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    for command in ("train", "eval", "ablate", "plot", "spec", "envs"):
        assert command in result.output


def test_bad_spec_is_one_line_and_starts_nothing(tmp_path):
    result = runner.invoke(app, ["train", "--set", "epo.smoothing.kappa_l=5", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2
    assert "epo.smoothing: kappa_l (5.0) must not exceed kappa_r" in result.output
    assert not (tmp_path / "m.db").exists()


def test_spec_show_prints_a_reproducible_spec():
    result = runner.invoke(app, ["spec", "show", "--algo", "grpo+epo", "--seed", "3"])
    assert result.exit_code == 0
    data = yaml.safe_load(result.output)
    assert data["algo"]["name"] == "grpo+epo" and data["train"]["seed"] == 3 and data["scale"] in ("cpu", "paper")
    assert "  kappa_r: 2.0  # Upper corridor bound kappa_r * Hbar (Eq. 4; paper 2.0)." in result.output


def test_spec_show_takes_the_flags_of_train():
    result = runner.invoke(app, ["spec", "show", "--strategy", "fsdp2", "--rollout-backend", "vllm"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert (data["distributed"]["strategy"], data["rollout"]["backend"]) == ("fsdp2", "vllm")


def test_unknown_ablation_and_algo_are_one_line_errors():
    result = runner.invoke(app, ["ablate", "everything"])
    assert result.exit_code == 2 and "ablation 'everything' is unknown" in result.output
    result = runner.invoke(app, ["ablate", "smoothing", "--algo", "sac"])
    assert result.exit_code == 2 and "--algo: expected one of ppo, grpo, rloo, gigpo, reinforce++" in result.output


@pytest.mark.slow
def test_train_alfworld_grpo_epo_end_to_end(tmp_path):
    # The tiny model ties every ALFWorld group (no wins): with the skip off the update still
    # runs, so its importance weights under the bf16 sampler are logged.
    client, run = _run(tmp_path, "--env", "alfworld", "--algo", "grpo+epo", "--set", "rollout.tasks_per_step=1",
                       "--set", "optim.skip_signal_free=false")
    metrics = set(run.data.metrics)
    assert REQUIRED_KEYS | {"train/inadmissible_action_rate", "env/worker_restarts"} <= metrics
    assert any(key.startswith("train/success/pick_") or key.startswith("train/success/look_") for key in metrics)
    assert run.data.params["env.name"] == "alfworld" and run.data.params["env.max_turns"] == "2"
    from epo_cli.precision import native_bf16

    if native_bf16():  # the CPU scale's bf16 sampler copy, with its importance correction
        assert run.data.params["rollout.dtype"] == "bfloat16" and "actor/tis_weight" in metrics
        assert run.data.params["model.autocast"] == "bf16"
    lines = open(client.download_artifacts(run.info.run_id, "episodes/step_00001.jsonl", str(tmp_path))).read().splitlines()
    import json

    episodes = [json.loads(line) for line in lines]
    assert len(episodes) == 2 and episodes[0]["task"] == episodes[1]["task"]  # one GRPO group, one game
    assert episodes[0]["task_type"] in {"pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                                        "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"}


def test_missing_data_fails_before_a_run_exists(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = runner.invoke(app, ["train", "--tracking-uri", uri, "--set", f"env.data_dir={tmp_path}/nowhere",
                                 "--model", "tiny", "--env", "alfworld"])
    assert result.exit_code == 2 and "ALFWorld data not found" in result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert client.search_runs([client.get_experiment_by_name("epo").experiment_id]) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_one_line_and_starts_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = runner.invoke(app, ["train", "--tracking-uri", uri, "--model", "tiny", "--rollout-backend", "vllm"])
    assert result.exit_code == 2
    assert "rollout.backend=vllm needs vLLM: pip install 'epo[vllm]'" in result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert client.search_runs([client.get_experiment_by_name("epo").experiment_id]) == []


def test_unusable_tracking_store_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    result = runner.invoke(app, ["train", "--tracking-uri", uri, "--model", "tiny"])
    assert result.exit_code == 2
    assert f"MLflow store {uri} is not usable" in result.output
