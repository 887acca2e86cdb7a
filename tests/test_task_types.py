"""env.task_types: validated against the environment, applied to train and eval splits;
`epo eval --model` on a model that has no run."""

import pytest
import yaml
from typer.testing import CliRunner

from epo_cli.cli import app
from epo_cli.envs.alfworld import TASK_TYPES
from epo_cli.evaluate import eval_tasks
from epo_cli.spec import SpecError, resolve_spec

runner = CliRunner()


def test_task_types_are_checked_against_the_environment():
    spec = resolve_spec(flags={"env": {"name": "alfworld"}}, overrides=["env.task_types=pick_and_place_simple, pick_two_obj_and_place"])
    assert spec.env.task_types == ["pick_and_place_simple", "pick_two_obj_and_place"]
    with pytest.raises(SpecError) as err:
        resolve_spec(flags={"env": {"name": "alfworld", "task_types": ["boil"]}})
    message = str(err.value)
    assert "env: task_types: unknown alfworld task type 'boil'" in message and ", ".join(TASK_TYPES) in message
    assert "\n" not in message
    with pytest.raises(SpecError, match="task_types: empty list"):
        resolve_spec(overrides=["env.task_types=[]"])
    assert resolve_spec(overrides=["env.task_types=[boil]"]).env.task_types == ["boil"]


def test_sft_splits_and_batches_are_checked():
    with pytest.raises(SpecError, match="sft.heldout_split: unknown alfworld split 'l2'"):
        resolve_spec(flags={"env": {"name": "alfworld"}}, overrides=["sft.heldout_split=l2"])
    with pytest.raises(SpecError, match="heldout_split must differ from train_split"):
        resolve_spec(overrides=["sft.heldout_split=train"])
    with pytest.raises(SpecError, match="micro_batch_size must not exceed batch_size"):
        resolve_spec(overrides=["sft.batch_size=2", "sft.micro_batch_size=4"])


def test_eval_sets_keep_only_the_chosen_types():
    tasks = eval_tasks("scienceworld", None, "iid", 6, ["boil", "melt"])
    assert len(tasks) == 6 and {t.task_type for t in tasks} == {"boil", "melt"}
    assert tasks == eval_tasks("scienceworld", None, "iid", 6, ["melt", "boil"])  # the same fixed order
    with pytest.raises(ValueError, match="env.task_types: split 'l2' has no task of type boil"):
        eval_tasks("scienceworld", None, "l2", 6, ["boil"])


def test_task_types_flag_is_comma_separated_and_repeatable():
    result = runner.invoke(app, ["spec", "show", "--env", "alfworld", "--task-types", "pick_and_place_simple,look_at_obj_in_light",
                                 "--task-types", "pick_two_obj_and_place"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["env"]["task_types"] == ["pick_and_place_simple", "look_at_obj_in_light", "pick_two_obj_and_place"]


def test_eval_takes_a_run_or_a_model():
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "a run (RUN_ID or a checkpoint folder) or --model" in result.output
    result = runner.invoke(app, ["eval", "some-run", "--task-types", "boil"])
    assert result.exit_code == 2 and "go with --model" in result.output


@pytest.mark.slow
def test_eval_model_without_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: no MLflow store appears
    result = runner.invoke(app, ["eval", "--model", "tiny", "--env", "alfworld", "--episodes", "2",
                                 "--task-types", "pick_and_place_simple", "--set", "env.max_turns=2",
                                 "--set", "rollout.max_response_tokens=8"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "│" in line]
    assert any(line.split("│")[1].strip() == "iid" and line.split("│")[2].strip() == "2" for line in rows)
    assert any(line.split("│")[1].strip() == "ood" for line in rows)
    types = [line.split("│")[1].strip() for line in rows if line.split("│")[1].strip() in TASK_TYPES]
    assert types == ["pick_and_place_simple"]
    assert not (tmp_path / "mlflow.db").exists()
