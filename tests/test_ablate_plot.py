"""`epo ablate` and `epo plot` on real (tiny-model, real-engine) runs."""

import json

import matplotlib.image as mpimg
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.ablate import summary_rows, ChildSummary
from epo_cli.presets import ablation_variants
from epo_cli.cli import app
from epo_cli.stats import EpisodeOutcome
from epo_cli.plots import plot_ablation, plot_entropy
from epo_cli.records import record_of

runner = CliRunner()
pytestmark = pytest.mark.slow
SMALL = ["--model", "tiny", "--steps", "2", "--set", "env.max_turns=2", "--set", "rollout.max_response_tokens=8",
         "--set", "rollout.tasks_per_step=2"]


def _check_png(path):
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_ablate_smoothing_then_plot(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["ablate", "smoothing", "--algo", "ppo", "--seeds", "0", "--seeds", "1", "--tracking-uri", uri,
            *SMALL, "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "eval.every=2", "--set", "eval.episodes=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "epo-base" in result.output and "best" in result.output and "Student-t" in result.output
    # Into a pipe: a line per child, each child's RL steps, the steps of all runs, the evaluations.
    lines = result.output.splitlines()
    assert len([line for line in lines if line.endswith((", seed 0", ", seed 1"))]) == 4
    assert [line.split()[2] for line in lines if line.startswith("RL steps ")] == ["1/2", "2/2"] * 4
    assert [line.split(": all runs ")[1].split()[0].rstrip(",") for line in lines if ": all runs " in line] == [f"{k}/8" for k in range(1, 9)]
    assert len([line for line in lines if line.startswith(("eval iid 2/2", "eval ood 2/2"))]) == 8
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("epo").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`epo.ablation` = 'smoothing' and tags.`epo.ablation.key` != ''")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((c.data.tags["epo.ablation.variant"], c.data.tags["epo.seed"]) for c in children) == [
        ("epo", "0"), ("epo", "1"), ("epo-base", "0"), ("epo-base", "1")]
    # EPO-Base really has no smoothing term; EPO has it from step 1 on.
    by_variant = {c.data.tags["epo.ablation.variant"]: c for c in children}
    assert "epo/smooth_penalty" not in by_variant["epo-base"].data.metrics
    assert "epo/smooth_penalty" in by_variant["epo"].data.metrics
    summary = client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    assert "| epo-base | 2 |" in open(summary).read()

    again = runner.invoke(app, args)  # resumable: finished children are skipped
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier") == 4
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4

    # An unfinished child is resumed from its checkpoint, not started again.
    client.set_terminated(by_variant["epo-base"].info.run_id, "KILLED")
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {by_variant['epo-base'].info.run_id}" in resumed.output
    assert resumed.output.count("finished earlier") == 3
    assert client.get_run(by_variant["epo-base"].info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4

    # The starting point on the success panels: here, one child's logged final evaluation.
    start = tmp_path / "start.json"
    saved = runner.invoke(app, ["eval", by_variant["epo"].info.run_id, "--logged", "--save", str(start), "--tracking-uri", uri])
    assert saved.exit_code == 0, saved.output
    out = tmp_path / "plots"
    for metric in ("train/reward_mean", "actor/entropy"):  # one figure per metric, none overwritten
        plot = ["plot", "ablation", "--parent", parent.info.run_id, "--metric", metric, "--tracking-uri", uri, "--out", str(out),
                "--start", str(start)]
        result = runner.invoke(app, plot)
        assert result.exit_code == 0, result.output
    for slug in ("train_reward_mean", "actor_entropy"):
        _check_png(out / f"ablation_{parent.info.run_id[:8]}_{slug}.png")
        assert (out / f"ablation_{parent.info.run_id[:8]}_{slug}.svg").exists()
    outcomes = {split: [EpisodeOutcome(**o) for o in rows] for split, rows in json.loads(start.read_text())["splits"].items()}
    finished = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    records = [record_of(client, c, "smoothing", c.data.tags["epo.ablation.variant"], int(c.data.tags["epo.seed"]), "")
               for c in finished]
    figure = plot_ablation(records, "Ablation: smoothing", "eval/iid/success_rate", ("start.json", outcomes))
    labels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in figure.axes if ax.get_visible()}
    wins = sum(o.won for o in outcomes["ood"])
    assert f"start, start.json: {wins}/{len(outcomes['ood'])}" in labels["OOD success (evaluation)"]
    assert "IID success (evaluation)" not in labels  # the chosen metric's own panel, not twice
    assert any(label.startswith("start, start.json: ") for label in labels["eval/iid/success_rate"])

    child = by_variant["epo"].info.run_id
    for kind in ("entropy", "reward", "success", "corridor"):
        result = runner.invoke(app, ["plot", kind, "--run", child, "--tracking-uri", uri, "--out", str(out)])
        assert result.exit_code == 0, result.output
        _check_png(out / f"{kind}_{child[:8]}.png")
    # The learning curve against the warm start: the start's line on both success panels.
    result = runner.invoke(app, ["plot", "success", "--run", child, "--tracking-uri", uri, "--out", str(out), "--start", str(start)])
    assert result.exit_code == 0, result.output
    from epo_cli.plots import plot_success

    figure = plot_success(client, [by_variant["epo"]], ("start.json", outcomes))
    for ax in figure.axes:
        assert any(line.get_label().startswith("start, start.json: ") for line in ax.get_lines()), ax.get_title()


def test_plot_errors_are_clear(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = runner.invoke(app, ["plot", "reward", "--run", "nope", "--tracking-uri", uri])
    assert result.exit_code == 2 and "no run with that id or name" in result.output
    result = runner.invoke(app, ["plot", "pie", "--run", "x", "--tracking-uri", uri])
    assert result.exit_code == 2 and "expected one of" in result.output
    result = runner.invoke(app, ["plot", "reward", "--start", "sft.json", "--tracking-uri", uri])
    assert result.exit_code == 2 and "--start goes with `epo plot success` or `epo plot ablation`" in result.output
    (tmp_path / "bad.json").write_text("{}")
    result = runner.invoke(app, ["plot", "ablation", "--start", str(tmp_path / "bad.json"), "--tracking-uri", uri])
    assert result.exit_code == 2 and "--start" in result.output and "not a file written by `epo eval --save`" in result.output


@pytest.mark.parametrize("turns", [1, 3])
def test_the_entropy_figure_draws_the_first_and_last_turn_once_each(tmp_path, turns):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("epo"), run_name="r").info.run_id
    for step in range(3):
        client.log_metric(run_id, "actor/entropy", 1.0 - 0.1 * step, step=step)
        for turn in range(turns):
            client.log_metric(run_id, f"actor/entropy_turn_{turn}", 1.0 - 0.1 * step + turn, step=step)
    figure = plot_entropy(client, [client.get_run(run_id)])
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == (["r: all turns"] if turns == 1 else ["r: turn 0", "r: turn 2", "r: all turns"])


@pytest.mark.parametrize("wins", [0, 2])
def test_the_starting_point_is_its_success_over_its_band_over_games(wins):
    import matplotlib.pyplot as plt

    from epo_cli.stats import EpisodeOutcome
    from epo_cli.plots import starting_point

    outcomes = [EpisodeOutcome(f"toy:{i}", 0, i < wins, float(i < wins), 3, 0) for i in range(3)]
    fig, ax = plt.subplots()
    starting_point(ax, "sft.json", outcomes)
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [wins / 3, wins / 3] and line.get_label() == f"start, sft.json: {wins}/3"
    (band,) = ax.patches
    # One episode per game: Wilson, n = 3, z = 1.96: 2/3 -> [0.208, 0.939]; 0/3 -> [0, 0.562]
    low, high = {2: (0.2077, 0.9385), 0: (0.0, 0.5615)}[wins]
    bottom, top = band.get_bbox().y0, band.get_bbox().y1
    assert bottom == pytest.approx(low, abs=1e-4) and top == pytest.approx(high, abs=1e-4)
    plt.close(fig)


def test_every_ablation_names_its_variants():
    assert [label for label, _ in ablation_variants("smoothing", "ppo")] == ["epo", "epo-base"]
    assert [label for label, _ in ablation_variants("history", "grpo")] == ["cumulative", "window-5", "per-turn"]
    assert ablation_variants("baseline", "grpo")[0][1] == {"algo": {"name": "grpo"}}
    with pytest.raises(ValueError, match="unknown"):
        ablation_variants("everything", "ppo")


def test_summary_mean_and_std():
    rows = summary_rows([ChildSummary("a", 0, "r0", 1.0, 0.5, 0.0, 0.1), ChildSummary("a", 1, "r1", 0.0, 0.5, 0.0, 0.3)])
    assert rows == [["a", "2", "0.500 ± 0.707", "0.500 [0.500, 0.500]", "-", "-", "-", "0.000 ± 0.000", "0.200 ± 0.141", "-", "-"]]
