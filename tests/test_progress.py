"""Long commands in a log file: plain, greppable progress lines when stdout is not a terminal."""

import json
import subprocess
import sys

import pytest
from rich.console import Console

from epo_cli.progress import PlainProgress, progress_bar


def _train(tmp_path, *extra: str) -> str:
    args = ["train", "--env", "toy", "--algo", "grpo", "--steps", "3", "--seed", "0",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--set", f"checkpoint.dir={tmp_path}/ckpt", *extra]
    done = subprocess.run([sys.executable, "-m", "epo_cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_train_into_a_pipe_prints_one_line_per_rl_step(tmp_path):
    lines = [line for line in _train(tmp_path).splitlines() if line.startswith("RL steps ")]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("succ " in line and "reward " in line and "step KL " in line and "s/step" in line and "eta " in line
               for line in lines), lines
    records = [json.loads(line) for line in _train(tmp_path, "--progress", "json").splitlines() if line.startswith("{")]
    steps = [r for r in records if r["task"] == "RL steps"]
    assert [r["completed"] for r in steps] == [1, 2, 3] and all(r["total"] == 3 for r in steps)


def test_plain_lines_are_throttled_except_for_tasks_with_a_line_per_item():
    console = Console(record=True, width=200, force_terminal=False)
    progress = PlainProgress(console, every_s=3600)
    steps = progress.add_task("RL steps", total=2, info="", each=True)
    turns = progress.add_task("rollout", total=10, info="")
    for _ in range(9):
        progress.update(turns, advance=1, info="4 running")
    progress.update(steps, advance=1, info="succ 0.50")
    progress.update(turns, advance=1)  # done: a line even within the hour
    lines = console.export_text().splitlines()
    assert [line.split(" ")[:2] for line in lines] == [["RL", "steps"], ["rollout", "10/10"]]
    assert lines[0].startswith("RL steps 1/2 succ 0.50, elapsed 0:00:00, eta ")


def test_rich_bars_on_a_terminal_lines_elsewhere():
    assert not isinstance(progress_bar(Console(force_terminal=True)), PlainProgress)
    assert isinstance(progress_bar(Console(force_terminal=False)), PlainProgress)
    assert isinstance(progress_bar(Console(force_terminal=True), "plain"), PlainProgress)
