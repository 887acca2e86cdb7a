"""The README's commands as a new user types them: from an empty directory, without the
repository's shared data, then evaluated and resumed by run id from another directory."""

import shutil

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.cli import _parse_seeds, app

runner = CliRunner()
pytestmark = pytest.mark.slow
TINY = ["--model", "tiny"]


def _invoke(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_quick_start_from_any_directory(tmp_path, monkeypatch):
    home, first, second = tmp_path / "home", tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv("EPO_HOME", str(home))
    monkeypatch.delenv("EPO_DATA_DIR", raising=False)  # ScienceWorld needs no data files
    monkeypatch.chdir(first)

    # 1. train (2 steps, a checkpoint after each), with the default store and checkpoint root
    output = _invoke("train", "--env", "scienceworld", "--algo", "ppo+epo", *TINY, "--steps", "2", "--set", "checkpoint.every=1")
    assert f"tracking (mlflow): sqlite:///{home}/mlflow.db; checkpoints: {home}/checkpoints" in output
    assert list(first.iterdir()) == []  # nothing written where the user stands
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("epo")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert experiment.artifact_location.startswith(f"file://{home}/")
    checkpoints = home / "checkpoints" / run_id
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000001", "step_000002"]

    # 2. an ablation over two seeds, comma-separated, then a plot of the latest runs
    output = _invoke("ablate", "smoothing", *TINY, "--steps", "1", "--seeds", "0,1")
    assert "epo-base" in output and "best" in output and "Student-t" in output
    output = _invoke("plot", "entropy")
    assert "plotting the 4 arms of the latest ablation, ablate-smoothing-ppo" in output
    (png,) = (first / "outputs" / "plots").glob("entropy_*.png")
    assert png.stat().st_size > 10_000

    # 3. from another directory: evaluate by run id, and resume a run that lost its last step
    monkeypatch.chdir(second)
    output = _invoke("eval", run_id, "--split", "iid", "--episodes", "2")
    assert f"logged to MLflow run {run_id} at step 2" in output
    shutil.rmtree(checkpoints / "step_000002")  # as if killed during step 2
    client.set_terminated(run_id, "KILLED")
    output = _invoke("train", "--resume", run_id)
    assert f"resuming run {run_id} at step 1 of 2" in output
    assert client.get_run(run_id).info.status == "FINISHED"
    assert (checkpoints / "step_000002" / "trainer_state.safetensors").exists()
    output = _invoke("plot", "reward")
    assert "plotting the 4 arms of the latest ablation" in output  # a resumed run keeps its start time
    assert list(second.iterdir()) == [second / "outputs"]

    # 4. a damaged checkpoint is one line naming the file; the previous one resumes
    state = checkpoints / "step_000002" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    result = runner.invoke(app, ["train", "--resume", run_id])
    assert result.exit_code == 2
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"checkpoint file {state}: truncated or corrupt" in error
    assert error.endswith(f"the run's previous checkpoint is {checkpoints / 'step_000001'}")
    output = _invoke("train", "--resume", str(checkpoints / "step_000001"))
    assert f"resuming run {run_id} at step 1 of 2" in output


def test_seeds_are_comma_separated_or_repeated():
    assert _parse_seeds(["0,1,2"]) == [0, 1, 2]
    assert _parse_seeds(["0", "1"]) == [0, 1]
    assert _parse_seeds(["3, 4", "5"]) == [3, 4, 5]
    result = runner.invoke(app, ["ablate", "smoothing", "--seeds", "0,x"])
    assert result.exit_code == 2 and "--seeds: expected integers" in result.output and "'x'" in result.output
    result = runner.invoke(app, ["ablate", "smoothing", "--seeds", "1,1"])
    assert result.exit_code == 2 and "each seed once" in result.output


def test_plot_with_no_runs_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("EPO_HOME", str(tmp_path))
    result = runner.invoke(app, ["plot", "entropy"])
    assert result.exit_code == 2 and f"no RL runs in experiment 'epo' of sqlite:///{tmp_path}/mlflow.db" in result.output
    result = runner.invoke(app, ["plot", "ablation"])
    assert result.exit_code == 2 and "no ablation in experiment 'epo'" in result.output
