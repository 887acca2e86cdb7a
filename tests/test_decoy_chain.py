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
    assert {"train/success_rate", "train/reward_mean", "eval/iid/success_rate", "eval/ood/success_rate", "epo/beta"} <= set(run.data.metrics)
    turns = run.data.metrics["train/episode_turns"]
    assert 1 <= turns <= 8  # episodes end by the decoy or after the chain
