"""Episode transcripts: what the agent was shown, what it wrote and what came of it.

Training writes ``episodes/step_NNNNN.jsonl`` to its MLflow run every step, evaluation
``episodes/eval_<split>_step_NNNNN.jsonl``: one JSON line per episode (task, outcome,
actions) with, for the episodes ``tracking.transcripts`` chooses, every turn in full.
``epo show`` reads them back; MLflow's UI shows them as plain artifacts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

ARTIFACT_DIR = "episodes"
TURN_FIELDS = ("turn", "observation", "listed_actions", "response", "action", "invalid_reason", "accepted", "reward", "score", "entropy")
_FILE_RE = re.compile(r"^(?:eval_(?P<split>[a-z0-9]+)_)?step_(?P<step>\d+)\.jsonl$")


def train_file(step: int) -> str:
    return f"{ARTIFACT_DIR}/step_{step:05d}.jsonl"


def eval_file(split: str, step: int) -> str:
    return f"{ARTIFACT_DIR}/eval_{split}_step_{step:05d}.jsonl"


def turn_record(turn) -> dict:
    """One turn of a :class:`~epo_cli.rollout.Turn` as a JSON-ready dict (``TURN_FIELDS``)."""
    return {
        "turn": turn.turn_index, "observation": turn.observation, "listed_actions": turn.listed_actions,
        "response": turn.response_text, "action": turn.action, "invalid_reason": turn.invalid_reason,
        "accepted": turn.accepted, "reward": round(turn.reward, 6), "score": turn.score,
        "entropy": None if turn.entropy is None else round(turn.entropy, 6),
    }


def episodes_jsonl(episodes: Sequence, transcribed: int | str = "all") -> str:
    """One JSON line per episode: task, type, outcome, turns, reward, actions, invalid turns;
    the first ``transcribed`` episodes (or all) also carry their ``transcript`` of turns."""
    limit = len(episodes) if transcribed == "all" else int(transcribed)
    lines = []
    for index, e in enumerate(episodes):
        record = {
            "episode": e.episode_id, "group": e.group_id, "env": e.task.env, "task_type": e.task.task_type,
            "task": str(e.task.task_id), "name": e.task.name, "variation": e.task.variation, "seed": e.task.seed,
            "won": e.won, "score": e.score, "turns": len(e.turns),
            "reward": round(e.total_reward, 6), "actions": [t.action for t in e.turns],
            "invalid_turns": e.invalid_turns,
        }
        if index < limit:
            record["transcript"] = [turn_record(t) for t in e.turns]
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


@dataclass(frozen=True)
class TranscriptFile:
    """One episode file of a run: a training step's, or an evaluation split's."""

    path: str
    step: int
    split: str | None  # None: training episodes

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.split is None else f"eval {self.split}, step {self.step}"


def transcript_files(paths: Sequence[str]) -> list[TranscriptFile]:
    """The episode files among artifact ``paths``, ordered by step."""
    found = []
    for path in paths:
        match = _FILE_RE.match(path.rsplit("/", 1)[-1])
        if match:
            found.append(TranscriptFile(path, int(match["step"]), match["split"]))
    return sorted(found, key=lambda f: (f.step, f.split or ""))


def choose_file(files: Sequence[TranscriptFile], step: int | None, split: str | None) -> TranscriptFile:
    """The file of ``split`` (None: training) at ``step`` (None: the latest)."""
    of_kind = [f for f in files if f.split == split]
    kind = "training episodes" if split is None else f"evaluation episodes of split {split!r}"
    if not of_kind:
        raise LookupError(f"the run has no {kind}")
    if step is None:
        return of_kind[-1]
    for f in of_kind:
        if f.step == step:
            return f
    raise LookupError(f"--step {step}: the run has {kind} at steps {', '.join(str(f.step) for f in of_kind)}")


def run_episode_file(client, run_id: str, step: int | None, split: str | None) -> tuple[TranscriptFile, str]:
    """One episode file of an MLflow run (:func:`choose_file`) and its text."""
    import os
    import tempfile
    from pathlib import Path

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    chosen = choose_file(transcript_files([a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)]), step, split)
    with tempfile.TemporaryDirectory(prefix="epo-episodes-") as scratch:
        return chosen, Path(client.download_artifacts(run_id, chosen.path, scratch)).read_text()


def read_episodes(text: str, source: str) -> list[dict]:
    """The episode records of a file's text; a damaged line is named."""
    episodes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            episodes.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{source}: line {number} is not JSON ({err})") from None
    return episodes


def summary_table(episodes: Sequence[dict], title: str) -> Table:
    """One line per episode: task, turns, outcome, invalid and inadmissible turns, entropy.
    On a narrow terminal the task names wrap; the numbers' headers never break in a word."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)  # room for the columns
    for column in ("episode", "group", "task", "turns", "won", "score", "reward", "invalid", "rejected", "mean H"):
        if column == "task":
            table.add_column(column, overflow="fold", min_width=8)
        else:
            table.add_column(column, justify="right", min_width=max(len(word) for word in column.split()))
    for e in episodes:
        turns = e.get("transcript")
        rejected = "-" if turns is None else str(sum(t["action"] is not None and not t["accepted"] for t in turns))
        entropies = [t["entropy"] for t in turns or [] if t.get("entropy") is not None]
        mean_entropy = f"{sum(entropies) / len(entropies):.3f}" if entropies else "-"
        label = _task_label(e)
        table.add_row(
            str(e["episode"]), str(e["group"]), label if label.startswith(e["task_type"]) else f"{e['task_type']} {label}",
            str(e["turns"]), "[green]yes[/]" if e["won"] else "no", f"{e['score']:g}", f"{e['reward']:g}",
            str(e.get("invalid_turns", "-")), rejected, mean_entropy,
        )
    return table


def episode_view(episode: dict) -> Group:
    """Every turn of an episode as a panel: observation, listed actions, raw response, and
    what became of it."""
    head = Text(
        f"episode {episode['episode']} · {episode['task_type']} · {_task_label(episode)} · "
        f"{'won' if episode['won'] else 'not won'} · score {episode['score']:g} · reward {episode['reward']:g}",
        style="bold",
    )
    turns = episode.get("transcript")
    if turns is None:
        return Group(head, Text("no transcript: this episode is beyond tracking.transcripts; actions: "
                                + "; ".join(str(a) for a in episode["actions"])))
    panels = []
    for t in turns:
        if t["action"] is None:
            outcome, style = f"[red]invalid[/]: {t['invalid_reason']}", "red"
        elif t["accepted"]:
            outcome, style = f"[green]accepted[/]: {t['action']}", "green"
        else:
            outcome, style = f"[yellow]rejected by the engine[/]: {t['action']}", "yellow"
        body = Text.assemble(("observation  ", "dim"), t["observation"].strip())
        if t["listed_actions"]:
            body.append_text(Text.assemble(("\nlisted       ", "dim"), f"{len(t['listed_actions'])} actions: "
                                           + ", ".join(t["listed_actions"][:12]) + (" ..." if len(t["listed_actions"]) > 12 else "")))
        body.append_text(Text.assemble(("\nresponse     ", "dim"), t["response"]))
        entropy = "" if t.get("entropy") is None else f" · H {t['entropy']:.3f}"
        title = f"turn {t['turn'] + 1} · reward {t['reward']:g} · score {t['score']:g}{entropy}"
        panels.append(Panel(Group(body, Text.from_markup(outcome)), title=title, title_align="left", border_style=style))
    return Group(head, *panels)


def _task_label(episode: dict) -> str:
    """The portable task name (files from before it was recorded: the task id)."""
    return str(episode.get("name", episode["task"]))
