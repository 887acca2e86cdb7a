"""A run killed with SIGKILL, or stopped by SIGTERM or Ctrl-C, and resumed logs the same
metrics as an uninterrupted run; Ctrl-C finishes the step first."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.cli import app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _args(tmp_path, name, *extra):
    return ["train", "--model", "tiny", "--steps", "4", "--seed", "5", "--run-name", name,
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--set", "env.max_turns=2", "--set", "rollout.max_response_tokens=8", "--set", "rollout.tasks_per_step=2",
            "--set", "checkpoint.every=1", "--set", "checkpoint.keep=10", "--set", f"checkpoint.dir={tmp_path}/{name}", *extra]


def _metrics_by_step(client, run_id):
    """{key: {step: last value}} without timings, which differ between any two runs."""
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        if key.startswith("perf/"):
            continue
        out[key] = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    return out


def _run_id(client, name):
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id], f"attributes.run_name = '{name}'")
    return run.info.run_id


LORA = ("--set", "model.lora.rank=4", "--set", "optim.lr=1e-3")


@pytest.mark.parametrize("stop,extra", [(signal.SIGKILL, ()), (signal.SIGTERM, ()), (signal.SIGINT, ()), (signal.SIGKILL, LORA)],
                         ids=["SIGKILL", "SIGTERM", "SIGINT", "SIGKILL-lora"])
def test_a_killed_or_preempted_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path, stop, extra):
    runner = CliRunner()
    result = runner.invoke(app, _args(tmp_path, "whole", *extra))
    assert result.exit_code == 0, result.output

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "epo_cli", *_args(tmp_path, "killed", *extra)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not list((tmp_path / "killed").glob("*/step_000002")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(stop)
    sent = time.time()
    output, _ = process.communicate(timeout=600)
    (root,) = (tmp_path / "killed").iterdir()
    assert not (root / "step_000004").exists()
    if stop == signal.SIGINT:  # Ctrl-C: the step in progress (the third) is finished and checkpointed
        assert process.returncode == 2 and "continue: epo train --resume" in output, output
        assert (root / "step_000003").exists()
    if stop == signal.SIGTERM:  # a scheduler's preemption: out within seconds, the run marked, the way back printed
        assert time.time() - sent < 60 and process.returncode == 2, output
        assert "stopped by SIGTERM during step" in output and "continue: epo train --resume" in output, output
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        assert client.get_run(_run_id(client, "killed")).info.status == "KILLED"

    result = runner.invoke(app, ["train", "--resume", str(root), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert result.exit_code == 0, result.output
    assert "resuming run" in result.output

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    whole, killed = _run_id(client, "whole"), _run_id(client, "killed")
    assert client.get_run(killed).info.status == "FINISHED"
    expected, got = _metrics_by_step(client, whole), _metrics_by_step(client, killed)
    assert set(expected) == set(got)
    for key, by_step in expected.items():
        assert by_step == got[key], key  # exact, steps 0-3, before and after the kill

    again = runner.invoke(app, ["train", "--resume", killed, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert again.exit_code == 0 and "already finished all 4 steps" in again.output


def test_resume_refuses_other_flags(tmp_path):
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--steps", "3"])
    assert result.exit_code == 2 and "--resume continues a run with its saved spec" in result.output


def test_ctrl_c_finishes_the_step_checkpoints_and_marks_the_run_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = _args(tmp_path, "interrupted")
    args[args.index("--steps") + 1] = "50"
    args[args.index("checkpoint.every=1")] = "checkpoint.every=0"
    process = subprocess.Popen([sys.executable, "-m", "epo_cli", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 600
    while True:  # wait until the first step is logged, i.e. training is under way
        assert process.poll() is None and time.time() < deadline
        experiment = client.get_experiment_by_name("epo") if (tmp_path / "mlflow.db").exists() else None
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and client.get_metric_history(runs[0].info.run_id, "actor/entropy"):
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 2, output
    assert "continue: epo train --resume" in output
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED"
    (root,) = (tmp_path / "interrupted").iterdir()
    (saved,) = root.iterdir()  # one checkpoint, at the step where it stopped
    steps_logged = max(m.step for m in client.get_metric_history(run.info.run_id, "actor/entropy"))
    assert saved.name == f"step_{steps_logged + 1:06d}"
