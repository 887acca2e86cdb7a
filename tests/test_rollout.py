import math
import os

import torch

from epo_cli.batch import TurnBatch, collate
from epo_cli.envs.base import INVALID_FORMAT_OBSERVATION, EnvStep, TaskInstance
from epo_cli.forward import forward_turns
from epo_cli.models import ValueHead
from epo_cli.prompts import encode_prompt
from epo_cli.rollout import Episode, RolloutSettings, Turn, episode_stats, play_episodes
from epo_cli.sampling.base import Generation
from epo_cli.sampling.transformers import TransformersSampler, sample_token


class ScriptedSampler:
    """Returns fixed answers in turn order (a fake backend, for the episode logic only)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.prompts = []

    def forget_prefixes(self):
        """Nothing is kept between calls."""

    def generate(self, prompts, max_new_tokens, temperature, top_p, constraints=None):
        self.prompts.append(prompts)
        return [Generation([7, 8], [-0.1, -0.2], self.answers.pop(0)) for _ in prompts]


class CountingEnvs:
    """A fake engine batch: 'win' wins, anything else is a plain move."""

    title = "Fake"

    def __init__(self):
        self.steps = []

    def reset(self, tasks):
        return [EnvStep("start", actions=["win", "move"], task_description="do it") for _ in tasks]

    def step(self, slots, actions):
        self.steps.append(list(zip(slots, actions)))
        return [EnvStep(f"after {a}", done=a == "win", won=a == "win", score=100.0 if a == "win" else 0.0) for a in actions]


def settings(**kw):
    base = dict(max_turns=3, max_prompt_tokens=4096, max_response_tokens=8, temperature=1.0, reward_scale=1.0, invalid_action_penalty=0.1)
    base.update(kw)
    return RolloutSettings(**base)


def test_episode_rewards_invalid_turns_and_termination(tokenizer):
    task = TaskInstance("fake", "t", 0, 0)
    # Turn 0: episode 0 invalid, episode 1 moves. Turn 1: 0 wins, 1 moves. Turn 2: 1 invalid.
    answers = ["garbage", "<think>a</think><action>move</action>",
               "<think>b</think><action>win</action>", "<think>c</think><action>move</action>",
               "no tags"]
    envs = CountingEnvs()
    episodes = play_episodes(ScriptedSampler(answers), tokenizer, envs, [task, task], [0, 0], settings())
    won, lost = episodes
    assert [t.valid for t in won.turns] == [False, True]
    assert won.won and won.done
    assert [round(t.reward, 6) for t in won.turns] == [-0.1, 1.0]
    assert [t.valid for t in lost.turns] == [True, True, False]
    assert not lost.won and [round(t.reward, 6) for t in lost.turns] == [0.0, 0.0, -0.1]
    # An invalid turn consumes the turn but never reaches the engine.
    assert envs.steps == [[(1, "move")], [(0, "win"), (1, "move")]]
    batch = TurnBatch.from_episodes(episodes)
    assert batch.episode_ids.tolist() == [0, 0, 1, 1, 1]
    assert batch.turn_index.tolist() == [0, 1, 0, 1, 2]


def test_episode_stats_are_the_train_and_eval_figures():
    def episode(task_type, won, actions):
        turns = [Turn([1], [2], "", action, i, [0.0]) for i, action in enumerate(actions)]
        return Episode(TaskInstance("toy", task_type, 0, 0), 0, 0, turns, won=won)

    episodes = [episode("b", True, ["go", None]), episode("a", False, [None, None, "go"]), episode("b", False, ["go"])]
    stats = episode_stats(episodes)
    assert (stats.episodes, stats.successes, stats.success_rate) == (3, 1, 1 / 3)
    assert stats.mean_turns == 6 / 3 and stats.invalid_action_rate == 3 / 6
    assert stats.per_type == {"a": (0, 1), "b": (1, 2)} and list(stats.per_type) == ["a", "b"]
    assert [e.invalid_turns for e in episodes] == [1, 2, 0]
    empty = episode_stats([])
    assert (empty.success_rate, empty.mean_turns, empty.invalid_action_rate, empty.per_type) == (0.0, 0.0, 0.0, {})
    assert stats.decoy_rate is None and episode_stats([episode("b", False, ["stop"])]).decoy_rate is None  # the toy has no decoy


def test_invalid_turn_is_shown_in_the_next_prompt(tokenizer):
    sampler = ScriptedSampler(["oops", "<think>x</think><action>win</action>"])
    play_episodes(sampler, tokenizer, CountingEnvs(), [TaskInstance("fake", "t", 0, 0)], [0], settings())
    second_prompt = tokenizer.decode(sampler.prompts[1][0])
    assert INVALID_FORMAT_OBSERVATION in second_prompt
    assert "(invalid)" in second_prompt


def test_prompt_truncation_keeps_head_and_tail(tokenizer):
    messages = [{"role": "user", "content": "HEAD " + "filler " * 400 + " TAIL"}]
    ids, cut = encode_prompt(tokenizer, messages, 120, "truncate")
    assert len(ids) == 120 and cut > 0
    text = tokenizer.decode(ids)
    assert "HEAD" in text and "TAIL" in text
    try:
        encode_prompt(tokenizer, messages, 120, "error")
    except ValueError as err:
        assert "max_prompt_tokens=120" in str(err)
    else:
        raise AssertionError("expected PromptTooLong")


def test_sampler_matches_full_forward_logprobs(tiny_model, tokenizer):
    generator = torch.Generator().manual_seed(0)
    sampler = TransformersSampler(tiny_model, tokenizer, batch_size=2, generator=generator)
    prompts = [tokenizer("hello there")["input_ids"], tokenizer("a much longer prompt than the first one")["input_ids"]]
    out = sampler.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1.0)
    for prompt, gen in zip(prompts, out):
        assert 1 <= len(gen.token_ids) <= 6
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt + gen.token_ids])).logits[0]
        full = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(-1, torch.tensor(gen.token_ids)[:, None]).squeeze(-1)
        # Left-padded KV-cached sampling agrees with one unpadded forward pass.
        assert torch.allclose(full, torch.tensor(gen.logprobs), atol=1e-4)


def test_sampler_stops_on_eos(tiny_model, tokenizer):
    class EosModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.generation_config, self.config = inner.generation_config, inner.config

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits[..., tokenizer.eos_token_id] = 1e4
            return out

    sampler = TransformersSampler(EosModel(tiny_model), tokenizer)
    (gen,) = sampler.generate([tokenizer("x")["input_ids"]], 10, 1.0, 1.0)
    assert gen.token_ids == [tokenizer.eos_token_id]


def test_sample_token_greedy_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    token, logp = sample_token(logits, 0.0, 1.0, None)
    assert token.tolist() == [1]
    draws = {int(sample_token(logits, 1.0, 0.5, torch.tensor([u / 50]))[0]) for u in range(50)}
    assert draws == {1}  # top-p 0.5 keeps only the dominant token


def test_sample_token_inverts_the_cdf_at_the_uniform():
    # softmax([0, ln 3]) = [0.25, 0.75]: u below 0.25 picks token 0, at or above it token 1.
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3)
    token, logp = sample_token(logits, 1.0, 1.0, torch.tensor([0.1, 0.25, 0.9]))
    assert token.tolist() == [0, 1, 1]
    assert torch.allclose(logp, torch.tensor([math.log(0.25), math.log(0.75), math.log(0.75)]))
    # A token of probability 0 (masked) is never drawn, even at u = 0.
    masked = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert sample_token(masked, 1.0, 1.0, torch.tensor([0.0]))[0].tolist() == [1]


def test_forward_turns_match_a_plain_forward(tiny_model):
    batch = TurnBatch(
        prompt_ids=[[5, 6, 7], [9, 10]],
        response_ids=[[11, 12], [13, 14, 15]],
        episode_ids=torch.tensor([0, 1]),
        group_ids=torch.tensor([0, 1]),
        turn_index=torch.tensor([0, 0]),
        rewards=torch.zeros(2),
    )
    micro = collate(batch, [0, 1], pad_id=2)
    head = ValueHead(tiny_model.config.hidden_size)
    out = forward_turns(tiny_model, micro, temperature=0.5, chunk_tokens=2, value_head=head)
    assert out.logp.shape == (2, 3) and out.values.shape == (2,)
    for row in range(2):
        seq = batch.prompt_ids[row] + batch.response_ids[row]
        logits = tiny_model(torch.tensor([seq])).logits[0] / 0.5
        p = len(batch.prompt_ids[row])
        n = len(batch.response_ids[row])
        expected = torch.log_softmax(logits[p - 1 : p - 1 + n], -1).gather(-1, torch.tensor(batch.response_ids[row])[:, None]).squeeze(-1)
        assert torch.allclose(out.logp[row, :n], expected, atol=1e-5)
        assert torch.all(out.logp[row, n:] == 0)
    loss = out.logp.sum() + out.entropy.sum() + out.values.sum()
    loss.backward()
    assert tiny_model.get_output_embeddings().weight.grad is not None
    assert head.proj.weight.grad.abs().sum() > 0  # the value loss reaches the head


def test_chunked_update_matches_the_full_logits_implementation(tiny_model):
    """Same EPO loss and the same gradients as full-vocabulary logits over a padded batch."""
    from epo_cli.algos.entropy import entropy_from_logits
    from epo_cli.algos.losses import token_weights
    from epo_cli.algos.objective import LossInputs, StepCoefficients, epo_loss
    from epo_cli.spec import AlgoSpec, EPOSpec, SmoothingSpec

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 6, 12)]
    responses = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (4, 7, 2)]
    batch = TurnBatch(prompts, responses, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.zeros(3))
    adv = torch.tensor([0.5, -1.0, 2.0])
    weights = token_weights(batch.response_mask([0, 1, 2]), batch.episode_ids, "traj-mean")

    epo = EPOSpec(smoothing=SmoothingSpec(kappa_l=0.5, kappa_r=1.2, alpha=0.05))

    def loss_of(logp, entropy, w):
        inputs = LossInputs(w, adv, logp.detach() - 0.1, batch.turn_index, entropy_ref=3.0)
        return epo_loss(inputs, logp, entropy, AlgoSpec(), epo, StepCoefficients(0.01, 1.7)).loss

    micro = collate(batch, [0, 1, 2], pad_id=2)
    out = forward_turns(tiny_model, micro, temperature=0.8, chunk_tokens=3)
    ours = loss_of(out.logp, out.entropy, weights[:, : micro.response_width])
    tiny_model.zero_grad()
    ours.backward()
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    logits = tiny_model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits / 0.8
    logp = torch.zeros(3, micro.response_width)
    entropy = torch.zeros(3, micro.response_width)
    for row in range(3):
        p, n = len(prompts[row]), len(responses[row])
        row_logits = logits[row, p - 1 : p - 1 + n]
        logp[row, :n] = torch.log_softmax(row_logits, -1).gather(-1, torch.tensor(responses[row])[:, None]).squeeze(-1)
        entropy[row, :n] = entropy_from_logits(row_logits)
    reference = loss_of(logp, entropy, weights[:, : micro.response_width])
    tiny_model.zero_grad()
    reference.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    for name, param in tiny_model.named_parameters():
        relative = (grads[name] - param.grad).norm() / param.grad.norm()
        assert relative < 1e-5, (name, float(relative))


def test_bf16_autocast_stays_close_to_fp32(tiny_model):
    from epo_cli.precision import autocast_context

    batch = TurnBatch([[5, 6, 7, 8]], [[11, 12, 13]], torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.zeros(1))
    micro = collate(batch, [0], pad_id=2)
    with torch.no_grad():
        full = forward_turns(tiny_model, micro, 1.0)
        with autocast_context("bf16", tiny_model):
            low = forward_turns(tiny_model, micro, 1.0)
    assert low.logp.dtype == torch.float32  # log-probs and entropy are always computed in fp32
    assert torch.allclose(low.logp, full.logp, atol=0.05) and torch.allclose(low.entropy, full.entropy, atol=0.05)
    assert not torch.equal(low.logp, full.logp)  # the matmuls did run in bf16


def test_under_bf16_autocast_the_lm_head_runs_in_fp32_and_every_weight_gets_a_gradient(tiny_model):
    from epo_cli.precision import autocast_context

    batch = TurnBatch([[5, 6, 7, 8]], [[11, 12, 13]], torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.zeros(1))
    micro = collate(batch, [0], pad_id=2)
    with autocast_context("bf16", tiny_model):
        out = forward_turns(tiny_model, micro, 1.0)
        hidden = tiny_model.base_model(input_ids=micro.input_ids).last_hidden_state[0, 3:6]
    logits = hidden.float() @ tiny_model.get_output_embeddings().weight.T  # an fp32 head on the bf16 backbone's states
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[11], [12], [13]])).squeeze(-1)
    assert torch.allclose(out.logp[0], expected, atol=1e-5)
    out.logp.sum().backward()
    for name, param in tiny_model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name


def test_grouped_kv_heads_are_read_as_they_are_on_cpu_with_the_same_values(monkeypatch):
    from epo_cli.models import GROUPED_ATTENTION_FLAG, load_causal_lm, use_grouped_attention_on_cpu

    monkeypatch.delenv(GROUPED_ATTENTION_FLAG, raising=False)
    use_grouped_attention_on_cpu()
    assert os.environ.get(GROUPED_ATTENTION_FLAG) == (None if torch.cuda.is_available() else "1")
    model = load_causal_lm("tiny").eval()  # 4 query heads over 2 KV heads
    kv_heads = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, *args, **kwargs: kv_heads.append(k.shape[1]) or sdpa(q, k, v, *args, **kwargs))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: transformers passes a mask
    logits = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(GROUPED_ATTENTION_FLAG, flag)
        with torch.no_grad():
            logits[flag] = model(input_ids=ids, attention_mask=mask).logits
    assert kv_heads == [2, 2, 4, 4]  # two layers read 2 grouped heads, then the 4 repeated ones
    assert torch.allclose(logits["1"][:, 4:], logits["0"][:, 4:], atol=1e-6)
