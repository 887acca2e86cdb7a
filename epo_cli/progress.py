"""Progress bars with a rate and an ETA, for the commands that do long work."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, or seconds per item when slower than one a second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.completed and task.elapsed else None)
        if not speed:
            return Text("-/s")
        return Text(f"{speed:.1f}/s" if speed >= 1 else f"{1 / speed:.1f} s/it")


def progress_bar(console: Console, mode: str = "auto") -> Progress | PlainProgress:
    """A bar per task: description, bar, done/total, rate, a free ``info`` field, elapsed,
    ETA (``rich``); or, for a log file (``plain``, ``json``; ``auto``: when the console is
    not a terminal), :class:`PlainProgress` lines."""
    if mode == "auto":
        mode = "rich" if console.is_terminal else "plain"
    if mode != "rich":
        return PlainProgress(console, as_json=mode == "json")
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        # Steps take minutes on a CPU: rate and ETA from the whole task, not the last 30 s.
        TimeRemainingColumn(compact=True),
        console=console,
        speed_estimate_period=24 * 3600,
    )


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    info: str
    each: bool  # a line for every item (RL steps), else at most one per PlainProgress.every_s
    started: float = 0.0
    last_line: float = 0.0


class PlainProgress:
    """The calls of :class:`rich.progress.Progress` the commands make, written as plain,
    greppable lines for a log file: ``description done/total info, elapsed, eta``, or one
    JSON object per line. A task prints when it finishes, when it was added with
    ``each=True`` at every advance, otherwise at most once every ``every_s`` seconds."""

    def __init__(self, console: Console, as_json: bool = False, every_s: float = 30.0):
        self.console, self.as_json, self.every_s = console, as_json, every_s
        self.tasks: dict[int, _PlainTask] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, visible: bool = True,
                 info: str = "", each: bool = False, **fields) -> int:
        now = time.monotonic()
        task_id = len(self.tasks)
        self.tasks[task_id] = _PlainTask(description, total, completed, info, each, now, now)
        return task_id

    def reset(self, task_id: int, total: float | None = None, completed: float = 0, visible: bool = True,
              description: str | None = None, info: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        task.total = total if total is not None else task.total
        task.completed, task.description = completed, description or task.description
        task.info = info if info is not None else task.info
        task.started = task.last_line = time.monotonic()

    def update(self, task_id: int, advance: float = 0, completed: float | None = None, total: float | None = None,
               info: str | None = None, description: str | None = None, visible: bool = True, **fields) -> None:
        task = self.tasks[task_id]
        task.total = total if total is not None else task.total
        task.completed = completed if completed is not None else task.completed + advance
        task.info = info if info is not None else task.info
        task.description = description or task.description
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if (advance or completed is not None) and (task.each or finished or now - task.last_line >= self.every_s):
            task.last_line = now
            self._line(task, now)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def _line(self, task: _PlainTask, now: float) -> None:
        elapsed = now - task.started
        eta = None
        if task.total and task.completed:
            eta = elapsed / task.completed * max(task.total - task.completed, 0)
        if self.as_json:
            record = {"task": task.description, "completed": task.completed, "total": task.total, "info": task.info,
                      "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1)}
            self.console.print(json.dumps(record), markup=False, highlight=False, soft_wrap=True)
            return
        done = f"{task.completed:g}" + (f"/{task.total:g}" if task.total is not None else "")
        timing = f"elapsed {_clock(elapsed)}" + (f", eta {_clock(eta)}" if eta is not None else "")
        self.console.print(f"{task.description} {done} {task.info}, {timing}".replace(" ,", ","), markup=False,
                           highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class OverallProgress:
    """A bar over several runs (an ablation's or a sweep's children): RL steps of all of
    them, ``steps_before`` of which other runs already trained."""

    description: str
    total_steps: int
    steps_before: int
