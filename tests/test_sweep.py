"""Sweep files (`epo ablate --sweep FILE`): validation, layering, and a resumable run on the toy."""

import textwrap
from collections import Counter

import matplotlib.image as mpimg
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.ablate import ChildSummary, summary_rows
from epo_cli.cli import app
from epo_cli.spec import SpecError, resolve_spec
from epo_cli.sweep import load_sweep, sweep_seeds, sweep_specs

runner = CliRunner()


def _write(tmp_path, text: str, name: str = "sweep.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_layers_base_then_sweep_then_arm_then_flags_then_command_line_sets_then_seed(tmp_path):
    _write(tmp_path, "env: {name: toy}\nalgo: {name: grpo}\nrollout: {temperature: 0.9}\n", "base.yaml")
    path = _write(tmp_path, """
        name: study
        base: base.yaml
        seeds: [3, 4]
        set: [rollout.temperature=0.8, optim.lr=1e-4, train.steps=9]
        arms:
          - {name: grpo}
          - {name: grpo+epo, set: [algo.name=grpo+epo, optim.lr=2e-4]}
    """)
    specs = sweep_specs(load_sweep(path), {"train": {"steps": 5}}, ["optim.lr=3e-4"])
    assert sorted(specs) == [("grpo", 3), ("grpo", 4), ("grpo+epo", 3), ("grpo+epo", 4)]
    plain, epo = specs[("grpo", 4)], specs[("grpo+epo", 3)]
    assert (plain.env.name, plain.algo.name, epo.algo.name) == ("toy", "grpo", "grpo+epo")
    assert plain.rollout.temperature == 0.8  # the sweep's set beats the base file
    assert plain.optim.lr == epo.optim.lr == 3e-4  # the command line's --set beats the arm's
    assert (plain.train.seed, epo.train.seed, plain.train.steps) == (4, 3, 5)  # the flag --steps beats the sweep's set
    assert plain.epo.entropy_coef == 0.0 and epo.epo.entropy_coef > 0  # each arm resolves its own algorithm preset


def test_an_arm_may_name_its_own_seeds_and_runs_still_go_seed_by_seed(tmp_path):
    path = _write(tmp_path, """
        name: rest
        seeds: [2]
        arms:
          - {name: a}
          - {name: b, seeds: [1, 2]}
          - {name: c, seeds: [5]}
    """)
    specs = sweep_specs(load_sweep(path), {"env": {"name": "toy"}}, [])
    assert list(specs) == [("a", 2), ("b", 2), ("b", 1), ("c", 5)]  # the sweep's seeds first, then the arms' own
    assert [s.train.seed for s in specs.values()] == [2, 2, 1, 5]
    own_only = _write(tmp_path, "name: s\nseeds: [0]\narms: [{name: a, seeds: [3]}, {name: b, seeds: [4, 3]}]\n")
    assert sweep_seeds(load_sweep(own_only)) == [3, 4]  # the sweep's seed 0 runs in no arm


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: s\nseeds: [0]\narms: [{name: a}, {name: a}]\n", "repeated: a"),
        ("name: s\nseeds: [0, 0]\narms: [{name: a}]\n", "expected distinct seeds"),
        ("name: s\nseeds: [0]\narms: []\n", "arms"),
        ("name: s\nseeds: [0]\narms: [{name: a, seeds: [1, 1]}]\n", "arms.0.seeds: .*expected distinct seeds"),
        ("name: s\nseeds: [0]\narms: [{name: a, sett: []}]\n", "arms.0.sett: unknown field"),
        ("name: s\nbase: nowhere.yaml\nseeds: [0]\narms: [{name: a}]\n", "base:"),
        ("name: s\nseeds: [0]\narms: [{name: 'a b'}]\n", "arms.0.name"),
    ],
)
def test_bad_sweep_files_are_one_line_errors_naming_the_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError, match=message) as err:
        load_sweep(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_arm_with_a_bad_override_fails_before_any_run(tmp_path):
    path = _write(tmp_path, "name: s\nseeds: [0]\narms: [{name: ok}, {name: broken, set: [optim.lr=-1]}]\n")
    with pytest.raises(SpecError, match="arm broken: .*optim.lr"):
        sweep_specs(load_sweep(path), {"env": {"name": "toy"}}, [])


def test_an_error_in_the_sweeps_own_set_is_not_blamed_on_an_arm(tmp_path):
    path = _write(tmp_path, "name: s\nseeds: [0]\nset: [optim.lr=-1]\narms: [{name: a}, {name: b}]\n")
    with pytest.raises(SpecError, match=r"^sweep s, settings shared by every arm .*: .*optim.lr"):
        sweep_specs(load_sweep(path), {"env": {"name": "toy"}}, [])
    fixed_by_each_arm = _write(tmp_path, "name: s\nseeds: [0]\nset: [optim.lr=-1]\narms: [{name: a, set: [optim.lr=1e-6]}]\n")
    assert sweep_specs(load_sweep(fixed_by_each_arm), {"env": {"name": "toy"}}, [])[("a", 0)].optim.lr == 1e-6


def test_summary_counts_diverged_runs_beside_the_finished_ones():
    rows = summary_rows([ChildSummary("a", 0, "r0", 0.5, 0.5, 0.0, 0.0)], Counter({"a": 1, "b": 2}))
    assert [row[:3] for row in rows] == [["a", "1 (+1 diverged)", "0.500"], ["b", "0 (+2 diverged)", "-"]]


def test_summary_reports_t_interval_over_seeds_and_pooled_wilson():
    children = [ChildSummary("a", 0, "r0", 0.5, 0.25, 0.0, 0.0, {"iid": (8, 32), "ood": (1, 4)}),
                ChildSummary("a", 1, "r1", 0.5, 0.75, 0.0, 0.0, {"iid": (24, 32), "ood": (3, 4)})]
    (row,) = summary_rows(children)
    # mean 0.5, std 0.3536, t(0.975, 1) = 12.706: half-width 12.706 * 0.3536 / sqrt(2) = 3.177
    assert row[3] == "0.500 [0.000, 1.000]"  # [-2.677, 3.677], clipped
    three = [ChildSummary("a", i, "r", 0.0, v, 0.0, 0.0) for i, v in enumerate((0.4, 0.5, 0.6))]
    assert summary_rows(three)[0][3] == "0.500 [0.252, 0.748]"  # t(0.975, 2) = 4.303, std 0.1: 4.303 * 0.1 / sqrt(3)
    # Wilson, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.25/64 + 3.8415/16384) / (1 + 3.8415/64) = 0.119
    assert row[4] == "32/64 = 0.500 [0.381, 0.619]"
    # OOD: per seed 0.25 and 0.75, as the IID finals above; pooled 4/8: centre (4 + 1.92) / 11.84 = 0.5,
    # half-width 1.96 * sqrt(2 + 0.96) / 11.84 = 0.285
    assert row[5:7] == ["0.500 [0.000, 1.000]", "4/8 = 0.500 [0.215, 0.785]"]
    assert summary_rows([ChildSummary("b", 0, "r", 0.0, 0.0, 0.0, 0.0)])[0][3:7] == ["0.000", "-", "-", "-"]


@pytest.mark.slow
def test_sweep_runs_every_arm_and_seed_then_resumes_and_plots(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _write(tmp_path, """
        name: toy-study
        seeds: [0, 1]
        set: [env.name=toy, model.name=tiny, train.steps=2, rollout.tasks_per_step=2, eval.every=2, eval.episodes=4]
        arms:
          - {name: grpo, set: [algo.name=grpo]}
          - {name: grpo+epo, set: [algo.name=grpo+epo], note: the paper's objective}
    """)
    args = ["ablate", "--sweep", str(path), "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "toy-study: all runs" in result.output and "the paper's objective" in result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("epo").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`epo.ablation` = 'toy-study'  and tags.`epo.ablation.key` != ''")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((c.data.tags["epo.ablation.variant"], c.data.tags["epo.seed"], c.data.params["train.seed"]) for c in children) == [
        ("grpo", "0", "0"), ("grpo", "1", "1"), ("grpo+epo", "0", "0"), ("grpo+epo", "1", "1")]
    assert all(c.info.status == "FINISHED" and c.data.metrics["eval/iid/episodes"] == 4 for c in children)
    summary = open(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read()
    assert "| grpo+epo | 2 |" in summary and "/8 = " in summary  # two seeds' 4 IID episodes pooled

    client.set_terminated(children[0].info.run_id, "KILLED")
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier") == 3 and f"resuming {children[0].info.run_id}" in again.output
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4

    out = tmp_path / "plots"
    result = runner.invoke(app, ["plot", "ablation", "--parent", parent.info.run_id, "--tracking-uri", uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = mpimg.imread(out / f"ablation_{parent.info.run_id[:8]}_train_reward_mean.png")
    assert image.shape[0] > 600 and image.shape[1] > 1000  # a grid of panels, not one row of two


def test_a_diverging_arm_is_counted_and_the_sweep_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _write(tmp_path, """
        name: toy-diverge
        seeds: [0]
        set: [env.name=toy, model.name=tiny, algo.name=grpo, train.steps=6, rollout.tasks_per_step=2, eval.every=0]
        arms:
          - {name: huge-lr, set: [optim.lr=1e30, optim.warmup_ratio=0]}
          - {name: fine}
    """)
    args = ["ablate", "--sweep", str(path), "--tracking-uri", uri, "--set", f"checkpoint.dir={tmp_path}/ckpt"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "huge-lr seed 0:" in result.output and "counted as diverged" in result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("epo").experiment_id
    found = client.search_runs([experiment], "tags.`epo.ablation` = 'toy-diverge'")
    (parent,) = [r for r in found if "epo.ablation.key" in r.data.tags]
    summary = open(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read()
    assert "| huge-lr | 0 (+1 diverged) | - |" in summary and "| fine | 1 |" in summary
    runs = {r.data.tags["epo.ablation.variant"]: r for r in found if "epo.ablation.variant" in r.data.tags}
    assert runs["huge-lr"].info.status == "FAILED" and runs["huge-lr"].data.tags["epo.diverged"] == "true"
    assert runs["fine"].info.status == "FINISHED"
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "diverged earlier" in again.output and "finished earlier" in again.output


def test_sweep_and_ablation_name_are_exclusive(tmp_path):
    path = _write(tmp_path, "name: s\nseeds: [0]\narms: [{name: a}]\n")
    for args in (["ablate"], ["ablate", "smoothing", "--sweep", str(path)], ["ablate", "--sweep", str(path), "--seeds", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output


@pytest.mark.parametrize("name", ["cpu_epo_study.yaml", "cpu_epo_study_variants.yaml", "cpu_epo_study_grpo.yaml"])
def test_the_study_sweeps_resolve_every_arm(name):
    from pathlib import Path

    sweep = load_sweep(Path(__file__).parents[1] / "experiments" / "sweeps" / name)
    specs = sweep_specs(sweep, {"model": {"name": "tiny"}}, [])
    assert len(specs) == len(sweep.arms) * 3
    budgets = {(s.train.steps, s.episodes_per_step, s.env.max_turns, s.optim.lr) for s in specs.values()}
    assert len(budgets) == 1  # the same step budget in every arm
    assert all(s.tracking.term_grad_norms and s.eval.every == s.train.steps for s in specs.values())


def _keys_on_each_processor(name: str, monkeypatch):
    """The sweep file ``name`` and its children's experiment keys where the processor has
    native bf16 (True) and where it has not (False)."""
    from pathlib import Path

    from epo_cli.ablate import experiment_key

    sweep = load_sweep(Path(__file__).parents[1] / "experiments" / "sweeps" / name)
    keys = {}
    for native in (True, False):
        monkeypatch.setattr("epo_cli.precision.native_bf16", lambda native=native: native)
        keys[native] = {pair: experiment_key(spec) for pair, spec in sweep_specs(sweep, {}, []).items()}
    return sweep, keys


@pytest.mark.parametrize(
    "name", ["cpu_epo_study.yaml", "cpu_epo_study_variants.yaml", "cpu_epo_study_variants_rest.yaml", "cpu_epo_study_grpo.yaml"]
)
def test_the_study_is_one_experiment_on_processors_with_and_without_native_bf16(name, monkeypatch):
    sweep, keys = _keys_on_each_processor(name, monkeypatch)
    assert keys[True] == keys[False]
    for native, chosen in ((False, ("none", None, None)), (True, ("bf16", "bfloat16", 2.0))):  # what pinning overrides
        monkeypatch.setattr("epo_cli.precision.native_bf16", lambda native=native: native)
        unpinned = resolve_spec(sweep.base, {}, [])
        assert (unpinned.model.autocast, unpinned.rollout.dtype, unpinned.algo.tis_cap) == chosen


@pytest.mark.parametrize("name", ["decoy_chain_study.yaml", "decoy_chain_pilots_sure02625.yaml"])
def test_the_decoy_chain_runs_are_one_experiment_on_every_processor_so_their_records_match(name, monkeypatch):
    _, keys = _keys_on_each_processor(name, monkeypatch)
    assert keys[True] == keys[False] and len(set(keys[True].values())) == len(keys[True])


def test_the_rest_of_stage_two_is_the_same_experiment_as_its_missing_children():
    from pathlib import Path

    from epo_cli.ablate import _experiment_json

    sweeps = Path(__file__).parents[1] / "experiments" / "sweeps"
    full, rest = (sweep_specs(load_sweep(sweeps / f"cpu_epo_study_variants{s}.yaml"), {}, []) for s in ("", "_rest"))
    assert list(rest) == [("ppo+no-dw", 1), ("ppo+epo-base", 2), ("ppo+no-dw", 2)]
    assert all(_experiment_json(rest[pair]) == _experiment_json(full[pair]) for pair in rest)


def test_the_pooled_interval_resamples_games_and_seeds_when_outcomes_are_known():
    from epo_cli.stats import EpisodeOutcome

    # Two seeds, each winning game a and losing game b: 2 games, not 4 independent episodes.
    # Any draw of games gives 0, 1/2 or 1 under either seed: the interval is [0, 1], where
    # Wilson over the 4 episodes gives [0.150, 0.850].
    outcomes = [EpisodeOutcome("a", 0, True, 1.0, 3, 0), EpisodeOutcome("b", 0, False, 0.0, 3, 0)]
    children = [ChildSummary("a", seed, f"r{seed}", 0.5, 0.5, 0.0, 0.0, {"iid": (1, 2)}, {"iid": outcomes}) for seed in (0, 1)]
    assert summary_rows(children)[0][4] == "2/4 = 0.500 [0.000, 1.000]"
    without = [ChildSummary("a", seed, f"r{seed}", 0.5, 0.5, 0.0, 0.0, {"iid": (1, 2)}) for seed in (0, 1)]
    assert summary_rows(without)[0][4] == "2/4 = 0.500 [0.150, 0.850]"
