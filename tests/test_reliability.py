"""Faults and bad input: each gets a clear error or a defined outcome, never a lost run."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from epo_cli import checkpoint as ckpt
from epo_cli.cli import app
from epo_cli.envs.base import MAX_ACTION_CHARS, parse_action
from epo_cli.learner import Learner
from epo_cli.trainer import MAX_CONSECUTIVE_SKIPS


class FakePolicy:
    def save_pretrained(self, path, state_dict=None):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.bin").write_text("weights")


def test_a_crash_mid_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 1, FakePolicy(), FakePolicy(), {"step": 1}, {}, "spec: 1\n", keep=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, FakePolicy(), FakePolicy(), {"step": 2}, {}, "spec: 2\n", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # no partial folder left
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert (first / "policy" / "model.bin").read_text() == "weights"


def test_keep_the_last_n_checkpoints(tmp_path):
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, FakePolicy(), FakePolicy(), {}, {}, "", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


def _bare_learner(param):
    learner = Learner.__new__(Learner)
    learner.spec = SimpleNamespace(optim=SimpleNamespace(max_grad_norm=1.0))
    learner.optimizers = [torch.optim.SGD([param], lr=0.1)]
    learner.skipped_steps = learner.consecutive_skips = 0
    return learner


def test_non_finite_gradients_skip_the_step_and_are_counted():
    param = torch.nn.Parameter(torch.ones(2))
    trainer = _bare_learner(param)
    stats = SimpleNamespace(add=lambda *a: None)
    for _ in range(MAX_CONSECUTIVE_SKIPS):
        param.grad = torch.tensor([math.nan, 1.0])
        trainer._optimizer_step(stats)
    assert torch.equal(param.data, torch.ones(2))  # never updated with a NaN gradient
    assert trainer.skipped_steps == trainer.consecutive_skips == MAX_CONSECUTIVE_SKIPS
    param.grad = torch.tensor([1.0, 1.0])
    trainer._optimizer_step(stats)
    assert trainer.consecutive_skips == 0 and trainer.skipped_steps == MAX_CONSECUTIVE_SKIPS
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
