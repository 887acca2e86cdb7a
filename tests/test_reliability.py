"""Faults and bad input: each gets a clear error or a defined outcome, never a lost run."""

import math
import pickle
import random
import resource
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli import checkpoint as ckpt
from epo_cli.cli import app
from epo_cli.envs.base import MAX_ACTION_CHARS, parse_action
from epo_cli.trainables import OptimizerStep
from epo_cli.trainer import MAX_CONSECUTIVE_SKIPS


class FakePolicy:
    def save_pretrained(self, path, state_dict=None):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.bin").write_text("weights")


def test_a_crash_mid_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 1, [ckpt.ModelFolder("policy", FakePolicy())], FakePolicy(), {"step": 1}, {}, "spec: 1\n", keep=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_state", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, [ckpt.ModelFolder("policy", FakePolicy())], FakePolicy(), {"step": 2}, {}, "spec: 2\n", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # no partial folder left
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert (first / "policy" / "model.bin").read_text() == "weights"


def test_a_full_disk_at_a_checkpoint_stops_the_run_resumably_and_keeps_the_previous_one(tmp_path, monkeypatch):
    # A real failed write: the second checkpoint is written under a 64 kB file-size limit
    # (the OS's "File too large", which a full disk's ENOSPC is handled like).
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["train", "--model", "tiny", "--steps", "3", "--tracking-uri", tracking, "--set", "env.max_turns=2",
            "--set", "rollout.max_response_tokens=8", "--set", "rollout.tasks_per_step=1",
            "--set", "checkpoint.every=1", "--set", f"checkpoint.dir={tmp_path}/ckpt"]
    save, calls = ckpt.save_checkpoint, []

    def save_on_a_small_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) != 2:
            return save(*args, **kwargs)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, limits[1]))
        try:
            return save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_on_a_small_disk)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (root,) = (tmp_path / "ckpt").iterdir()
    first = root / "step_000001"
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"error: checkpoint {root / 'step_000002'}: not written (File too large): it needs about ")
    assert f"continue: epo train --resume {first}" in message
    assert [p.name for p in root.iterdir()] == ["step_000001"]  # no partial folder beside it
    client = MlflowClient(tracking)
    assert client.get_run(root.name).info.status == "KILLED"
    resumed = CliRunner().invoke(app, ["train", "--resume", str(first), "--tracking-uri", tracking])
    assert resumed.exit_code == 0, resumed.output
    assert client.get_run(root.name).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(root.name, "actor/entropy")) == [0, 1, 1, 2]


def test_keep_the_last_n_checkpoints(tmp_path):
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, [ckpt.ModelFolder("policy", FakePolicy())], FakePolicy(), {}, {}, "", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


def _state_like_a_learners():
    """Nested dicts and lists, tuples, int keys, tied and scalar tensors, RNG states."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tied = torch.arange(6.0).reshape(2, 3)
    return {
        "optimizer": optimizer.state_dict(),  # int keys, tuple betas, tensor step
        "weights": {"embed": tied, "lm_head": tied, "row": tied[1]},
        "rng": ckpt.rng_state(torch.Generator().manual_seed(3)),
        "history": {"step_means": [0.5, float("nan")], "turn_means": [{"0": 1.5}]},
        "position": 7,
        "nothing": None,
    }


def test_trainer_state_round_trips_through_safetensors_and_json(tmp_path):
    state = _state_like_a_learners()
    ckpt.write_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.STATE_TENSORS, ckpt.STATE_JSON])
    loaded = ckpt.read_state(tmp_path)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # tuples and all
    for param_id, saved in state["optimizer"]["state"].items():
        assert set(loaded["optimizer"]["state"][param_id]) == set(saved)
        for key, value in saved.items():
            assert torch.equal(loaded["optimizer"]["state"][param_id][key], value)
    for name, tensor in state["weights"].items():
        assert torch.equal(loaded["weights"][name], tensor)
    assert loaded["rng"]["python"] == state["rng"]["python"]
    random_state = random.getstate()
    random.setstate(loaded["rng"]["python"])  # accepted as the tuple it was
    random.setstate(random_state)
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert math.isnan(loaded["history"]["step_means"][1]) and loaded["history"]["turn_means"] == [{"0": 1.5}]
    assert (loaded["position"], loaded["nothing"]) == (7, None)


def test_a_state_that_is_not_data_is_not_written(tmp_path):
    with pytest.raises(TypeError, match="cannot store a function"):
        ckpt.write_state(tmp_path, {"scheduler": {"lr_lambda": lambda step: 1.0}})


class RunsCode:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "run" / "step_000001"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "payload": RunsCode(marker)}, folder / ckpt.PICKLED_STATE)  # the old format
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.pt: a pickled state .* refused") as err:
        ckpt.read_state(folder)
    assert "\n" not in str(err.value)
    ckpt.write_state(folder, {"step": 1})
    (folder / ckpt.STATE_TENSORS).write_bytes(pickle.dumps(RunsCode(marker)))  # a pickle in place of tensors
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint file {folder / ckpt.STATE_TENSORS}: truncated or corrupt"):
        ckpt.read_state(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damaged", [ckpt.STATE_TENSORS, ckpt.STATE_JSON, ckpt.META_FILE])
def test_a_truncated_checkpoint_is_one_line_naming_the_file_and_the_previous_one_still_loads(tmp_path, damaged):
    state = {"step": 0, "learner": {"weights": torch.ones(64, 64)}}
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, [ckpt.ModelFolder("policy", FakePolicy())], FakePolicy(), {**state, "step": step}, {"mlflow_run_id": "r"}, "", keep=3)
    latest = ckpt.latest_checkpoint(tmp_path)
    data = (latest / damaged).read_bytes()
    (latest / damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_meta(latest)
        ckpt.read_state(latest)
    message = str(err.value)
    assert "\n" not in message and str(latest / damaged) in message and "truncated or corrupt" in message
    assert message.endswith(f"the run's previous checkpoint is {tmp_path / 'step_000001'}")
    previous = tmp_path / "step_000001"
    assert ckpt.read_meta(previous)["step"] == 1
    assert torch.equal(ckpt.read_state(previous)["learner"]["weights"], torch.ones(64, 64))


def test_non_finite_gradients_skip_the_step_and_are_counted():
    param = torch.nn.Parameter(torch.ones(2))
    step = OptimizerStep([torch.optim.SGD([param], lr=0.1)], [("actor", [param])], max_grad_norm=1.0)
    stats = SimpleNamespace(add=lambda *a: None)
    for _ in range(MAX_CONSECUTIVE_SKIPS):
        param.grad = torch.tensor([math.nan, 1.0])
        assert not step(stats)
    assert torch.equal(param.data, torch.ones(2))  # never updated with a NaN gradient
    assert step.skipped == step.consecutive_skips == MAX_CONSECUTIVE_SKIPS
    param.grad = torch.tensor([1.0, 1.0])
    assert step(stats)
    assert step.consecutive_skips == 0 and step.skipped == MAX_CONSECUTIVE_SKIPS
    assert not torch.equal(param.data, torch.ones(2))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_parser_never_crashes_on_arbitrary_text(text):
    action = parse_action(text)
    assert action is None or (0 < len(action) <= MAX_ACTION_CHARS and "<" not in action and action == action.strip())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_parser_reads_any_well_formed_answer(thought, action):
    text = f"<think>{thought.replace('<', '')}</think><action>{action.replace('<', '')}</action>"
    parsed = parse_action(text)
    cleaned = " ".join("".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in action.replace("<", "")).split())
    assert parsed == (cleaned or None)


def test_binary_garbage_from_a_model_is_an_invalid_turn():
    garbage = bytes(range(256)).decode("latin-1") * 3
    assert parse_action(garbage) is None
    assert parse_action("<think>" + "x" * 100_000 + "</think><action>go</action>") == "go"


def test_missing_java_is_a_clear_error(monkeypatch):
    from epo_cli.envs.scienceworld import ScienceWorldEngine

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="ScienceWorld needs Java"):
        ScienceWorldEngine()


def test_unknown_model_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", str(tmp_path / "nope"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2 and "model path" in result.output and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["train", "--model", str(tmp_path / "empty"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2 and "has no config.json" in result.output
