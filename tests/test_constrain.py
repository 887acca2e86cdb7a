"""Constrained decoding: the token trie, the restricted log-prob/entropy math, and the
sampler and trainer scoring one and the same restricted distribution."""

import math
import random

import pytest
import torch

from epo_cli.algos.entropy import restricted_logprobs_and_entropy
from epo_cli.batch import TurnBatch, collate
from epo_cli.sampling.constrain import ConstraintFactory
from epo_cli.envs.base import parse_action
from epo_cli.forward import forward_turns
from epo_cli.rollout import Episode, Turn
from epo_cli.sampling.transformers import TransformersSampler, _prefill_buckets

ACTIONS = ["go to cabinet 1", "go to cabinet 10", "take apple 1 from countertop 2", "open fridge 1"]


def test_restricted_logprob_and_entropy_by_hand():
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], requires_grad=True)  # logits 1, 0, 2
    logp, entropy = restricted_logprobs_and_entropy(hidden, weight, torch.tensor([[0, 2, -1]]), torch.tensor([2]))
    p1, p2 = math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))
    assert abs(logp.item() - math.log(p2)) < 1e-6
    assert abs(entropy.item() + p1 * math.log(p1) + p2 * math.log(p2)) < 1e-6
    (logp + entropy).sum().backward()
    assert weight.grad[1].abs().sum() == 0  # a token outside the set gets no gradient
    assert weight.grad[0].abs().sum() > 0 and weight.grad[2].abs().sum() > 0


def test_temperature_divides_the_restricted_logits():
    hidden, weight = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    logp, _ = restricted_logprobs_and_entropy(hidden, weight, torch.tensor([[0, 1]]), torch.tensor([0]), temperature=0.5)
    assert abs(logp.item() - (2.0 - math.log(math.exp(2.0) + math.exp(4.0)))) < 1e-6


def test_a_forced_token_has_zero_logprob_entropy_and_gradient():
    hidden = torch.randn(1, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    logp, entropy = restricted_logprobs_and_entropy(hidden, weight, torch.tensor([[3, -1, -1]]), torch.tensor([3]))
    assert logp.item() == 0.0 and entropy.item() == 0.0
    (logp + entropy).sum().backward()
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def _walk(factory, actions, rng, free_tokens=()):
    """Generate a response by choosing uniformly among the allowed tokens."""
    constraint = factory(actions)
    free = list(free_tokens)
    tokens, sets = [], []
    while not constraint.done:
        allowed = constraint.allowed()
        token = free.pop(0) if allowed is None else rng.choice(allowed)
        tokens.append(token)
        sets.append(allowed)
        constraint.advance(token)
    return tokens, sets


def test_every_walk_through_the_trie_is_an_admissible_well_formed_answer(tokenizer):
    factory = ConstraintFactory(tokenizer)
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        tokens, sets = _walk(factory, ACTIONS, rng)
        action = parse_action(tokenizer.decode(tokens))
        assert action in ACTIONS
        seen.add(action)
        assert all(s is not None for s in sets)
        prefix = tokenizer("<think></think><action>", add_special_tokens=False)["input_ids"]
        assert sets[: len(prefix)] == [[t] for t in prefix]  # the format is forced
    assert seen == set(ACTIONS)  # "go to cabinet 1" and "... 10" both stay reachable


def test_a_think_budget_forces_the_close_and_a_natural_close_is_kept(tokenizer):
    factory = ConstraintFactory(tokenizer, think_tokens=3)
    filler = tokenizer(" hmm hmm hmm hmm", add_special_tokens=False)["input_ids"]
    tokens, sets = _walk(factory, ["open fridge 1"], random.Random(0), filler)
    assert sum(s is None for s in sets) == 3
    text = tokenizer.decode(tokens)
    assert text.startswith("<think>") and parse_action(text) == "open fridge 1"

    factory = ConstraintFactory(tokenizer, think_tokens=20)
    closing = tokenizer(" ok</think>", add_special_tokens=False)["input_ids"]
    tokens, sets = _walk(factory, ["open fridge 1"], random.Random(0), closing)
    assert sum(s is None for s in sets) == len(closing)
    assert parse_action(tokenizer.decode(tokens)) == "open fridge 1"


def test_sampler_and_trainer_score_the_same_restricted_policy(tokenizer, tiny_model):
    factory = ConstraintFactory(tokenizer, think_tokens=4)
    prompts = [tokenizer("Your task: open the fridge.", add_special_tokens=False)["input_ids"]] * 3
    sampler = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(0))
    generations = sampler.generate(prompts, 40, 0.7, 1.0, [factory(ACTIONS) for _ in prompts])
    episodes = []
    for i, (prompt, generation) in enumerate(zip(prompts, generations)):
        assert parse_action(generation.text) in ACTIONS
        turn = Turn(prompt, generation.token_ids, generation.text, None, 0, generation.logprobs, generation.allowed)
        episodes.append(Episode(task=None, episode_id=i, group_id=i, turns=[turn]))
    batch = TurnBatch.from_episodes(episodes)
    micro = collate(batch, list(range(len(batch))), tokenizer.pad_token_id)
    with torch.no_grad():
        out = forward_turns(tiny_model, micro, temperature=0.7)
    sampled = batch.padded(batch.sample_logp, micro.rows, micro.response_width)
    assert torch.allclose(out.logp, sampled, atol=1e-5)
    forced = torch.tensor([[s is not None and len(s) == 1 for s in g.allowed] + [False] * (micro.response_width - len(g.allowed)) for g in generations])
    assert forced.any() and (out.logp[forced] == 0).all() and (out.entropy[forced] == 0).all()
    free = micro.response_mask.bool() & ~forced
    assert (out.entropy[free] > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("env", ["alfworld", "scienceworld"])
def test_constrained_turns_on_the_real_engines_are_all_admissible(env, tokenizer, tiny_model):
    """A random model, constrained: every turn is a well-formed admissible command. ALFWorld
    accepts each; ScienceWorld's own enumeration lists some commands its parser then
    rejects (about 1 in 10 on these tasks: long referents such as "cup containing red
    paint in cupboard"), so there only the format is checked."""
    from epo_cli.envs.pool import make_env_batch
    from epo_cli.envs.registry import load_split
    from epo_cli.rollout import RolloutSettings, play_episodes

    tasks = load_split(env, None, "iid")[:2]
    envs = make_env_batch(env, len(tasks), {"valid_actions": True}, workers=0)
    settings = RolloutSettings(
        max_turns=3, max_prompt_tokens=1024, max_response_tokens=64, temperature=1.0, constrain="admissible", think_tokens=2
    )
    sampler = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(0))
    try:
        episodes = play_episodes(sampler, tokenizer, envs, tasks, [0, 1], settings)
    finally:
        envs.close()
    turns = [turn for episode in episodes for turn in episode.turns]
    assert turns and all(turn.valid for turn in turns)
    if env == "alfworld":
        assert all(turn.accepted for turn in turns)


class CountingModel(torch.nn.Module):
    """A model wrapper that counts forward passes and the tokens fed to them."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.generation_config, self.config = inner.generation_config, inner.config
        self.passes = 0

    def forward(self, **kw):
        self.passes += 1
        return self.inner(**kw)


@pytest.mark.parametrize("think_tokens", [0, 3])
def test_fast_forward_gives_the_step_by_step_episode_in_fewer_passes(tokenizer, tiny_model, think_tokens):
    """Forced runs fed in one pass (fast_forward) and one token per pass give the same
    responses, log-probs and allowed sets under the same seed; forced tokens draw nothing."""
    factory = ConstraintFactory(tokenizer, think_tokens=think_tokens)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in
               ("Your task: open the fridge.", "Your task: put an apple on the countertop, then look.", "Go.")]
    results = {}
    for fast in (True, False):
        model = CountingModel(tiny_model)
        sampler = TransformersSampler(model, tokenizer, generator=torch.Generator().manual_seed(3), fast_forward=fast)
        generations = sampler.generate(prompts, 40, 1.0, 1.0, [factory(ACTIONS) for _ in prompts])
        results[fast] = (generations, model.passes)
    (fast_gens, fast_passes), (slow_gens, slow_passes) = results[True], results[False]
    for fast, slow in zip(fast_gens, slow_gens):
        assert fast.token_ids == slow.token_ids and fast.allowed == slow.allowed
        assert torch.allclose(torch.tensor(fast.logprobs), torch.tensor(slow.logprobs), atol=1e-5)
        assert parse_action(fast.text) in ACTIONS
        forced = [i for i, s in enumerate(fast.allowed) if s is not None and len(s) == 1]
        assert forced and all(fast.logprobs[i] == 0.0 for i in forced)
    longest = max(len(g.token_ids) for g in slow_gens)
    prefills = len(_prefill_buckets([len(p) for p in prompts]))  # passes over the prompts (rows of unlike lengths apart)
    assert slow_passes == prefills + longest - 1  # then one pass per token but the last
    choices = max(sum(s is None or len(s) > 1 for s in g.allowed) for g in fast_gens)
    assert fast_passes <= prefills + choices < slow_passes


def test_a_response_does_not_depend_on_its_batch_mates(tokenizer, tiny_model):
    """Row 0's response is the same whatever the other prompts of its batch are."""
    factory = ConstraintFactory(tokenizer, think_tokens=2)
    first = tokenizer("Your task: open the fridge.", add_special_tokens=False)["input_ids"]
    answers = []
    for mate in ("Go.", "A much longer prompt about cabinets, countertops and a fridge."):
        sampler = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(5))
        prompts = [first, tokenizer(mate, add_special_tokens=False)["input_ids"]]
        answers.append(sampler.generate(prompts, 40, 1.0, 1.0, [factory(ACTIONS) for _ in prompts])[0].token_ids)
    assert answers[0] == answers[1]
