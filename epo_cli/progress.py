"""Progress bars with a rate and an ETA, for the commands that do long work."""

from __future__ import annotations

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


def progress_bar(console: Console) -> Progress:
    """A bar per task: description, bar, done/total, rate, a free ``info`` field, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(compact=True),
        console=console,
    )


@dataclass
class OverallProgress:
    """A bar over several runs (an ablation's or a sweep's children): RL steps of all of
    them, ``steps_before`` of which other runs already trained."""

    description: str
    total_steps: int
    steps_before: int
