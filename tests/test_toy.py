"""The toy word game: the engine, and every algorithm learning it through the same
rollout -> advantage -> loss -> optimizer path as `epo train` (tiny random model,
constrained decoding). A flipped policy-gradient sign, a detached loss or a masking bug
keeps the reward at chance and fails these tests (docs/learning.md)."""

import pytest
import torch

from epo_cli.envs.base import TaskInstance
from epo_cli.envs.toy import WORDS, ToyEngine, episode_plan, load_split
from epo_cli.spec import resolve_spec
from epo_cli.trainer import Trainer


def test_toy_single_turn_pays_for_the_named_word():
    engine = ToyEngine("toy")
    task = load_split("toy", None, "train")[0]
    first = engine.reset(task)
    target = episode_plan("toy", task)[0]
    assert target in first.observation and first.actions == list(WORDS)
    result = engine.step(target)
    assert result.done and result.won and result.score == 1.0
    engine.reset(task)
    wrong = next(w for w in WORDS if w != target)
    result = engine.step(wrong)
    assert result.done and not result.won and result.score == 0.0


def test_toy_multiturn_scores_the_share_of_right_answers():
    engine = ToyEngine("toy-multiturn")
    task = TaskInstance("toy-multiturn", "toy-multiturn", "train-7", 7)
    plan = episode_plan("toy-multiturn", task)
    assert 3 <= len(plan) <= 5
    engine.reset(task)
    for turn, target in enumerate(plan):
        answer = target if turn > 0 else next(w for w in WORDS if w != target)
        result = engine.step(answer)
        assert result.done == (turn == len(plan) - 1)
    assert not result.won and result.score == pytest.approx((len(plan) - 1) / len(plan))


def test_toy_splits_are_disjoint_and_ood_uses_unseen_words():
    train = {t.task_id for t in load_split("toy", None, "train")}
    iid = load_split("toy", None, "iid")
    assert not train & {t.task_id for t in iid}
    ood = load_split("toy", None, "ood")[0]
    assert not set(episode_plan("toy", ood)) & set(WORDS)
    with pytest.raises(ValueError, match="unknown toy split"):
        load_split("toy", None, "l2")


def _learn(env: str, algo: str, max_steps: int, overrides: list[str] | None = None, on_step=None) -> list[float]:
    """Train until the mean reward of the last 3 steps reaches 0.8 (or ``max_steps``);
    ``on_step(trainer, metrics)`` checks each step."""
    spec = resolve_spec(flags={"env": {"name": env}, "algo": {"name": algo}, "train": {"steps": max_steps, "seed": 0}},
                        overrides=overrides)
    trainer = Trainer(spec)
    rewards = []
    try:
        while trainer.step < max_steps:
            metrics, _ = trainer.train_step()
            trainer.step += 1
            rewards.append(metrics["train/reward_mean"])
            assert metrics["train/invalid_action_rate"] == 0.0  # constrained: always a word
            (on_step or _same_policy)(trainer, metrics)
            if len(rewards) >= 3 and sum(rewards[-3:]) / 3 >= 0.8:
                break
    finally:
        trainer.close()
    return rewards


def _same_policy(trainer, metrics) -> None:
    assert metrics["rollout/logprob_diff"] < 1e-5  # sampler and trainer score the same policy


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "ppo+epo", "grpo", "grpo+epo"])
def test_every_algorithm_learns_the_toy(algo):
    rewards = _learn("toy", algo, max_steps=60)
    assert rewards[0] <= 0.5, f"step 0 should be near chance (0.25), got {rewards[0]}"
    assert sum(rewards[-3:]) / 3 >= 0.8, f"{algo}: reward never reached 0.8: {[round(r, 2) for r in rewards]}"


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rloo", "rloo+epo", "reinforce++", "reinforce++ +epo", "gigpo", "gigpo+epo"])
def test_the_toy_is_learnt_with_each_critic_free_estimator_with_and_without_epo(algo):
    rewards = _learn("toy", algo.replace(" ", ""), 60)
    assert rewards[0] <= 0.5
    assert sum(rewards[-3:]) / 3 >= 0.8, f"{algo}: {[round(r, 2) for r in rewards]}"


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo", "gigpo"])
def test_grpo_epo_learns_the_multiturn_toy_from_the_final_reward_only(advantage):
    rewards = _learn("toy-multiturn", "grpo+epo", 80, [f"algo.advantage={advantage}"])
    assert rewards[0] <= 0.5
    assert sum(rewards[-3:]) / 3 >= 0.8, [round(r, 2) for r in rewards]


@pytest.mark.slow
def test_a_bf16_sampler_copy_follows_every_update_and_the_toy_is_still_learnt():
    def follows(trainer, metrics) -> None:
        copy = dict(trainer.sampler.model.named_parameters())
        for name, weight in trainer.learner.policy.named_parameters():
            assert torch.equal(copy[name], weight.detach().to(torch.bfloat16)), name  # synced after the update
        assert 0 < metrics["rollout/logprob_diff"] < 0.05  # bf16 numerics, not stale weights
        assert 0.5 < metrics["actor/tis_weight"] <= 2.0

    rewards = _learn("toy", "grpo+epo", 60, ["rollout.dtype=bfloat16", "algo.tis_cap=2"], follows)
    assert sum(rewards[-3:]) / 3 >= 0.8, [round(r, 2) for r in rewards]


@pytest.mark.slow
def test_dynamic_sampling_updates_on_whole_groups_with_a_signal_and_the_toy_is_still_learnt(monkeypatch):
    from epo_cli.learner import Learner

    batches = []
    learn = Learner.learn
    monkeypatch.setattr(Learner, "learn", lambda self, batch, *args: (batches.append(batch), learn(self, batch, *args))[1])

    def only_signal(trainer, metrics) -> None:
        kept = metrics["rollout/groups_kept"]
        assert 1 <= metrics["rollout/rounds"] <= 3 and kept <= trainer.spec.rollout.tasks_per_step
        if kept == 0:
            assert metrics["actor/optimizer_steps"] == 0
            return
        batch, size = batches[-1], trainer.spec.rollout.group_size
        assert batch.episode_ids.unique().tolist() == list(range(kept * size))
        returns = torch.zeros(kept * size).index_add(0, batch.episode_ids, batch.rewards)
        for group in batch.group_ids.unique():
            members = returns[batch.episode_ids[batch.group_ids == group].unique()]
            assert len(members) == size and members.max() > members.min()  # whole, and not tied
        assert metrics["actor/signal_free_minibatches"] == 0

    rewards = _learn("toy", "grpo", 60, ["algo.filter_groups=true", "algo.filter_max_rounds=3"], only_signal)
    assert sum(rewards[-3:]) / 3 >= 0.8, [round(r, 2) for r in rewards]
