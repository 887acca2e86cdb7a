"""``epo_loss`` (Eq. 6 and its variants) on tiny hand-computed cases."""

import math

import pytest
import torch

from epo_cli.algos.objective import LossInputs, StepCoefficients, epo_loss, step_coefficients
from epo_cli.spec import AlgoSpec, DecaySpec, EntropyAdvantageSpec, EPOSpec, SmoothingSpec, WeightingSpec


def _inputs(advantages, weights, turns=None, entropy_ref=None, ref_logp=None):
    weights = torch.tensor(weights)
    return LossInputs(
        weights=weights,
        advantages=torch.tensor(advantages),
        old_logp=torch.zeros_like(weights),
        turn_index=torch.tensor(turns or [0] * len(advantages)),
        ref_logp=ref_logp,
        entropy_ref=entropy_ref,
    )


def test_eq6_hand_case_value_and_gradients():
    # One token, ratio 1, A = 1: L_MT = -1. H = 2.5 above the corridor [0, 2 * 1.0]:
    # P = 0.25 * 0.5 = 0.125; L = -1 - 0.1 * (2.5 - 2 * 0.125) = -1.225.
    epo = EPOSpec(smoothing=SmoothingSpec(kappa_l=0.0, kappa_r=2.0, alpha=0.25))
    logp = torch.zeros(1, 1, requires_grad=True)
    entropy = torch.full((1, 1), 2.5, requires_grad=True)
    out = epo_loss(_inputs([1.0], [[1.0]], entropy_ref=1.0), logp, entropy, AlgoSpec(), epo, StepCoefficients(0.1, 2.0))
    assert out.loss.item() == pytest.approx(-1.225)
    assert out.metrics["epo/smooth_penalty"].item() == pytest.approx(0.125)
    assert out.metrics["epo/out_of_corridor_frac"].item() == 1.0
    out.loss.backward()
    assert logp.grad.item() == pytest.approx(-1.0)  # d(-r A)/dlogp at r = 1
    assert entropy.grad.item() == pytest.approx(-0.1 * (1 - 2.0 * 0.25))  # the hinge is not detached



def test_the_differentiable_parts_add_up_to_the_loss_and_match_the_hand_case():
    # The hand case above plus a KL reference (kl_coef 0.5, ref_logp = log 0.5: k3 = 0.5 - log 0.5 - 1)
    # and a critic (V = 0.3, old V = 0, R = 1: 0.5 * 0.7^2, vf_coef 0.5).
    epo = EPOSpec(smoothing=SmoothingSpec(kappa_l=0.0, kappa_r=2.0, alpha=0.25))
    logp = torch.zeros(1, 1, requires_grad=True)
    entropy = torch.full((1, 1), 2.5, requires_grad=True)
    inputs = LossInputs(torch.ones(1, 1), torch.ones(1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long),
                        ref_logp=torch.full((1, 1), math.log(0.5)), entropy_ref=1.0, old_values=torch.zeros(1), returns=torch.ones(1))
    out = epo_loss(inputs, logp, entropy, AlgoSpec(kl_coef=0.5, vf_coef=0.5), epo, StepCoefficients(0.1, 2.0), torch.full((1,), 0.3))
    assert torch.equal(out.pg + out.entropy_bonus + out.smoothing + out.value, out.loss)
    kl = 0.5 - math.log(0.5) - 1
    assert out.pg.item() == pytest.approx(-1.0 + 0.5 * kl)  # L_MT's policy part: -r A + kl_coef KL
    assert out.entropy_bonus.item() == pytest.approx(-0.1 * 2.5)  # -lambda L_H
    assert out.smoothing.item() == pytest.approx(0.1 * 2.0 * 0.125)  # +lambda beta_k L_smooth
    assert out.value.item() == pytest.approx(0.5 * 0.5 * 0.7**2)
    # Each part differentiates on its own (the learner's tracking.term_grad_norms).
    assert torch.autograd.grad(out.pg, logp, retain_graph=True)[0].item() == pytest.approx(-1.0 + 0.5 * (1 - 0.5))
    assert torch.autograd.grad(out.entropy_bonus, entropy, retain_graph=True)[0].item() == pytest.approx(-0.1)
    assert torch.autograd.grad(out.smoothing, entropy)[0].item() == pytest.approx(0.1 * 2.0 * 0.25)

def test_truncated_importance_weights_correct_the_surrogate_for_the_sampler():
    # Ratio 1 on both tokens, A = 1. The trainer gives them 0.5 and 0.25; the sampler drew them
    # at 0.25 (weight 2, cut to the cap 1.5) and 0.5 (weight 0.5): L = -(0.5 * 1.5 + 0.5 * 0.5).
    old = torch.log(torch.tensor([[0.5, 0.25]]))
    logp = old.clone().requires_grad_(True)
    inputs = LossInputs(torch.tensor([[0.5, 0.5]]), torch.ones(1), old, torch.zeros(1, dtype=torch.long),
                        sample_logp=torch.log(torch.tensor([[0.25, 0.5]])))
    algo = AlgoSpec(tis_cap=1.5)
    out = epo_loss(inputs, logp, torch.zeros(1, 2), algo, EPOSpec(), StepCoefficients(0.0, 1.0))
    assert out.pg.item() == pytest.approx(-(0.5 * 1.5 + 0.5 * 0.5))
    assert out.metrics["actor/tis_weight"].item() == pytest.approx(0.5 * 1.5 + 0.5 * 0.5)
    assert out.metrics["actor/tis_truncated_frac"].item() == pytest.approx(0.5)
    assert out.metrics["actor/clipfrac"].item() == 0.0 and out.metrics["actor/approx_kl"].item() == 0.0  # stats unweighted
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.5 * 1.5, -0.5 * 0.5])  # the weights carry no gradient
    plain = epo_loss(inputs, old.clone().requires_grad_(True), torch.zeros(1, 2), AlgoSpec(), EPOSpec(), StepCoefficients(0.0, 1.0))
    assert plain.pg.item() == pytest.approx(-1.0) and "actor/tis_weight" not in plain.metrics  # tis_cap null: off


def test_no_history_gives_the_entropy_regularized_loss():
    entropy = torch.full((1, 1), 2.5)
    out = epo_loss(_inputs([1.0], [[1.0]]), torch.zeros(1, 1), entropy, AlgoSpec(), EPOSpec(), StepCoefficients(0.1, 2.0))
    assert out.loss.item() == pytest.approx(-1.0 - 0.1 * 2.5)  # Eq. 2's L_ER at step 0
    assert "epo/smooth_penalty" not in out.metrics and out.smoothing is None


def test_step_coefficients_read_step_k_of_K():
    epo = EPOSpec(entropy_coef=0.2)
    assert step_coefficients(epo, 0, 10) == StepCoefficients(0.2, 2.0)
    assert step_coefficients(epo, 5, 10).beta == pytest.approx(1 + math.exp(-3.0))  # k = k_mid
    assert step_coefficients(EPOSpec(weighting=WeightingSpec(dynamic=False, constant_beta=1.0)), 5, 10).beta == 1.0
    decay = EPOSpec(entropy_coef=0.2, decay=DecaySpec(step_schedule="linear"))
    assert step_coefficients(decay, 5, 10).entropy_coef == pytest.approx(0.1)


def test_decay_variant_weights_later_turns_less():
    # lambda_k = 0.2 * (1 - 5/10) = 0.1; turns 0 and 2 with d = 0.5: lambda_t = 0.1, 0.025.
    epo = EPOSpec(entropy_coef=0.2, smoothing=SmoothingSpec(enabled=False), decay=DecaySpec(turn_decay=0.5, step_schedule="linear"))
    coefs = step_coefficients(epo, 5, 10)
    entropy = torch.ones(2, 1, requires_grad=True)
    loss = epo_loss(_inputs([0.0, 0.0], [[0.5], [0.5]], turns=[0, 2]), torch.zeros(2, 1), entropy, AlgoSpec(), epo, coefs).loss
    assert loss.item() == pytest.approx(-(0.1 * 0.5 + 0.025 * 0.5))
    loss.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.05], [-0.0125]]))


def test_ea_variant_shapes_advantages_with_detached_entropy():
    # A' = A + min(psi H, |A| / kappa): 1 + min(0.4 * 10, 0.5) = 1.5; with A = 0 (a GRPO group
    # whose episodes all scored the same, or a group of one) A' stays 0.
    epo = EPOSpec(entropy_coef=0.0, smoothing=SmoothingSpec(enabled=False), entropy_advantage=EntropyAdvantageSpec(enabled=True))
    entropy = torch.full((2, 1), 10.0, requires_grad=True)
    logp = torch.zeros(2, 1, requires_grad=True)
    loss = epo_loss(_inputs([1.0, 0.0], [[0.5], [0.5]]), logp, entropy, AlgoSpec(), epo, StepCoefficients(0.0, 1.0)).loss
    assert loss.item() == pytest.approx(-1.5 * 0.5)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.75], [0.0]]))
    assert entropy.grad is None or torch.equal(entropy.grad, torch.zeros(2, 1))


def test_dual_clip_is_on_by_default_and_reaches_the_loss():
    assert AlgoSpec().dual_clip_c == 3.0
    logp = torch.full((1, 1), math.log(4.0))
    on = epo_loss(_inputs([-1.0], [[1.0]]), logp, torch.zeros(1, 1), AlgoSpec(), EPOSpec(), StepCoefficients(0.0, 1.0))
    off = epo_loss(_inputs([-1.0], [[1.0]]), logp, torch.zeros(1, 1), AlgoSpec(dual_clip_c=None), EPOSpec(), StepCoefficients(0.0, 1.0))
    assert (on.loss.item(), off.loss.item()) == (pytest.approx(3.0), pytest.approx(4.0))
    assert on.metrics["actor/dual_clipfrac"].item() == 1.0


def test_kl_term_enters_the_loss_with_kl_coef():
    ref = torch.full((1, 1), math.log(0.5))
    inputs = _inputs([0.0], [[1.0]], ref_logp=ref)
    out = epo_loss(inputs, torch.zeros(1, 1), torch.zeros(1, 1), AlgoSpec(kl_coef=0.5), EPOSpec(), StepCoefficients(0.0, 1.0))
    assert out.metrics["actor/kl_ref"].item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert out.loss.item() == pytest.approx(0.5 * (0.5 - math.log(0.5) - 1))


def test_the_surrogate_of_positive_and_negative_advantages_is_logged_apart():
    # One GRPO group of two one-token episodes, A = +1 and -1, ratio 1, weight 1/2 each:
    # the loss cancels to 0, its two parts do not (-1/2 and +1/2); without signal both are 0.
    old = torch.log(torch.tensor([[0.5], [0.25]]))
    for advantages, parts in ((torch.tensor([1.0, -1.0]), (-0.5, 0.5)), (torch.zeros(2), (0.0, 0.0))):
        inputs = LossInputs(torch.full((2, 1), 0.5), advantages, old, torch.zeros(2, dtype=torch.long))
        out = epo_loss(inputs, old.clone(), torch.zeros(2, 1), AlgoSpec(), EPOSpec(), StepCoefficients(0.0, 1.0))
        assert out.metrics["actor/pg_loss"].item() == pytest.approx(0.0)
        assert (out.metrics["actor/pg_loss_pos_adv"].item(), out.metrics["actor/pg_loss_neg_adv"].item()) == pytest.approx(parts)
