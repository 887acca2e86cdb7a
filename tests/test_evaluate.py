import pytest

from epo_cli.evaluate import EvalResult, eval_tasks
from epo_cli.spec import resolve_spec


def test_eval_sets_are_fixed_and_span_task_types():
    first = eval_tasks("scienceworld", None, "iid", 29)
    assert first == eval_tasks("scienceworld", None, "iid", 29)
    assert len({t.task_type for t in first}) == 29
    ood = eval_tasks("scienceworld", None, "ood", 5)
    assert all(t.variation not in {x.variation for x in first if x.task_type == t.task_type} for t in ood)
    with pytest.raises(ValueError, match="unknown evaluation split"):
        eval_tasks("scienceworld", None, "l2-train", 3)


def test_eval_metrics_keys():
    result = EvalResult("ood", episodes=10, successes=5, mean_turns=3.0, invalid_action_rate=0.25)
    metrics = result.metrics()
    assert metrics["eval/ood/success_rate"] == 0.5
    assert metrics["eval/ood/success_ci_low"] == pytest.approx(0.2366, abs=1e-4)
    assert metrics["eval/ood/episodes"] == 10


def test_repeats_play_each_task_with_its_own_seed():
    tasks = eval_tasks("toy", None, "iid", 3, repeats=2)
    assert [t.task_id for t in tasks] == [tasks[0].task_id] * 2 + [tasks[2].task_id] * 2 + [tasks[4].task_id] * 2
    assert tasks[0].seed != tasks[1].seed and len({t.key for t in tasks}) == 6


def test_eval_compare_adds_a_score_row_only_where_scores_are_partial(tmp_path):
    import json

    from typer.testing import CliRunner

    from epo_cli.cli import app

    runner = CliRunner()
    saved = tmp_path / "after.json"
    args = ["eval", "--model", "tiny", "--env", "toy", "--split", "iid", "--episodes", "2", "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}"]

    def compared_metrics(baseline) -> list[str]:
        result = runner.invoke(app, [*args, "--compare", str(baseline)], env={"COLUMNS": "240"})
        assert result.exit_code == 0, result.output
        rows = [line.split("│") for line in result.output.split("paired comparison")[1].splitlines()]
        return [cells[2].strip() for cells in rows if len(cells) > 2 and cells[1].strip() == "iid"]

    result = runner.invoke(app, [*args, "--save", str(saved)])
    assert result.exit_code == 0, result.output
    assert compared_metrics(saved) == ["success"]  # the toy's score is its success
    payload = json.loads(saved.read_text())
    for row in payload["splits"]["iid"]:
        row.update(won=False, score=0.5)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(payload))
    assert compared_metrics(partial) == ["success", "score"]


def test_a_runs_logged_evaluation_reads_back_as_played(tmp_path):
    """`epo eval RUN --logged` rebuilds the training run's last evaluation from its episode
    files: the same outcomes as evaluating that checkpoint again, in the --save format."""
    import json

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from epo_cli.cli import app

    runner = CliRunner()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained = runner.invoke(app, ["train", "--env", "toy", "--model", "tiny", "--algo", "grpo", "--steps", "1", "--tracking-uri", uri,
                                  "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "eval.every=1", "--set", "eval.episodes=3"])
    assert trained.exit_code == 0, trained.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    logged, played = tmp_path / "logged.json", tmp_path / "played.json"
    for args, path in ((["--logged"], logged), (["--episodes", "3"], played)):
        result = runner.invoke(app, ["eval", run.info.run_id, *args, "--save", str(path), "--tracking-uri", uri], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert ("logged evaluation of" in result.output) == (path == logged)
    logged_splits, played_splits = (json.loads(p.read_text())["splits"] for p in (logged, played))
    assert set(logged_splits) == {"iid", "ood"} and all(len(rows) == 3 for rows in logged_splits.values())
    assert logged_splits == played_splits
    assert all(row["task"].startswith("toy:") and row["seed"] == 20250926 for row in logged_splits["iid"])
    wins = sum(row["won"] for row in logged_splits["iid"])
    assert run.data.metrics["eval/iid/success_rate"] == pytest.approx(wins / 3)

    for args, message in ((["--logged", "--model", "tiny"], "--logged reads"),
                          ([run.info.run_id, "--logged", "--episodes", "2"], "--logged reads"),
                          ([run.info.run_id, "--step", "1"], "--step goes with --logged"),
                          ([str(tmp_path / "ckpt"), "--logged"], "it takes a run id or name, not the folder")):
        result = runner.invoke(app, ["eval", *args, "--tracking-uri", uri])
        assert result.exit_code == 2 and message in result.output, result.output
    missing = runner.invoke(app, ["eval", run.info.run_id, "--logged", "--step", "7", "--tracking-uri", uri])
    assert missing.exit_code == 2 and "--step 7: the run has evaluation episodes of split 'iid' at steps 1" in missing.output


def test_the_split_interval_counts_games_not_their_repeats():
    from epo_cli.evaluate import EvalResult
    from epo_cli.stats import EpisodeOutcome, game_interval, wilson_interval

    def outcome(task: str, seed: int, won: bool) -> EpisodeOutcome:
        return EpisodeOutcome(task, seed, won, float(won), 3, 0)

    # Two games, each played twice with the same result (as at temperature 0): 2 games, not 4
    # episodes. Resampling games draws rates 0, 1/2 or 1 (1/4, 1/2, 1/4): the interval is [0, 1].
    repeated = [outcome("a", 0, True), outcome("a", 1, True), outcome("b", 0, False), outcome("b", 1, False)]
    result = EvalResult("iid", 4, 2, 3.0, 0.0, outcomes=repeated)
    assert result.interval == (0.0, 1.0)
    assert wilson_interval(2, 4) == pytest.approx((0.150, 0.850), abs=1e-3)  # what counting episodes gave
    # One episode per game: the Wilson interval of the games.
    once = [outcome(str(i), 0, i < 3) for i in range(10)]
    assert game_interval(once) == wilson_interval(3, 10)


def test_greedy_evaluation_plays_each_game_once():
    from epo_cli.evaluate import eval_repeats

    assert eval_repeats(resolve_spec(overrides=["eval.repeats=2", "eval.temperature=0.4"])) == 2
    assert eval_repeats(resolve_spec(overrides=["eval.repeats=2", "eval.temperature=0"])) == 1


def test_settings_can_be_chosen_on_training_games():
    from epo_cli.envs.toy import load_split

    tasks = eval_tasks("toy", None, "train", 5)
    assert len(tasks) == 5 and {t.task_id for t in tasks} <= {t.task_id for t in load_split("toy", None, "train")}
