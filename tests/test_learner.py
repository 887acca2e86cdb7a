"""How the learner wires the objective: checked on gradients of the tiny model, against
losses written out by hand from the batch."""

import math

import pytest
import torch

from epo_cli.algos.losses import beta_schedule
from epo_cli.batch import TurnBatch, collate
from epo_cli.distributed import DistContext
from epo_cli.entropy_record import EntropyRecord
from epo_cli.forward import forward_turns
from epo_cli.learner import NO_UPDATE_ZEROS, Learner
from epo_cli.spec import resolve_spec

STEPS = 10
KAPPA_R, ALPHA, LAMBDA = 2.0, 0.25, 0.5
# (episode, group, turn, prompt length, response length, reward); episodes 0-1 and 2-3
# play one task each. Episode 0 wins, 1 loses (A = +-1/sqrt(2)), 2 and 3 both win (A = 0).
TURNS = [(0, 0, 0, 5, 3, 0.0), (0, 0, 1, 7, 2, 1.0), (1, 0, 0, 4, 4, 0.0), (2, 1, 0, 6, 1, 0.0), (2, 1, 1, 5, 3, 0.0),
         (2, 1, 2, 3, 2, 1.0), (3, 1, 0, 8, 5, 1.0)]


def _learner(*overrides: str) -> Learner:
    # TIS off (the CPU scale sets it with a bf16 sampler): the batches' sample log-probs are placeholders;
    # fp32 (the CPU scale's bf16 autocast would blur the hand-computed gradients).
    spec = resolve_spec(None, {"algo": {"name": "grpo+epo"}, "model": {"name": "tiny"}}, [
        "scale=cpu", "algo.tis_cap=null", "model.autocast=none", f"train.steps={STEPS}", "optim.mini_batch_size=16", "optim.micro_batch_size=3",
        f"epo.entropy_coef={LAMBDA}", f"epo.smoothing.alpha={ALPHA}", f"epo.smoothing.kappa_r={KAPPA_R}", *overrides,
    ])
    return Learner(spec, pad_id=0)


def _batch(rewards_of=None) -> TurnBatch:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (p,), generator=g).tolist() for _, _, _, p, _, _ in TURNS]
    responses = [torch.randint(3, 500, (r,), generator=g).tolist() for _, _, _, _, r, _ in TURNS]
    column = lambda i, dtype=torch.long: torch.tensor([t[i] for t in TURNS], dtype=dtype)  # noqa: E731
    rewards = column(5, torch.float32) if rewards_of is None else torch.tensor(rewards_of)
    return TurnBatch(prompts, responses, column(0), column(1), column(2), rewards, [torch.zeros(len(r)) for r in responses])


def _hand_weights(batch: TurnBatch) -> torch.Tensor:
    """Eq. 2 by hand: 1 / (episodes x turns of the episode x tokens of the turn)."""
    width = max(len(r) for r in batch.response_ids)
    weights = torch.zeros(len(batch), width)
    turns_of = {e: sum(1 for t in TURNS if t[0] == e) for e, *_ in TURNS}
    for row, (episode, _, _, _, length, _) in enumerate(TURNS):
        weights[row, :length] = 1.0 / (len(turns_of) * turns_of[episode] * length)
    return weights


def _learner_gradient(learner: Learner, batch: TurnBatch, step: int, record_gradients) -> dict[str, torch.Tensor]:
    """The policy gradient the learner steps with (the optimizer step is replaced)."""
    grads = record_gradients(learner, learner.policy)
    learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), step)
    assert len(grads) == 1  # one mini-batch
    return grads[0]


def _hand_gradient(learner: Learner, batch: TurnBatch, loss_of) -> dict[str, torch.Tensor]:
    """The gradient of ``loss_of(logp, entropy)`` over the whole batch in one forward."""
    learner.policy.zero_grad(set_to_none=True)
    micro = collate(batch, list(range(len(batch))), 0)
    out = forward_turns(learner.policy, micro, learner.spec.rollout.temperature)
    loss_of(out.logp, out.entropy).backward()
    grads = {name: p.grad.clone() for name, p in learner.policy.named_parameters()}
    learner.policy.zero_grad(set_to_none=True)
    return grads


def _close(a: dict, b: dict) -> bool:
    """Every parameter's gradient equal up to float rounding (micro-batches vs one pass)."""
    return all(float((a[n] - b[n]).norm()) <= 1e-4 * float(b[n].norm()) for n in a)


def test_entropy_terms_use_beta_k_of_step_k_and_an_undetached_penalty(record_gradients, monkeypatch):
    # Equal rewards in each group: A = 0, so the gradient is the entropy terms' alone (with
    # optim.skip_signal_free off: by default such a mini-batch takes no step at all).
    batch = _batch([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    learner = _learner("optim.skip_signal_free=false")
    learner.history.append(0.1, {})  # Hbar_W = 0.1: every token is above kappa_r * Hbar = 0.2
    step = 3
    got = _learner_gradient(learner, batch, step, record_gradients)
    w = _hand_weights(batch)

    def entropy_loss(beta, detached_penalty=False):
        def loss_of(logp, entropy):
            h = entropy.detach() if detached_penalty else entropy
            penalty = ALPHA * torch.relu(h - KAPPA_R * 0.1)
            return -LAMBDA * ((entropy - beta * penalty) * w).sum()
        return loss_of

    beta_k = 1 + math.exp(-3.0 * step / (STEPS // 2))
    assert beta_k == pytest.approx(beta_schedule(step, STEPS))
    assert _close(got, _hand_gradient(learner, batch, entropy_loss(beta_k)))
    assert not _close(got, _hand_gradient(learner, batch, entropy_loss(beta_schedule(step + 1, STEPS))))
    assert not _close(got, _hand_gradient(learner, batch, entropy_loss(beta_k, detached_penalty=True)))


def test_advantages_and_eq2_token_weights_reach_the_gradient(record_gradients, monkeypatch):
    batch = _batch()
    learner = _learner("epo.smoothing.enabled=false")
    got = _learner_gradient(learner, batch, 0, record_gradients)
    s = 1 / math.sqrt(2)
    advantages = torch.tensor([s, s, -s, 0.0, 0.0, 0.0, 0.0])[:, None]

    def loss_of(weights):
        # Ratio 1 (one mini-batch, old = current): d(-r A) = -A dlogp; plus -lambda L_H.
        return lambda logp, entropy: -(advantages * torch.exp(logp - logp.detach()) * weights).sum() - LAMBDA * (entropy * weights).sum()

    assert _close(got, _hand_gradient(learner, batch, loss_of(_hand_weights(batch))))
    flat = _hand_weights(batch).gt(0).float()
    assert not _close(got, _hand_gradient(learner, batch, loss_of(flat / flat.sum())))  # token-mean differs


def test_under_bf16_autocast_only_the_forward_is_autocast(record_gradients, monkeypatch):
    """``model.autocast: bf16``: the backbone's forward in bf16; the heads, the loss and the
    backward in fp32 (a backward under autocast would run the LM head's gradient in bf16)."""
    from epo_cli.precision import autocast_context

    batch = _batch()
    learner = _learner("epo.smoothing.enabled=false", "model.autocast=bf16", "optim.micro_batch_size=7")
    got = _learner_gradient(learner, batch, 0, record_gradients)
    s = 1 / math.sqrt(2)
    advantages = torch.tensor([s, s, -s, 0.0, 0.0, 0.0, 0.0])[:, None]
    weights = _hand_weights(batch)

    def gradient(backward_under_autocast: bool) -> dict[str, torch.Tensor]:
        learner.policy.zero_grad(set_to_none=True)
        micro = collate(batch, list(range(len(batch))), 0)
        with autocast_context("bf16", learner.policy):
            out = forward_turns(learner.policy, micro, learner.spec.rollout.temperature)
            loss = -(advantages * torch.exp(out.logp - out.logp.detach()) * weights).sum() - LAMBDA * (out.entropy * weights).sum()
            if backward_under_autocast:
                loss.backward()
        if not backward_under_autocast:
            loss.backward()
        return {name: p.grad.clone() for name, p in learner.policy.named_parameters()}

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[n] - b[n]).norm()) for n in a) / sum(float(b[n].norm()) for n in b)

    fp32_backward, bf16_backward = gradient(False), gradient(True)
    # With native bf16 kernels (AVX512-BF16) the learner's gradient is the fp32 backward's to
    # 1e-4; where bf16 is emulated (AVX2) its forward rounds differently from this one's
    # (1.2e-3 away), still 4x nearer to the fp32 backward than to the bf16 one (4.6e-3).
    assert distance(got, fp32_backward) < distance(got, bf16_backward) / 2


def _hand_entropy_record(learner: Learner, batch: TurnBatch) -> tuple[float, dict[int, float]]:
    """Hbar of the batch by hand under the learner's current policy: Eq. 2 weights over the
    whole batch; and the mean token entropy per turn index."""
    with torch.no_grad():
        micro = collate(batch, list(range(len(batch))), 0)
        entropy = forward_turns(learner.policy, micro, learner.spec.rollout.temperature).entropy
    lengths = [len(r) for r in batch.response_ids]
    turn_means: dict[int, list[float]] = {}
    for row, (_, _, turn, *_) in enumerate(TURNS):
        turn_means.setdefault(turn, []).append(float(entropy[row, : lengths[row]].mean()))
    return float((entropy * _hand_weights(batch)).sum()), {t: sum(v) / len(v) for t, v in turn_means.items()}


@pytest.mark.parametrize("mini_batch", [16, 3])
def test_entropy_history_records_the_pre_update_policy_over_the_whole_batch(mini_batch):
    # mini_batch 3: three optimizer steps within the RL step; the record still comes from
    # the policy before the first one (the old-log-prob pass), weighted over all 7 rows.
    batch = _batch()
    learner = _learner(f"optim.mini_batch_size={mini_batch}", "optim.micro_batch_size=2", "optim.lr=0.05", "optim.warmup_ratio=0")
    before, turns_before = _hand_entropy_record(learner, batch)
    metrics = learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    assert learner.history.step_means == [pytest.approx(before, rel=1e-5)]
    assert metrics["actor/entropy"] == pytest.approx(before, rel=1e-5)
    assert learner.history.turn_means[0] == pytest.approx(turns_before, rel=1e-5)
    after, _ = _hand_entropy_record(learner, batch)
    assert abs(after - before) > 1e-4 * before  # the updates moved the policy: the record is not after them


def _measured_rows(learner: Learner, monkeypatch) -> list[list[int]]:
    """The rows of each micro-batch the learner measures the term norms on, as it runs."""
    measured, micro_step = [], learner._micro_step

    def recording(batch, micro, *args):
        if args[-1]:  # measure_terms, the last positional argument
            measured.append(list(micro.rows))
        return micro_step(batch, micro, *args)

    monkeypatch.setattr(learner, "_micro_step", recording)
    return measured


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.stack([g.norm() for g in grads.values()]).norm())


# Episode 3 loses: both groups have a policy-gradient signal, A = +-1/sqrt(2) for every row.
SIGNAL_REWARDS = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_term_grad_norms_are_those_of_the_measured_micro_batch_and_leave_the_update_unchanged(monkeypatch):
    batch, step = _batch(SIGNAL_REWARDS), 3
    learners = {
        on: _learner(f"tracking.term_grad_norms={str(on).lower()}", "optim.warmup_ratio=0") for on in (False, True)
    }
    metrics = {}
    measured = _measured_rows(learners[True], monkeypatch)
    for on, learner in learners.items():
        learner.history.append(0.1, {})  # Hbar_W = 0.1: every token is above the corridor, smoothing acts
        metrics[on] = learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), step)
    start = _learner()
    for (name, off), on in zip(learners[False].policy.named_parameters(), learners[True].policy.parameters()):
        assert torch.equal(off, on), name
    assert any(not torch.equal(a, b) for a, b in zip(start.policy.parameters(), learners[True].policy.parameters()))
    assert not any(key.startswith("grad/") for key in metrics[False])
    assert len(measured) == 1  # one mini-batch, one of its micro-batches

    # The three terms by hand on that micro-batch (Eq. 2 weights of the other rows zeroed),
    # under the same start policy: ratio 1, so d(-r A) = -A dlogp.
    w = _hand_weights(batch) * torch.isin(torch.arange(len(batch)), torch.tensor(measured[0]))[:, None]
    s = 1 / math.sqrt(2)
    advantages = torch.tensor([s, s, -s, s, s, s, -s])[:, None]
    beta_k = beta_schedule(step, STEPS)
    hand = {
        "pg": lambda logp, entropy: -(advantages * torch.exp(logp - logp.detach()) * w).sum(),
        "entropy_bonus": lambda logp, entropy: -LAMBDA * (entropy * w).sum(),
        "smooth": lambda logp, entropy: LAMBDA * beta_k * (ALPHA * torch.relu(entropy - KAPPA_R * 0.1) * w).sum(),
    }
    got = metrics[True]
    norms = {name: _norm(_hand_gradient(start, batch, loss_of)) for name, loss_of in hand.items()}
    for name, norm in norms.items():
        assert norm > 0 and got[f"grad/{name}_norm"] == pytest.approx(norm, rel=1e-4), name
    for name in ("entropy_bonus", "smooth"):
        assert got[f"grad/{name}_ratio"] == pytest.approx(got[f"grad/{name}_norm"] / got["grad/pg_norm"], rel=1e-12)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_the_policy_and_the_critic_are_clipped_apart(critic, monkeypatch):
    """A large value-head gradient must not scale the policy's gradient (one clip over both did)."""
    from types import SimpleNamespace

    learner = _learner("algo.name=ppo", f"model.critic={critic}", "optim.max_grad_norm=1.0")
    critic_params = dict(learner.clip_groups)["critic"]
    assert {id(p) for p in critic_params} == {
        id(p) for p in (learner.value_head.parameters() if critic == "shared" else learner.critic.parameters())}
    for optimizer in learner.optimizers:
        monkeypatch.setattr(optimizer, "step", lambda: None)
    policy = [p for p in learner.policy.parameters() if p.requires_grad]
    for p in policy:
        p.grad = torch.full_like(p, 0.5 / sum(q.numel() for q in policy) ** 0.5)  # norm 0.5
    for p in critic_params:
        p.grad = torch.full_like(p, 10.0 / sum(q.numel() for q in critic_params) ** 0.5)  # norm 10
    logged = {}
    learner.optimizer_step(SimpleNamespace(add=lambda name, value: logged.setdefault(name, float(value))))
    assert logged == {"actor/grad_norm": pytest.approx(0.5, rel=1e-2), "critic/grad_norm": pytest.approx(10.0, rel=1e-2)}
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in policy])) == pytest.approx(0.5, rel=1e-2)  # not 0.05: one clip over both
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in critic_params])) == pytest.approx(1.0, rel=1e-2)


def test_term_grad_norms_without_entropy_bonus_or_policy_gradient_signal():
    # epo.entropy_coef = 0 (no EPO): the bonus, and the smoothing it scales, move nothing.
    learner = _learner("tracking.term_grad_norms=true", "epo.entropy_coef=0")
    learner.history.append(0.1, {})
    got = learner.learn(_batch(SIGNAL_REWARDS), torch.zeros(len(TURNS), dtype=torch.long), 3)
    assert got["grad/pg_norm"] > 0
    assert got["grad/entropy_bonus_norm"] == got["grad/smooth_norm"] == 0.0
    assert got["grad/entropy_bonus_ratio"] == got["grad/smooth_ratio"] == 0.0
    # Equal rewards in each group: A = 0 and no policy gradient; the ratios are left out, not inf.
    learner = _learner("tracking.term_grad_norms=true", "optim.skip_signal_free=false")
    got = learner.learn(_batch([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]), torch.zeros(len(TURNS), dtype=torch.long), 0)
    assert got["grad/pg_norm"] == 0.0 and got["grad/entropy_bonus_norm"] > 0 and got["grad/smooth_norm"] == 0.0
    assert "grad/entropy_bonus_ratio" not in got and "grad/smooth_ratio" not in got


def _recorded_weights(learner: Learner, monkeypatch) -> list[tuple[list[int], torch.Tensor]]:
    """The (rows, loss weights) of every micro-batch the learner updates on, as it runs."""
    recorded, micro_step = [], learner._micro_step

    def recording(batch, micro, w, *args):
        recorded.append((list(micro.rows), w.detach().cpu().clone()))
        return micro_step(batch, micro, w, *args)

    monkeypatch.setattr(learner, "_micro_step", recording)
    return recorded


def test_an_episode_cut_across_mini_batches_weighs_what_a_whole_one_does(monkeypatch):
    # Mini-batches of 3 turn samples cut the 4 episodes (2, 1, 3, 1 turns) into 3 optimizer
    # steps. Each episode's turns weigh 1/4 of the step in all (Eq. 2 over the batch), times
    # the 3 mini-batches that keep each mini-batch's loss a mean: 3/4 per episode.
    batch = _batch(SIGNAL_REWARDS)
    learner = _learner("optim.mini_batch_size=3", "optim.micro_batch_size=2", "optim.warmup_ratio=0")
    recorded = _recorded_weights(learner, monkeypatch)
    learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    per_episode = torch.zeros(4)
    per_row = torch.zeros(len(batch))
    for rows, w in recorded:
        for i, row in enumerate(rows):
            per_row[row] += w[i].sum()
    for row, (episode, *_) in enumerate(TURNS):
        per_episode[episode] += per_row[row]
    assert per_episode.tolist() == pytest.approx([3 / 4] * 4)
    assert per_row.tolist() == pytest.approx((3 * _hand_weights(batch).sum(-1)).tolist())  # 1 / (E x turns)


def test_a_mini_batch_without_signal_takes_no_step_and_still_records_the_entropy():
    # Equal rewards in each group: every advantage is 0. The policy, AdamW's state and the
    # weights (no weight decay step) stay as they were; Hbar still gets the step's entropy.
    batch = _batch([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    learner = _learner("optim.warmup_ratio=0", "optim.lr=0.05")
    start = [p.detach().clone() for p in learner.policy.parameters()]
    entropy, _ = _hand_entropy_record(learner, batch)
    metrics = learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    assert all(torch.equal(a, b) for a, b in zip(start, learner.policy.parameters()))
    assert all(not state for state in learner.optimizers[0].state.values())
    assert metrics["actor/signal_free_minibatches"] == 1 and metrics["actor/optimizer_steps"] == 0
    assert metrics["actor/step_kl"] == 0.0
    # A step with no update logs the exact values of one: no loss, clipping, KL or gradient.
    assert [metrics[name] for name in NO_UPDATE_ZEROS] == [0.0] * len(NO_UPDATE_ZEROS)
    assert learner.history.step_means == [pytest.approx(entropy, rel=1e-5)]
    # The same batch with the skip off: the entropy terms alone move every weight by ~lr.
    learner = _learner("optim.warmup_ratio=0", "optim.lr=0.05", "optim.skip_signal_free=false")
    learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    assert any(not torch.equal(a, b) for a, b in zip(start, learner.policy.parameters()))


def test_only_the_mini_batches_without_signal_are_skipped():
    # Rows 0-2 (episodes 0 and 1, A = +-1/sqrt(2)) carry a signal, rows 3-6 (group 1, tied) none.
    batch = _batch([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    learner = _learner("optim.mini_batch_size=1", "optim.micro_batch_size=1", "optim.warmup_ratio=0")
    metrics = learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    assert metrics["actor/signal_free_minibatches"] == 4 and metrics["actor/optimizer_steps"] == 3


def test_the_step_kl_measures_the_whole_step_where_approx_kl_sees_none_of_it():
    # One mini-batch: approx_kl compares the policy with itself (0); step_kl is the k3
    # estimate of KL(pi_before || pi_after) on every decision token, with Eq. 2's weights.
    batch = _batch(SIGNAL_REWARDS)
    learner = _learner("optim.warmup_ratio=0", "optim.lr=0.01", f"tracking.step_move_units={len(TURNS)}")
    micro = collate(batch, list(range(len(batch))), 0)
    with torch.no_grad():
        before = forward_turns(learner.policy, micro, learner.spec.rollout.temperature).logp
    metrics = learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    with torch.no_grad():
        after = forward_turns(learner.policy, micro, learner.spec.rollout.temperature).logp
    d, w = (after - before).double(), _hand_weights(batch).double()
    assert metrics["actor/approx_kl"] == 0.0
    assert metrics["actor/step_kl"] > 0
    assert metrics["actor/step_kl"] == pytest.approx(float(((torch.exp(d) - 1 - d) * w).sum()), rel=1e-3)
    assert metrics["actor/step_logprob_change"] == pytest.approx(float((d.abs() * w).sum()), rel=1e-3)


def sign_of_return_estimator(turns, algo):
    """A test estimator registered below: +1 on every turn of a won episode, -1 otherwise."""
    from epo_cli.algos.advantages import episode_returns

    returns, _, episode_of_turn = episode_returns(turns)
    return torch.where(returns > 0, 1.0, -1.0)[episode_of_turn], None


def test_a_new_estimator_is_one_function_and_one_registry_entry(monkeypatch):
    from epo_cli.algos import estimators

    monkeypatch.setitem(estimators.ESTIMATORS, "sign", estimators.EstimatorInfo(
        "test_learner:sign_of_return_estimator", needs_critic=False, uses_groups=True, help="test"))
    learner = _learner("algo.advantage=sign")
    assert learner.spec.algo.advantage == "sign" and learner.critic is None and learner.value_head is None
    batch = _batch(SIGNAL_REWARDS)
    learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 0)
    won = {episode for episode, reward in zip(batch.episode_ids.tolist(), SIGNAL_REWARDS) if reward > 0}
    assert batch.advantages.tolist() == [1.0 if e in won else -1.0 for e in batch.episode_ids.tolist()]


def test_the_step_logs_the_variance_of_its_decision_token_entropies_without_forced_tokens():
    # Row 0's second token is forced (one allowed token): its entropy 5.0 is no decision.
    # Decisions 1, 3, 2, 4: mean 2.5, variance (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 4 = 1.25.
    batch = TurnBatch([[1], [2]], [[7, 8, 9], [7, 8]], torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 0]),
                      torch.zeros(2), allowed=[[None, [8], None], None])
    record = EntropyRecord(resolve_spec(flags={"env": {"name": "toy"}}), DistContext())
    _, _, variance = record.record(batch, [torch.tensor([1.0, 5.0, 3.0]), torch.tensor([2.0, 4.0])])
    assert variance == pytest.approx(1.25)
