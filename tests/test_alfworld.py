"""The real ALFWorld / TextWorld engine on the real json_2.1.1 games."""

import subprocess
from pathlib import Path

import pytest
from conftest import CI, SHARED_DATA
from typer.testing import CliRunner

from epo_cli.cli import app
from epo_cli.envs import alfworld
from epo_cli.envs.registry import DataError, data_dir, load_split

pytestmark = pytest.mark.slow


def test_splits_match_the_official_release():
    sizes = {split: len(load_split("alfworld", None, split)) for split in alfworld.SPLITS}
    assert sizes == {"train": 3553, "iid": 140, "ood": 134}
    for split in alfworld.SPLITS:
        assert {t.task_type for t in load_split("alfworld", None, split)} == set(alfworld.TASK_TYPES)


@pytest.mark.parametrize("task_type", alfworld.TASK_TYPES)
def test_planner_walkthrough_wins(task_type):
    task = next(t for t in load_split("alfworld", None, "iid") if t.task_type == task_type)
    engine = alfworld.AlfWorldEngine(with_planner=True)
    try:
        first = engine.reset(task)
        assert first.task_description and first.actions and engine.plan
        for action in engine.plan[:-1]:
            step = engine.step(action)
            assert step.accepted and not step.done and not step.won
        last = engine.step(engine.plan[-1])
        assert last.won and last.done and last.score == 1.0
    finally:
        engine.close()


def test_inadmissible_command_changes_nothing_and_is_flagged():
    task = load_split("alfworld", None, "ood")[0]
    engine = alfworld.AlfWorldEngine()
    try:
        first = engine.reset(task)
        step = engine.step("fly to the moon")
        assert step.observation == "Nothing happens."
        assert not step.accepted and not step.done
        assert sorted(step.actions) == sorted(first.actions)
        assert engine.step(first.actions[0]).accepted
    finally:
        engine.close()


def test_engine_is_reused_across_games():
    games = load_split("alfworld", None, "iid")[:2]
    engine = alfworld.AlfWorldEngine()
    try:
        descriptions = [engine.reset(game).task_description for game in games]
        assert descriptions[0] != descriptions[1]
    finally:
        engine.close()


def _no_alfworld_data(tmp_path, monkeypatch):
    """A machine without any ALFWorld data: no variables, an empty home and epo cache."""
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setenv("EPO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    _no_alfworld_data(tmp_path, monkeypatch)
    with pytest.raises(DataError) as err:
        data_dir("alfworld", None)
    message = str(err.value)
    assert str(tmp_path / "alfworld") in message and str(tmp_path / "home" / ".cache" / "alfworld") in message
    assert "epo data prepare alfworld" in message and "ALFWORLD_DATA" in message
    (tmp_path / "empty").mkdir(parents=True)
    (tmp_path / "empty" / "json_2.1.1").mkdir()
    with pytest.raises(FileNotFoundError, match="no game.tw-pddl files"):
        load_split("alfworld", tmp_path / "empty", "iid")


def test_alfworld_downloads_default_folder_is_found(tmp_path, monkeypatch):
    _no_alfworld_data(tmp_path, monkeypatch)
    downloaded = tmp_path / "home" / ".cache" / "alfworld"
    (downloaded / "json_2.1.1").mkdir(parents=True)
    assert data_dir("alfworld", None) == downloaded
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere" / "json_2.1.1").mkdir(parents=True)
    assert data_dir("alfworld", None) == tmp_path / "elsewhere"  # the variable comes first


def test_data_prepare_runs_the_official_download(tmp_path, monkeypatch):
    _no_alfworld_data(tmp_path, monkeypatch)
    calls = []

    def fake_download(command, **kwargs):
        calls.append(command)
        game = Path(command[command.index("--data-dir") + 1]) / "json_2.1.1" / "valid_seen" / "look_at_obj_in_light-x" / "trial_1"
        game.mkdir(parents=True)
        (game / alfworld.GAME_FILE).write_text("{}")
        return subprocess.CompletedProcess(command, 0, stderr="")

    monkeypatch.setattr(alfworld.subprocess, "run", fake_download)
    result = CliRunner().invoke(app, ["data", "prepare", "alfworld"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "home" / ".cache" / "alfworld"
    assert calls[0][1].endswith("alfworld-download") and calls[0][2:] == ["--data-dir", str(target)]
    assert "iid: 1 games" in result.output and "train: 0 games" in result.output
    assert data_dir("alfworld", None) == target


def test_data_prepare_offline_says_where_to_get_the_games(tmp_path, monkeypatch):
    _no_alfworld_data(tmp_path, monkeypatch)
    offline = "requests.exceptions.ConnectionError: Failed to resolve 'github.com'"
    monkeypatch.setattr(alfworld.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, stderr=f"Traceback\n{offline}\n"))
    result = CliRunner().invoke(app, ["data", "prepare", "alfworld"])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and offline in error[0]
    assert "https://github.com/alfworld/alfworld/releases/download/0.2.2/json_2.1.1_json.zip" in error[0]
    assert "--from DIR_WITH_ARCHIVES" in error[0]


def test_data_prepare_if_missing_leaves_found_games_alone(tmp_path, monkeypatch):
    _no_alfworld_data(tmp_path, monkeypatch)
    (tmp_path / "games" / "json_2.1.1").mkdir(parents=True)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "games"))
    monkeypatch.setattr(alfworld, "download", lambda target: pytest.fail("downloaded although the games were found"))
    result = CliRunner().invoke(app, ["data", "prepare", "alfworld", "--if-missing"])
    assert result.exit_code == 0 and f"found: {tmp_path / 'games'}" in result.output, result.output


@pytest.mark.skipif(not (SHARED_DATA / "alfworld").is_dir() and not CI, reason="the ALFWorld archives of ../shared are not here")
def test_data_prepare_extracts_the_archives(tmp_path):
    source = tmp_path / "archives"
    source.mkdir()
    real = data_dir("alfworld", None)  # resolves (and extracts) the shared archives
    assert (real / "json_2.1.1").is_dir()
    import shutil

    shutil.copy(SHARED_DATA / "alfworld" / "alfworld-json_2.1.1-valid.tar.gz", source)
    result = CliRunner().invoke(app, ["data", "prepare", "alfworld", "--from", str(source), "--to", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "iid: 140 games" in result.output and "ood: 134 games" in result.output
    assert len(load_split("alfworld", tmp_path / "data", "iid")) == 140


def test_textgen_cache_changes_no_text(monkeypatch):
    import textworld.envs.pddl.textgen as textgen

    def play():
        engine = alfworld.AlfWorldEngine()
        texts = []
        try:
            for task in load_split("alfworld", None, "ood")[:2]:
                step = engine.reset(task)
                texts.append((step.observation, step.task_description, tuple(step.actions)))
                for i in range(8):
                    step = engine.step(step.actions[(3 * i) % len(step.actions)])
                    texts.append((step.observation, tuple(step.actions)))
        finally:
            engine.close()
        return texts

    alfworld.install_textgen_cache()
    cached = play()
    monkeypatch.setattr(textgen, "_parse_and_convert", textgen._parse_and_convert.uncached)
    monkeypatch.setattr(alfworld, "install_textgen_cache", lambda: None)
    assert play() == cached
