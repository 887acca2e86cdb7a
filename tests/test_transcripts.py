"""Episode transcripts: written by training and evaluation, read back by `epo show`."""

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from epo_cli.cli import app
from epo_cli.envs.base import TaskInstance
from epo_cli.rollout import Episode, Turn
from epo_cli.transcripts import TURN_FIELDS, choose_file, episode_view, episodes_jsonl, read_episodes, summary_table, transcript_files

runner = CliRunner()


def _turn(index, response, action, reason=None, accepted=False, reward=0.0):
    return Turn([1, 2], [3], response, action, index, [-0.5], observation=f"obs {index}", listed_actions=["look", "go north"],
                invalid_reason=reason, accepted=accepted, reward=reward, score=float(index), entropy=0.25 * index)


def _episodes():
    task = TaskInstance("toy", "toy", "train-7", 0)
    first = Episode(task, 0, 0, [
        _turn(0, "<think></think><action>look</action>", "look", accepted=True),
        _turn(1, "no tags at all", None, reason="no <action>...</action> block"),
        _turn(2, "<think></think><action>fly</action>", "fly", accepted=False, reward=1.0),
    ], done=True, won=True, score=2.0)
    second = Episode(task, 1, 0, [_turn(0, "x", None, reason="no <action>...</action> block")])
    return [first, second]


def _render(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_episode_lines_carry_every_turn_of_the_transcribed_episodes():
    first, second = read_episodes(episodes_jsonl(_episodes(), transcribed=1), "test")
    assert [t["turn"] for t in first["transcript"]] == [0, 1, 2]
    assert all(set(TURN_FIELDS) <= set(t) for t in first["transcript"])
    assert first["transcript"][1] | {"listed_actions": None} == {
        "turn": 1, "observation": "obs 1", "listed_actions": None, "response": "no tags at all", "action": None,
        "invalid_reason": "no <action>...</action> block", "accepted": False, "reward": 0.0, "score": 1.0, "entropy": 0.25,
    }
    assert (first["invalid_turns"], first["won"], first["reward"], first["actions"]) == (1, True, 1.0, ["look", None, "fly"])
    assert "transcript" not in second and second["invalid_turns"] == 1  # beyond tracking.transcripts: summary only

    table = _render(summary_table([first, second], "step 0"))
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert rows[0][-3:] == ["1", "1", "0.250"]  # invalid, rejected by the engine, mean H
    assert rows[1][-3:] == ["1", "-", "-"]
    view = _render(episode_view(first))
    assert "invalid: no <action>...</action> block" in view and "rejected by the engine: fly" in view
    assert "accepted: look" in view and "turn 3 · reward 1 · score 2 · H 0.500" in view
    assert "no transcript" in _render(episode_view(second))


def test_the_tables_fit_80_columns_without_cutting_a_header_or_a_number():
    from epo_cli.ablate import SUMMARY_COLUMNS, print_summary

    episode = {"episode": 12, "group": 3, "task_type": "find-non-living-thing", "task": "7", "turns": 10, "won": False,
               "score": 75.0, "reward": 0.75, "invalid_turns": 0, "transcript": [{"action": "x", "accepted": True, "entropy": 0.3}]}
    console = Console(width=80, record=True)
    console.print(summary_table([{**episode, "name": "find-non-living-thing/63"}, episode], "step 0"))
    row = ["epo-base", "3", "0.50 ± 0.10", "0.45 [0.30, 0.60]", "61/150 [0.33, 0.48]", "0.40 [0.20, 0.60]",
           "50/139 [0.30, 0.42]", "0.55 ± 0.05", "0.0012", "-0.04 [-0.08, -0.00]", "2/3"]
    print_summary(console, "ablation smoothing", "abcdef12", [row])
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    words = text.split()
    headers = ["episode", "group", "task", "turns", "won", "score", "reward", "invalid", "rejected", "mean", "H", "variant",
               "seeds", *(word for column in SUMMARY_COLUMNS for word in column.split())]
    assert all(word in words for word in headers + row[0].split() + " ".join(row[1:]).split())
    # A task name without its type (older files) gets it in front.
    assert "find-non-living-thing 7" in _render(summary_table([episode], "step 0"))
    assert "have them" in text  # the caption is whole


def test_files_are_chosen_by_split_and_step():
    files = transcript_files(["episodes/step_00001.jsonl", "episodes/step_00000.jsonl", "episodes/eval_iid_step_00002.jsonl", "spec.yaml"])
    assert [(f.step, f.split) for f in files] == [(0, None), (1, None), (2, "iid")]
    assert choose_file(files, None, None).step == 1
    assert choose_file(files, 0, None).path == "episodes/step_00000.jsonl"
    assert choose_file(files, None, "iid").label == "eval iid, step 2"
    with pytest.raises(LookupError, match="--step 5: the run has training episodes at steps 0, 1"):
        choose_file(files, 5, None)
    with pytest.raises(LookupError, match="no evaluation episodes of split 'ood'"):
        choose_file(files, None, "ood")


def _invoke(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_train_and_eval_transcripts_read_back_through_epo_show(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Unconstrained, the random tiny model writes invalid answers: their reasons must show.
    _invoke("train", "--env", "toy-multiturn", "--steps", "1", "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt",
            "--set", "rollout.constrain=none", "--set", "rollout.tasks_per_step=4", "--set", "rollout.max_response_tokens=12")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    run_id = run.info.run_id
    _invoke("eval", run_id, "--split", "iid", "--episodes", "2", "--tracking-uri", uri)

    episodes = read_episodes(_artifact(client, run_id, "episodes/step_00000.jsonl", tmp_path), "train")
    turns = [t for e in episodes for t in e["transcript"]]
    assert len(episodes) == 4 and all(set(TURN_FIELDS) <= set(t) for t in turns)
    assert all(isinstance(t["entropy"], float) for t in turns)  # the update scored every (unconstrained) turn
    invalid = sum(t["action"] is None for t in turns)
    assert all(t["invalid_reason"] for t in turns if t["action"] is None)
    metrics = run.data.metrics
    assert invalid == pytest.approx(metrics["train/invalid_action_rate"] * metrics["train/episode_turns"] * len(episodes))
    assert metrics["perf/transcript_s"] < metrics["perf/step_s"]

    output = _invoke("show", "--tracking-uri", uri)
    assert f"showing the latest run with episodes, {run.info.run_name} ({run_id})" in output and "step 0" in output
    output = _invoke("show", run_id, "--episode", "0", "--tracking-uri", uri)
    assert "turn 1 ·" in output and ("invalid:" in output or "accepted:" in output)
    output = _invoke("show", run_id, "--split", "iid", "--tracking-uri", uri)
    assert "eval iid, step 1" in output
    evaluated = read_episodes(_artifact(client, run_id, "episodes/eval_iid_step_00001.jsonl", tmp_path), "eval")
    assert len(evaluated) == 2 and all(t["entropy"] is None for e in evaluated for t in e["transcript"])

    # A model without a run: files in a folder, shown from the file.
    _invoke("eval", "--model", "tiny", "--env", "toy", "--split", "iid", "--episodes", "2", "--transcripts", str(tmp_path / "eval"))
    output = _invoke("show", str(tmp_path / "eval" / "iid.jsonl"), "--episode", "1")
    assert "episode 1 · toy" in output and "accepted:" in output  # the toy preset constrains answers
    result = runner.invoke(app, ["show", run_id, "--step", "7", "--tracking-uri", uri])
    assert result.exit_code == 2 and "--step 7: the run has training episodes at steps 0" in result.output


def _artifact(client, run_id, path, tmp_path) -> str:
    with open(client.download_artifacts(run_id, path, str(tmp_path))) as handle:
        return handle.read()
