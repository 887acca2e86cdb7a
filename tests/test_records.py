"""Run records (`epo ablate --records DIR`): a study split across stores, or machines, is
summarized and drawn whole; records of other settings are not mistaken for its children."""

import json
import textwrap

import matplotlib.image as mpimg
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.ablate import summarize
from epo_cli.cli import app
from epo_cli.records import RecordError, RunRecord, read_record, read_records, write_record
from epo_cli.stats import EpisodeOutcome

runner = CliRunner()

SWEEP = """
    name: toy-records
    seeds: {seeds}
    set: [env.name=toy, model.name=tiny, train.steps=2, rollout.tasks_per_step=2, eval.every=2, eval.episodes=4]
    arms:
      - {{name: grpo, set: [algo.name=grpo]}}
      - {{name: grpo+epo, set: [algo.name=grpo+epo]}}
"""


def _sweep(tmp_path, seeds: str, name: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(SWEEP.format(seeds=seeds)))
    return path


def _ablate(tmp_path, sweep, store: str, records, *extra):
    uri = f"sqlite:///{tmp_path}/{store}.db"
    args = ["ablate", "--sweep", str(sweep), "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/{store}-ckpt",
            "--records", str(records), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output, MlflowClient(uri)


def _summary(client, tmp_path) -> str:
    experiment = client.get_experiment_by_name("epo").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`epo.ablation.key` != ''")
    return open(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read()


@pytest.mark.slow
def test_a_study_run_a_seed_at_a_time_in_two_stores_is_summarized_and_drawn_whole(tmp_path):
    records = tmp_path / "records"
    # Machine A: seed 0 only. Its two children are recorded.
    output, first = _ablate(tmp_path, _sweep(tmp_path, "[0]", "a.yaml"), "a", records)
    assert sorted(p.name for p in records.iterdir()) == ["grpo+epo-s0.json", "grpo-s0.json"]
    assert "run records: " in output and "(2 of 2 children)" in output
    # Machine B: a new store and both seeds. Seed 0 is taken from the records, not trained again.
    output, second = _ablate(tmp_path, _sweep(tmp_path, "[0, 1]", "b.yaml"), "b", records)
    assert output.count("recorded in ") == 2 and output.count("RL steps 2/2") == 2
    experiment = second.get_experiment_by_name("epo").experiment_id
    trained = second.search_runs([experiment], "tags.`epo.ablation.variant` != ''")
    assert sorted((r.data.tags["epo.ablation.variant"], r.data.tags["epo.seed"]) for r in trained) == [
        ("grpo", "1"), ("grpo+epo", "1")]
    assert len(list(records.iterdir())) == 4
    # The summary pools both seeds: 2 per arm, 4 IID episodes each.
    summary = _summary(second, tmp_path)
    assert "| grpo | 2 |" in summary and "| grpo+epo | 2 |" in summary and "/8 = " in summary

    # A record equals what the store holds: the same histories, the same last evaluation.
    record = read_record(records / "grpo-s0.json")
    (run,) = first.search_runs([first.get_experiment_by_name("epo").experiment_id], "tags.`epo.ablation.variant` = 'grpo'")
    assert record.run_id == run.info.run_id and record.study == "toy-records"
    assert record.history("train/reward_mean") == [m.value for m in sorted(
        first.get_metric_history(run.info.run_id, "train/reward_mean"), key=lambda m: m.step)]
    assert len(record.outcomes["iid"]) == 4 and record.last("eval/iid/episodes") == 4
    assert summarize(record).final_eval["iid"] == (sum(o.won for o in record.outcomes["iid"]), 4)

    # Drawn from the records alone, no store.
    out = tmp_path / "plots"
    result = runner.invoke(app, ["plot", "ablation", "--records", str(records), "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = mpimg.imread(out / "ablation_records_train_reward_mean.png")
    assert image.shape[0] > 600 and image[..., :3].std() > 0.05


@pytest.mark.slow
def test_a_record_of_other_settings_is_said_and_its_child_is_run(tmp_path):
    records = tmp_path / "records"
    _ablate(tmp_path, _sweep(tmp_path, "[0]", "a.yaml"), "a", records)
    before = read_record(records / "grpo-s0.json").experiment_key
    output, _ = _ablate(tmp_path, _sweep(tmp_path, "[0]", "a.yaml"), "c", records, "--set", "optim.lr=1e-3")
    assert output.count("other settings than this sweep's; not used") == 2 and "recorded in " not in output
    assert output.count("RL steps 2/2") == 2
    assert read_record(records / "grpo-s0.json").experiment_key != before  # rewritten by the new child


def _record(**changes) -> RunRecord:
    outcomes = {"iid": [EpisodeOutcome("t0", 0, True, 1.0, 3, 0), EpisodeOutcome("t1", 0, False, 0.5, 8, 1)]}
    metrics = {"eval/iid/success_rate": [[0, 0.0], [4, 0.5]], "eval/iid/episodes": [[0, 2], [4, 2]],
               "actor/entropy": [[0, 1.0], [1, 0.8], [2, 0.6]], "train/reward_mean": [[2, 0.25]]}
    return RunRecord(**{"study": "s", "variant": "grpo", "seed": 3, "run_id": "r", "experiment_key": "k",
                        "params": {"algo.name": "grpo"}, "metrics": metrics, "outcomes": outcomes, **changes})


def test_a_record_round_trips_and_summarizes_by_hand(tmp_path):
    path = write_record(tmp_path, _record())
    assert path.name == "grpo-s3.json" and read_records(tmp_path) == [_record()]
    summary = summarize(read_record(path))
    assert (summary.best_success, summary.final_success, summary.final_reward) == (0.5, 0.5, 0.25)
    assert summary.entropy_variance == pytest.approx(0.08 / 3)  # population variance of 1.0, 0.8, 0.6
    assert summary.final_eval == {"iid": (1, 2)} and len(summary.final_outcomes["iid"]) == 2


def test_a_file_that_is_not_a_record_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(RecordError, match=r"run record .*x\.json: not a file written by `epo ablate --records`"):
        read_records(tmp_path)
    assert read_records(tmp_path / "missing") == []


@pytest.mark.parametrize("sweep, name", [
    ("decoy_chain_pilots_sure025.yaml", "decoy-chain-pilots-sure025"),
    ("decoy_chain_pilots_sure0275.yaml", "decoy-chain-pilots-sure0275"),
    ("decoy_chain_pilots_sure02625.yaml", "decoy-chain-pilots-sure02625"),
    ("decoy_chain_study.yaml", "decoy-chain-study"),
    ("decoy_chain_study_quick.yaml", "decoy-chain-study"),  # a subset of the study: its runs, not new ones
])
def test_the_committed_records_are_still_this_codes_experiments(sweep, name):
    """docs/records/NAME holds every child of experiments/sweeps/SWEEP with today's
    settings: a change of a default that would make them other experiments fails here."""
    from pathlib import Path

    from rich.console import Console

    from epo_cli.ablate import _matching_records
    from epo_cli.sweep import load_sweep, sweep_specs

    root = Path(__file__).parents[1]
    specs = sweep_specs(load_sweep(root / "experiments" / "sweeps" / sweep), {}, [])
    console = Console(record=True, width=200)
    matching = _matching_records(root / "docs" / "records" / name, specs, console)
    assert sorted(matching) == sorted(specs), console.export_text()


@pytest.mark.slow
def test_a_sweep_stopped_after_a_child_keeps_that_childs_record(tmp_path, monkeypatch):
    import epo_cli.trainer

    real, calls = epo_cli.trainer.run_training, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(epo_cli.trainer, "run_training", stopped_at_the_second)
    records = tmp_path / "records"
    uri = f"sqlite:///{tmp_path}/a.db"
    result = runner.invoke(app, ["ablate", "--sweep", str(_sweep(tmp_path, "[0]", "a.yaml")), "--tracking-uri", uri,
                                 "--set", f"checkpoint.dir={tmp_path}/ckpt", "--records", str(records)])
    assert result.exit_code != 0 and "run the same command again" in result.output
    assert [p.name for p in records.iterdir()] == ["grpo-s0.json"]


def test_the_figure_draws_every_arm_of_a_study_with_more_arms_than_colors():
    from epo_cli.plots import COLORS, plot_ablation

    arms = [f"arm{i}" for i in range(len(COLORS) + 2)]
    figure = plot_ablation([_record(variant=arm) for arm in arms], "study", "train/reward_mean")
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == [f"{arm} (n=1)" for arm in arms]
