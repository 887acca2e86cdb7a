import math

import pytest
import torch
from reference_formulas import dual_clip_token_loss, k3_token_kl

from epo_cli.algos.entropy import entropy_from_logits, logprobs_and_entropy
from epo_cli.algos.losses import (
    beta_schedule,
    entropy_coef_schedule,
    entropy_corridor_penalty,
    low_var_kl,
    ppo_clip_loss,
    token_weights,
    trajectory_entropy,
    turn_decay_coef,
    value_loss,
)
from epo_cli.algos.objective import LossInputs, StepCoefficients, epo_loss
from epo_cli.spec import AlgoSpec, EPOSpec, SmoothingSpec

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
EPISODES = torch.tensor([0, 0, 1])


def test_traj_mean_weights_follow_eq2_nesting():
    # Episode 0 has two turns (2 and 1 tokens), episode 1 one turn of 3 tokens.
    w = token_weights(MASK, EPISODES, "traj-mean")
    expected = torch.tensor([[1 / 8, 1 / 8, 0.0], [1 / 4, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]])
    assert torch.allclose(w, expected)
    assert w.sum().item() == pytest.approx(1.0)


def test_token_mean_weights_are_flat():
    w = token_weights(MASK, EPISODES, "token-mean")
    assert torch.allclose(w, MASK / 6)


def test_traj_mean_differs_from_token_mean_on_uneven_turns():
    x = torch.tensor([[1.0, 1.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    traj = (x * token_weights(MASK, EPISODES, "traj-mean")).sum()
    flat = (x * token_weights(MASK, EPISODES, "token-mean")).sum()
    # traj: episode 0 = mean(1, 4) = 2.5, episode 1 = 0 -> 1.25; flat: 6 / 6 = 1.
    assert traj.item() == pytest.approx(1.25)
    assert flat.item() == pytest.approx(1.0)


def test_ppo_clip_loss_hand_case():
    logp = torch.tensor([[math.log(1.5)], [math.log(1.5)]])
    old = torch.zeros(2, 1)
    adv = torch.tensor([[1.0], [-1.0]])
    w = torch.tensor([[0.5], [0.5]])
    loss, stats = ppo_clip_loss(logp, old, adv, w, 0.2, 0.2)
    # A=+1: min(1.5, 1.2) = 1.2; A=-1: min(-1.5, -1.2) = -1.5 -> loss = -(0.6 - 0.75)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_ppo_clip_asymmetric_bounds():
    logp = torch.tensor([[math.log(1.5)]])
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.28)


def test_value_loss_clipped_hand_case():
    loss = value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([1.0]), clip=0.5)
    # unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 0.5 * 2.25
    assert loss.item() == pytest.approx(1.125)


def test_corridor_penalty_hinge_and_indicator():
    h = torch.tensor([0.5, 1.0, 3.0])
    hinge = entropy_corridor_penalty(h, 1.0, kappa_l=0.6, kappa_r=2.0, alpha=0.1, form="hinge")
    assert torch.allclose(hinge, torch.tensor([0.01, 0.0, 0.1]))
    indicator = entropy_corridor_penalty(h, 1.0, kappa_l=0.6, kappa_r=2.0, alpha=0.1, form="indicator")
    assert torch.allclose(indicator, torch.tensor([0.1, 0.0, 0.1]))


def test_beta_schedule_eq5():
    assert beta_schedule(0, 125, 3.0) == pytest.approx(2.0)
    assert beta_schedule(62, 125, 3.0) == pytest.approx(1 + math.exp(-3.0))
    assert beta_schedule(124, 125, 3.0) == pytest.approx(1 + math.exp(-3.0 * 124 / 62))
    values = [beta_schedule(k, 10) for k in range(10)]
    assert values == sorted(values, reverse=True)


def test_entropy_from_logits_hand_values():
    assert entropy_from_logits(torch.zeros(8)).item() == pytest.approx(math.log(8))
    two = torch.tensor([0.0, math.log(3.0)])  # p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(two).item() == pytest.approx(expected)


@pytest.mark.parametrize("chunk,compiled", [(1, False), (3, False), (1000, False), (3, True)])
def test_chunked_logprobs_match_full_computation(chunk, compiled):
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    logp, ent = logprobs_and_entropy(hidden, weight, targets, temperature=0.7, chunk_tokens=chunk, compiled=compiled)
    logits = hidden @ weight.T / 0.7
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(logp, ref_logp, atol=1e-6)
    assert torch.allclose(ent, entropy_from_logits(logits), atol=1e-6)
    (logp.sum() + ent.sum()).backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (ref_logp.sum() + entropy_from_logits(logits).sum()).backward()
    assert torch.allclose(g_hidden, hidden.grad, atol=1e-5)
    assert torch.allclose(g_weight, weight.grad, atol=1e-5)


def _objective_grad(form):
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]], requires_grad=True)
    entropy = entropy_from_logits(logits)[None]
    # Corridor [0.9 * 1.0, 1.2 * 1.0]: token 0 (H~0.4) is below it, token 1 (H~1.38) above.
    smoothing = SmoothingSpec(enabled=form is not None, form=form or "hinge", kappa_l=0.9, kappa_r=1.2, alpha=0.1)
    inputs = LossInputs(torch.tensor([[0.5, 0.5]]), torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), entropy_ref=1.0)
    loss = epo_loss(inputs, torch.zeros(1, 2), entropy, AlgoSpec(), EPOSpec(smoothing=smoothing), StepCoefficients(0.5, 2.0)).loss
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_hinge_changes_the_gradient_and_indicator_does_not():
    base = _objective_grad(None)
    hinge = _objective_grad("hinge")
    indicator = _objective_grad("indicator")
    assert torch.equal(indicator, base)  # the released code's form: no gradient at all
    assert not torch.allclose(hinge, base)
    # The hinge pushes each token's entropy back toward the corridor: it raises the low
    # entropy token's and lowers the high one's, i.e. it opposes the bonus above kappa_r.
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]], requires_grad=True)
    (g_h,) = torch.autograd.grad(entropy_from_logits(logits).sum(), logits)
    delta = hinge - base
    assert (delta[0] * g_h[0]).sum() < 0  # descending the loss increases H of token 0
    assert (delta[1] * g_h[1]).sum() > 0  # and decreases H of token 1


def test_trajectory_entropy_and_kl():
    h = torch.tensor([[1.0, 3.0]])
    assert trajectory_entropy(h, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(2.0)
    logp = torch.tensor([[-1.0, -2.0]])
    assert low_var_kl(logp, logp, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.0)
    kl = low_var_kl(torch.tensor([[0.0]]), torch.tensor([[math.log(0.5)]]), torch.ones(1, 1))
    assert kl.item() == pytest.approx(0.5 - math.log(0.5) - 1)


def test_decay_schedules():
    assert torch.allclose(turn_decay_coef(0.1, torch.tensor([0, 1, 2]), 0.5), torch.tensor([0.1, 0.05, 0.025]))
    assert torch.allclose(turn_decay_coef(0.1, torch.tensor([0, 3]), None), torch.tensor([0.1, 0.1]))
    assert entropy_coef_schedule(0.2, 5, 10, "linear") == pytest.approx(0.1)
    assert entropy_coef_schedule(0.2, 5, 10, "exponential", rate=2.0) == pytest.approx(0.2 * math.exp(-1.0))
    assert entropy_coef_schedule(0.2, 5, 10, "none") == 0.2


def test_dual_clip_caps_negative_advantage_tokens():
    # r = 4 and r = 2, both with A = -1, eps = 0.2, c = 3: max(4, 1.2) = 4 is capped at 3;
    # max(2, 1.2) = 2 is below the cap. A = +1, r = 4: max(-4, -1.2) = -1.2, never capped.
    logp = torch.tensor([[math.log(4.0)], [math.log(2.0)], [math.log(4.0)]], requires_grad=True)
    adv = torch.tensor([[-1.0], [-1.0], [1.0]])
    w = torch.full((3, 1), 1 / 3)
    loss, stats = ppo_clip_loss(logp, torch.zeros(3, 1), adv, w, 0.2, 0.2, dual_clip_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)  # the A = +1 token
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, torch.tensor([[0.0], [2.0 / 3], [0.0]]))  # capped and clipped tokens: no gradient
    off, _ = ppo_clip_loss(logp, torch.zeros(3, 1), adv, w, 0.2, 0.2, dual_clip_c=None)
    assert off.item() == pytest.approx((4.0 + 2.0 - 1.2) / 3)


def test_k3_kl_is_clamped_after_it_is_computed():
    logp = torch.zeros(1, 5)
    ref = torch.tensor([[math.log(0.5), 3.0, -5.0, -15.0, 25.0]])
    per_token = [low_var_kl(logp[:, i : i + 1], ref[:, i : i + 1], torch.ones(1, 1)).item() for i in range(5)]
    # 0.5 - ln 0.5 - 1; e^3 - 4 = 16.1 -> 10; e^-5 + 4; e^-15 + 14 -> 10; log-ratio 20 -> 10.
    expected = [0.5 - math.log(0.5) - 1, 10.0, math.exp(-5) + 4, 10.0, 10.0]
    assert per_token == pytest.approx(expected)


def test_parity_with_the_reference_formulas_on_random_tokens():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(6, 7, generator=g, dtype=torch.float64) * 1.5  # ratios from ~0.01 to ~100
    ref = logp + torch.randn(6, 7, generator=g, dtype=torch.float64) * 8  # k3 beyond the clamp
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64).expand(6, 7)
    w = torch.rand(6, 7, generator=g, dtype=torch.float64)
    w = w / w.sum()
    loss, _ = ppo_clip_loss(logp, old, adv, w, 0.2, 0.28, dual_clip_c=3.0)
    kl = low_var_kl(logp, ref, w)
    cells = [(i, j) for i in range(6) for j in range(7)]
    expected_loss = sum(float(w[i, j]) * dual_clip_token_loss(float(logp[i, j]), float(old[i, j]), float(adv[i, j]), 0.2, 0.28, 3.0) for i, j in cells)
    expected_kl = sum(float(w[i, j]) * k3_token_kl(float(logp[i, j]), float(ref[i, j])) for i, j in cells)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-12)
    ratios = (logp - old).exp()
    assert bool(((adv < 0) & (ratios > 3)).any()) and bool((ref - logp > 3).any())  # both clamps exercised
