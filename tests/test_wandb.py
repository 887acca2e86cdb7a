"""Weights & Biases mirroring (tracking.wandb) in W&B's offline mode, no network: the W&B
run holds every metric of every step the MLflow run holds, the params and episode tables."""

import glob
import json
import struct

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.cli import app

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'epo-cli[wandb]')")
W_AND_B_KEYS = ("_step", "_runtime", "_timestamp", "_wandb")
BLOCK = 32768  # W&B's run file is a LevelDB-style log of 32 KiB blocks


def _records(path: str):
    """The protobuf records of an offline run file (``run-ID.wandb``)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # block padding
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # full / first, then middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def test_an_offline_wandb_run_holds_what_the_mlflow_run_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, [
        "train", "--env", "toy", "--algo", "grpo+epo", "--model", "tiny", "--steps", "3", "--tracking-uri", uri,
        "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "tracking.wandb=true", "--set", "tracking.wandb_mode=offline",
    ])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    run_id = run.info.run_id
    expected: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run_id, key):
            expected.setdefault(metric.step, {})[key] = metric.value

    (run_file,) = glob.glob(f"{tmp_path}/wandb/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")  # the same run id
    rows, config, tables = {}, {}, set()
    for record in _records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[items["_step"]] = items
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    for step, row in rows.items():  # a table is stored as NAME/_type, NAME/path, ...
        here = {key.removesuffix("/_type") for key, value in row.items() if key.endswith("/_type") and value == "table-file"}
        assert here == {f"episodes/step_{step:05d}"}  # each step's episodes at that step
        tables |= here
    assert sorted(rows) == sorted(expected) == [0, 1, 2]
    for step, metrics in expected.items():
        mirrored = {k: v for k, v in rows[step].items() if k not in W_AND_B_KEYS and k.rsplit("/", 1)[0] not in tables}
        assert mirrored.keys() == metrics.keys(), step
        for key, value in metrics.items():
            assert mirrored[key] == pytest.approx(value, rel=1e-12), (step, key)
    assert len(tables) == 3
    run_dir = run_file.rsplit("/", 1)[0] + "/files/"
    for step in expected:  # every episode of the step, one row each, as in MLflow's episode file
        table = json.loads(open(run_dir + rows[step][f"episodes/step_{step:05d}/path"]).read())
        lines = client.download_artifacts(run_id, f"episodes/step_{step:05d}.jsonl", str(tmp_path))
        assert len(table["data"]) == len(open(lines).read().splitlines()) == 32
    assert config["algo.name"] == "grpo+epo" and config["model.name"] == "tiny"
    assert len(config) >= len(run.data.params) - 1  # the same params (W&B adds its own _wandb entry)


def test_wandb_without_the_package_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = CliRunner().invoke(app, ["train", "--env", "toy", "--model", "tiny", "--steps", "1",
                                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--set", "tracking.wandb=true"])
    assert result.exit_code != 0
    assert "tracking.wandb: the wandb package is not installed" in result.output
