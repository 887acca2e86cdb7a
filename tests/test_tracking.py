"""The JSONL tracking backend: runs as plain files, and no MLflow import where it is used."""

import json

import pytest
from typer.testing import CliRunner

from epo_cli.cli import app
from epo_cli.spec import TrackingSpec
from epo_cli.tracking import JsonlTracker, TrackingError, check_store, open_tracker, read_jsonl_metrics


def test_jsonl_run_records_params_metrics_artifacts_and_status(tmp_path):
    tracking = TrackingSpec(backend="jsonl", uri=str(tmp_path / "runs"), experiment="exp")
    run = open_tracker(tracking, "first", tags={"epo.env": "toy"})
    assert isinstance(run, JsonlTracker) and run.folder == tmp_path / "runs" / "exp" / run.run_id
    run.log_params({"optim.lr": 1e-5})
    run.log_metrics({"train/success_rate": 0.5}, step=0)
    run.log_metrics({"train/success_rate": 1}, step=1)
    run.log_text("a: 1\n", "episodes/step_00001.jsonl")
    run.finish("KILLED")
    info = json.loads((run.folder / "run.json").read_text())
    assert (info["run_name"], info["tags"], info["status"]) == ("first", {"epo.env": "toy"}, "KILLED")
    assert json.loads((run.folder / "params.json").read_text()) == {"optim.lr": "1e-05"}
    assert [(m["step"], m["train/success_rate"]) for m in read_jsonl_metrics(run.folder)] == [(0, 0.5), (1, 1.0)]
    assert (run.folder / "episodes" / "step_00001.jsonl").read_text() == "a: 1\n"

    reopened = open_tracker(tracking, run_id=run.run_id, resume=True)  # --resume appends to the same run
    assert reopened.run_name == "first" and json.loads((run.folder / "run.json").read_text())["status"] == "RUNNING"
    reopened.log_metrics({"train/success_rate": 0.0}, step=2)
    assert len(read_jsonl_metrics(run.folder)) == 3
    with pytest.raises(TrackingError, match="run nope: no .*run.json"):
        open_tracker(tracking, run_id="nope")


def test_unwritable_jsonl_folder_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrackingError, match=r"tracking.uri .*file/epo: not a writable folder"):
        check_store(TrackingSpec(backend="jsonl", uri=str(tmp_path / "file")))


def test_ablate_refuses_the_jsonl_backend():
    result = CliRunner().invoke(app, ["ablate", "smoothing", "--env", "toy", "--set", "tracking.backend=jsonl"])
    assert result.exit_code == 2 and "tracking.backend: epo ablate needs 'mlflow'" in result.output
