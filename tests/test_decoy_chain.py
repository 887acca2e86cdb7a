"""The decoy-chain testbed: its mechanics by hand, its spec options, a short real run."""

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from epo_cli.cli import app
from epo_cli.envs.decoy_chain import DECOY, DecoyChainEngine, episode_plan
from epo_cli.envs.registry import load_split, make_engine
from epo_cli.envs.toy import OOD_WORDS, WORDS
from epo_cli.spec import SpecError, resolve_spec


def _play(engine, task, answers):
    steps = [engine.reset(task)]
    for answer in answers:
        steps.append(engine.step(answer))
    return steps


def test_every_turn_right_wins_a_wrong_turn_costs_its_share_and_the_decoy_pays_its_sure_reward():
    task = load_split("decoy-chain", None, "train")[3]
    engine = DecoyChainEngine(turns=8, sure_reward=0.3)
    plan = episode_plan(task, 8)
    first = engine.reset(task)
    assert plan[0] in first.observation and DECOY in first.observation and first.actions == [*WORDS, DECOY]
    steps = _play(engine, task, plan)
    assert [s.done for s in steps[1:]] == [False] * 7 + [True]
    assert steps[-1].won and steps[-1].score == 1.0
    wrong = next(w for w in WORDS if w != plan[5])
    steps = _play(engine, task, [*plan[:5], wrong, *plan[6:]])
    assert not steps[-1].won and steps[-1].score == 7 / 8
    steps = _play(engine, task, [plan[0], plan[1], DECOY])  # two right, then the decoy: its sure reward, whatever came before
    assert steps[-1].done and not steps[-1].won and steps[-1].score == 0.3
    engine.reset(task)
    assert not engine.step("purple").accepted  # not one of the words: a wrong turn the engine did not accept


def test_plans_are_fixed_by_task_id_and_the_ood_split_names_unseen_words():
    train, ood = load_split("decoy-chain", None, "train"), load_split("decoy-chain", None, "ood")
    assert (len(train), len(load_split("decoy-chain", None, "iid")), len(ood)) == (4096, 256, 256)
    assert episode_plan(train[0], 8) == episode_plan(train[0], 8) != episode_plan(train[1], 8)
    assert episode_plan(train[0], 12)[:8] == episode_plan(train[0], 8)  # a longer chain extends the same one
    assert set(episode_plan(ood[0], 50)) <= set(OOD_WORDS) and ood[0].task_type == "decoy-chain-ood"
    engine = DecoyChainEngine(turns=4, sure_reward=0.3)
    assert engine.reset(ood[0]).actions == [*OOD_WORDS, DECOY]


def test_the_spec_gives_the_engine_its_chain_length_and_sure_reward_and_refuses_unknown_options():
    spec = resolve_spec(flags={"env": {"name": "decoy-chain"}}, overrides=["env.max_turns=10", "env.options.sure_reward=0.4"])
    engine = make_engine("decoy-chain", spec.env.engine_options)
    assert (engine.turns, engine.sure_reward) == (10, 0.4)
    assert resolve_spec(flags={"env": {"name": "decoy-chain"}}).env.engine_options["sure_reward"] == 0.3  # the registry's default
    with pytest.raises(SpecError, match="env: options: decoy-chain has no option 'horizon'; it takes: sure_reward"):
        resolve_spec(flags={"env": {"name": "decoy-chain"}}, overrides=["env.options.horizon=8"])
    with pytest.raises(ValueError, match="sure_reward: expected a score in"):
        DecoyChainEngine(turns=8, sure_reward=1.5)


@pytest.mark.slow
def test_a_short_run_on_the_testbed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, ["train", "--env", "decoy-chain", "--algo", "grpo+epo", "--steps", "2", "--tracking-uri", uri,
                                      "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "eval.every=2",
                                      "--set", "eval.episodes=8"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    assert run.data.params["env.max_turns"] == "8" and run.data.params["model.name"] == "tiny"
    assert {"train/success_rate", "train/reward_mean", "eval/iid/success_rate", "eval/ood/success_rate", "epo/beta",
            "train/decoy_rate", "eval/iid/decoy_rate", "actor/entropy_var", "epo/out_of_corridor_frac"} <= set(run.data.metrics)
    assert 0 <= run.data.metrics["train/decoy_rate"] <= 1 and run.data.metrics["actor/entropy_var"] > 0
    turns = run.data.metrics["train/episode_turns"]
    assert 1 <= turns <= 8  # episodes end by the decoy or after the chain


def _episode(task, actions):
    from epo_cli.rollout import Episode, Turn

    turns = [Turn([1], [2], a, a, i, [0.0]) for i, a in enumerate(actions)]
    return Episode(task, 0, 0, turns, done=True)


def test_an_episode_ended_by_the_decoy_counts_in_the_decoy_rate_of_training_evaluation_and_outcome_files():
    from epo_cli.ablate import ChildSummary, _on_decoy
    from epo_cli.envs.registry import ended_by_decoy
    from epo_cli.evaluate import logged_result
    from epo_cli.rollout import episode_stats
    from epo_cli.stats import EpisodeOutcome
    from epo_cli.transcripts import episodes_jsonl

    assert DECOY == "stop"
    assert ended_by_decoy("decoy-chain", ["blue", DECOY]) is True
    assert ended_by_decoy("decoy-chain", [DECOY, "blue"]) is False  # the decoy ends an episode: not followed by more
    assert ended_by_decoy("decoy-chain", []) is False
    assert ended_by_decoy("toy-multiturn", ["blue", DECOY]) is None  # an env without a decoy has no rate
    task = load_split("decoy-chain", None, "iid")[0]
    episodes = [_episode(task, ["blue", DECOY]), _episode(task, ["blue"] * 8), _episode(task, [DECOY]), _episode(task, [None, DECOY])]
    assert episode_stats(episodes).decoy_rate == 0.75
    toy = load_split("toy-multiturn", None, "iid")[0]
    assert episode_stats([_episode(toy, ["blue"])]).decoy_rate is None
    import json
    records = [json.loads(line) for line in episodes_jsonl(episodes).splitlines()]
    result = logged_result("iid", records, "test")
    assert [o.decoy for o in result.outcomes] == [True, False, True, True]
    assert result.metrics()["eval/iid/decoy_rate"] == 0.75
    assert "eval/iid/decoy_rate" not in logged_result("iid", [json.loads(episodes_jsonl([_episode(toy, ["blue"])]))], "t").metrics()

    def child(decoys: list[bool]) -> ChildSummary:
        outcomes = [EpisodeOutcome(f"g{i}", 0, False, 0.3, 1, 0, d) for i, d in enumerate(decoys)]
        return ChildSummary("grpo", 0, "r", 0, 0, 0, 0, final_eval={"iid": (0, 2), "ood": (0, 2)},
                            final_outcomes={"iid": outcomes[:2], "ood": outcomes[2:]})

    # More than half of the final IID + OOD episodes by the decoy: on it; exactly half: not.
    assert _on_decoy([child([True, True, True, False]), child([True, False, True, False]), child([False] * 4)]) == "1/3"
    assert _on_decoy([ChildSummary("grpo", 0, "r", 0, 0, 0, 0)]) == "-"


def test_the_trend_of_the_token_entropy_variance_is_its_least_squares_slope_per_100_steps():
    from epo_cli.ablate import _trend, slope_per_100_steps

    assert slope_per_100_steps([0.5, 0.4, 0.3]) == pytest.approx(-10.0)
    assert slope_per_100_steps([1.0, 3.0, 2.0, 4.0]) == pytest.approx(80.0)  # (sum (x - 1.5)(y - 2.5)) / 5 = 0.8 per step
    assert slope_per_100_steps([0.7]) != slope_per_100_steps([0.7])  # nan: no trend from one step
    # Seeds -1, -3: mean -2, t(0.975, 1) = 12.706 times sd 1.414 / sqrt 2: half-width 12.7, not clipped to [0, 1].
    assert _trend([-1.0, -3.0]) == "-2 [-14.7, +10.7]" and _trend([float("nan")]) == "-"
