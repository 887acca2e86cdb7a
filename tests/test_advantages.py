import math

import pytest
import torch

from epo_cli.algos.advantages import entropy_shaped_advantages, gae_over_turns, groups_with_signal, grpo_advantages, whiten


def test_gae_with_paper_settings_is_return_minus_value():
    rewards = torch.tensor([0.0, 0.0, 1.0, -0.1, 0.0])
    values = torch.tensor([0.2, 0.5, 0.7, 0.1, 0.3])
    episodes = torch.tensor([0, 0, 0, 1, 1])
    adv, ret = gae_over_turns(rewards, values, episodes, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([0.8, 0.5, 0.3, -0.2, -0.3]))
    assert torch.allclose(ret, torch.tensor([1.0, 1.0, 1.0, -0.1, 0.0]))


def test_gae_discounted_hand_case():
    adv, _ = gae_over_turns(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0, 0, 0]), 0.5, 1.0)
    assert torch.allclose(adv, torch.tensor([0.05, 0.0, 0.3]), atol=1e-6)
    adv, _ = gae_over_turns(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), 1.0, 0.5)
    # delta = (0 + 0 - 0, 1 - 0); A1 = 1, A0 = 0 + 0.5 * 1
    assert torch.allclose(adv, torch.tensor([0.5, 1.0]))


def test_grpo_group_advantages():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    s = 1 / math.sqrt(2)  # (1 - 0.5) / std([1, 0]) with the unbiased std
    assert torch.allclose(adv, torch.tensor([s, -s, 0.0, 0.0]), atol=1e-5)


def test_grpo_group_of_one_or_of_equal_returns_has_zero_advantage():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5]), torch.tensor([0, 1, 1, 2, 2]))
    s = 0.5 / (math.sqrt(0.5) + 1e-6)  # (1 - 0.5) / (unbiased std of (0, 1) + eps)
    assert adv.tolist() == [0.0, pytest.approx(-s), pytest.approx(s), 0.0, 0.0]
    shaped = entropy_shaped_advantages(adv[[0, 3]], torch.tensor([5.0, 5.0]), psi=0.4, kappa=2.0)
    assert shaped.tolist() == [0.0, 0.0]  # EA adds nothing where there is no signal


def test_whiten():
    out = whiten(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(out, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)


def test_entropy_advantage_shaping():
    adv = entropy_shaped_advantages(torch.tensor([1.0, -1.0]), torch.tensor([10.0, 0.1]), psi=0.4, kappa=2.0)
    assert torch.allclose(adv, torch.tensor([1.5, -0.96]))
    entropy = torch.tensor([1.0], requires_grad=True)
    shaped = entropy_shaped_advantages(torch.tensor([5.0]), entropy, 0.4, 2.0)
    assert not shaped.requires_grad
    assert shaped.item() == pytest.approx(5.4)


def test_dynamic_sampling_keeps_exactly_the_groups_with_a_non_zero_advantage():
    # Group 0 ties at 1 (all win), group 1 differs, group 2 ties at a partial score, group 3 has one
    # episode (no baseline to differ from): only group 1 carries a signal.
    returns = torch.tensor([1.0, 1.0, 0.3, 0.7, 0.5, 0.5, 0.9])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    keep = groups_with_signal(returns, groups)
    assert keep.tolist() == [False, False, True, True, False, False, False]
    assert keep.tolist() == (grpo_advantages(returns, groups) != 0).tolist()


def test_the_registered_estimators_by_hand():
    from epo_cli.algos.advantages import TurnRewards, gae_estimator, grpo_estimator
    from epo_cli.spec import AlgoSpec

    # Two episodes of one group (returns 1 and 0), the first of two turns: A = +-1/sqrt(2) on every turn.
    turns = TurnRewards(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0, 0, 1]), torch.tensor([5, 5, 5]),
                        torch.tensor([0.5, 0.25, 0.5]))
    advantages, returns = grpo_estimator(turns, AlgoSpec(name="grpo"))
    assert returns is None and torch.allclose(advantages, torch.tensor([1.0, 1.0, -1.0]) / math.sqrt(2), atol=1e-5)
    advantages, returns = gae_estimator(turns, AlgoSpec(name="ppo", whiten_advantages=False))
    assert torch.allclose(advantages, torch.tensor([0.5, 0.75, -0.5])) and torch.allclose(returns, torch.tensor([1.0, 1.0, 0.0]))


def test_rloo_leaves_the_episode_itself_out_of_its_baseline():
    from epo_cli.algos.advantages import rloo_advantages

    # Group 0: returns 1, 0, 0 -> baselines 0, 0.5, 0.5; group 1: 2, 4 -> baselines 4, 2; group 2 alone: 0.
    advantages = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 3.0]), torch.tensor([0, 0, 0, 1, 1, 2]))
    assert advantages.tolist() == [1.0, -0.5, -0.5, -2.0, 2.0, 0.0]
    # A leaked baseline (the group mean, itself included) would give 2/3, -1/3, -1/3.


def test_reinforce_pp_whitens_each_episodes_return_over_the_batch_once():
    from epo_cli.algos.advantages import TurnRewards, reinforce_pp_estimator
    from epo_cli.spec import AlgoSpec

    # Episode 0 (2 turns) returns 1, episodes 1 and 2 return 0: mean 1/3, std sqrt(1/3) over
    # the three episodes, whatever their turn counts.
    turns = TurnRewards(torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 2]))
    advantages, returns = reinforce_pp_estimator(turns, AlgoSpec(name="grpo"))
    z = (1 - 1 / 3) / math.sqrt(1 / 3)
    assert returns is None and torch.allclose(advantages, torch.tensor([z, z, -z / 2, -z / 2]), atol=1e-5)


def test_gigpo_adds_a_step_advantage_among_turns_that_met_the_same_state():
    from epo_cli.algos.advantages import TurnRewards, gigpo_estimator
    from epo_cli.spec import AlgoSpec

    # Group 0: episode 0 meets states A, B and wins (rewards 0, 1); episode 1 meets A, C and
    # loses. Episode level: +-1/sqrt(2). Discounted by 0.5, A's returns are 0.5 and 0: one
    # anchor state, step advantages +-1/sqrt(2); B and C are met once: 0. Group 1's episode 2
    # also meets A, alone in its group: its own cluster, 0.
    turns = TurnRewards(
        rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]), episode_ids=torch.tensor([0, 0, 1, 1, 2]),
        group_ids=torch.tensor([0, 0, 0, 0, 1]), state_ids=torch.tensor([0, 1, 0, 2, 0]),
    )
    advantages, returns = gigpo_estimator(turns, AlgoSpec(name="grpo", advantage="gigpo", gigpo_gamma=0.5))
    h = 1 / math.sqrt(2)
    assert returns is None and torch.allclose(advantages, torch.tensor([2 * h, h, -2 * h, -h, 0.0]), atol=1e-5)
    # Two different states are never one anchor: B and C merged would give them +-1/sqrt(2).
    half, _ = gigpo_estimator(turns, AlgoSpec(name="grpo", advantage="gigpo", gigpo_gamma=0.5, gigpo_step_weight=0.5))
    assert torch.allclose(half, torch.tensor([1.5 * h, h, -1.5 * h, -h, 0.0]), atol=1e-5)


def test_a_batch_from_episodes_names_each_turns_state_by_its_observation():
    from epo_cli.batch import TurnBatch
    from epo_cli.envs.base import TaskInstance
    from epo_cli.rollout import Episode, Turn

    def turn(index, observation):
        return Turn([1], [2], "", "a", index, [-0.1], observation=observation)

    task = TaskInstance("toy", "toy", "train-0", 0)
    batch = TurnBatch.from_episodes([Episode(task, 0, 0, [turn(0, "room"), turn(1, "hall")]),
                                     Episode(task, 1, 0, [turn(0, "room"), turn(1, "yard")])])
    assert batch.state_ids.tolist() == [0, 1, 0, 2]
