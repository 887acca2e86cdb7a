"""The conversation prompt format and the packed update (rollout.prompt_format:
conversation): every turn's prompt extends the one before token for token, and one
forward per segment gives the per-turn forwards' log-probs, entropies, values, loss and
gradients."""

from dataclasses import replace

import pytest
import torch

from epo_cli.batch import TurnBatch, collate, forced_tokens, pack, unit_minibatches
from epo_cli.envs.base import EnvStep, TaskInstance
from epo_cli.forward import forward_turns
from epo_cli.sampling.base import Generation
from epo_cli.learner import Learner
from epo_cli.models import ValueHead
from epo_cli.rollout import RolloutSettings, play_episodes
from epo_cli.spec import resolve_spec

ANSWERS = ["<think>look first</think><action>open door</action>", "<think>go</think><action>go north</action>",
           "<think>hm</think><action>take key</action>"]


class TokenSampler:
    """Fixed answers, tokenized as a real sampler returns them; every third one ends with
    EOS (free sampling stops on it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def forget_prefixes(self):
        """Nothing is kept between calls."""

    def generate(self, prompts, max_new_tokens, temperature, top_p, constraints=None):
        out = []
        for prompt in prompts:
            text = ANSWERS[self.calls % len(ANSWERS)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.calls % 3 == 2:
                ids = ids + [self.tokenizer.eos_token_id]
            self.calls += 1
            out.append(Generation(ids, [0.0] * len(ids), text))
        return out


class WordyEnvs:
    """A fake engine batch with long observations; episode ``slot`` wins at turn 3 + slot."""

    title = "Fake"

    def __init__(self):
        self.turns = {}

    def reset(self, tasks):
        self.turns = {slot: 0 for slot in range(len(tasks))}
        return [EnvStep("You are in a hall. " + "There is a lamp here. " * 6, actions=["open door", "go north", "take key"],
                        task_description=f"find the key {slot}") for slot in range(len(tasks))]

    def step(self, slots, actions):
        results = []
        for slot, action in zip(slots, actions):
            self.turns[slot] += 1
            done = self.turns[slot] >= 3 + slot
            results.append(EnvStep(f"You did {action}. " + "Nothing much happens. " * (2 + self.turns[slot]), done=done,
                                   won=done, actions=["open door", "go north", "take key", f"wait {self.turns[slot]}"]))
        return results


def _episodes(tokenizer, max_prompt_tokens=4096):
    settings = RolloutSettings(max_turns=6, max_prompt_tokens=max_prompt_tokens, max_response_tokens=32, temperature=1.0,
                               prompt_format="conversation")
    tasks = [TaskInstance("fake", "t", i, 0) for i in range(3)]
    return play_episodes(TokenSampler(tokenizer), tokenizer, WordyEnvs(), tasks, [0, 0, 1], settings)


def _chat_text(tokenizer, episode, upto: int) -> str:
    """The chat template's rendering of the conversation up to turn ``upto``'s prompt."""
    from epo_cli.envs.base import PromptState, conversation_opening, conversation_turn

    first = episode.turns[0]
    state = PromptState(f"find the key {episode.episode_id}", first.observation, first.listed_actions)
    messages = conversation_opening("Fake", state, 0, 6, 60)
    for turn in episode.turns[1 : upto + 1]:
        previous = episode.turns[turn.turn_index - 1]
        messages.append({"role": "assistant", "content": previous.response_text})
        messages.append({"role": "user", "content": conversation_turn(PromptState("", turn.observation, turn.listed_actions),
                                                                      turn.turn_index, 6, 60)})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_each_prompt_extends_the_last_prompt_and_response(tokenizer):
    episodes = _episodes(tokenizer)
    assert [len(e.turns) for e in episodes] == [3, 4, 5]
    for episode in episodes:
        assert all(turn.segment == 0 for turn in episode.turns)
        for before, turn in zip(episode.turns, episode.turns[1:]):
            head = before.prompt_ids + before.response_ids
            assert turn.prompt_ids[: len(head)] == head
            delta = tokenizer.decode(turn.prompt_ids[len(head) :])
            assert delta.endswith("<|im_end|>\n<|im_start|>assistant\n") and "Step" in delta
            # An answer that ended with EOS does not get a second end of turn.
            assert delta.startswith("\n<|im_start|>user\n" if before.response_ids[-1] == tokenizer.eos_token_id
                                    else "<|im_end|>\n<|im_start|>user\n")
        # The concatenated ids spell exactly the chat template's rendering of the chat.
        last = episode.turns[-1]
        assert tokenizer.decode(last.prompt_ids) == _chat_text(tokenizer, episode, last.turn_index)
    assert tokenizer.decode(episodes[0].turns[0].prompt_ids) == _chat_text(tokenizer, episodes[0], 0)


def test_an_overlong_conversation_starts_a_new_segment_at_a_turn(tokenizer):
    unlimited = _episodes(tokenizer)
    limit = len(unlimited[2].turns[2].prompt_ids)  # turn 3 of episode 2 no longer fits
    episodes = _episodes(tokenizer, limit)
    long = episodes[2]
    assert all(len(turn.prompt_ids) <= limit and turn.prompt_tokens_cut == 0 for e in episodes for turn in e.turns)
    segments = [turn.segment for turn in long.turns]
    assert segments[:3] == [0, 0, 0] and segments[3] == 1 and segments == sorted(segments)
    restart = long.turns[3]
    text = tokenizer.decode(restart.prompt_ids)
    assert text.startswith("<|im_start|>system\nYou are an expert agent acting in Fake")
    assert "Your task: find the key 2" in text and "Actions taken so far: " + "; ".join(t.action for t in long.turns[:3]) in text
    assert restart.observation.split(".")[0] in text and text.count("<|im_start|>user") == 1
    for before, turn in zip(long.turns, long.turns[1:]):
        if turn.segment == before.segment:
            assert turn.prompt_ids[: len(before.prompt_ids) + len(before.response_ids)] == before.prompt_ids + before.response_ids
    batch = TurnBatch.from_episodes(episodes)
    rows = batch.segments()
    assert sum(len(r) for r in rows) == len(batch) and len(rows) == len({(e.episode_id, t.segment) for e in episodes for t in e.turns})
    pack(batch, rows, tokenizer.pad_token_id)  # every turn is a prefix of its segment's sequence
    broken = TurnBatch.from_episodes(episodes)
    broken.response_ids[0] = [5] + broken.response_ids[0][1:]
    with pytest.raises(ValueError, match="no prefix"):
        pack(broken, rows, tokenizer.pad_token_id)


def test_windowed_turns_are_segments_of_their_own(tokenizer):
    settings = RolloutSettings(max_turns=3, max_prompt_tokens=4096, max_response_tokens=32, temperature=1.0)
    episodes = play_episodes(TokenSampler(tokenizer), tokenizer, WordyEnvs(), [TaskInstance("fake", "t", 0, 0)], [0], settings)
    batch = TurnBatch.from_episodes(episodes)
    assert batch.segments() == [[0], [1], [2]]
    batch.advantages = torch.zeros(3)  # the learner fills these in; the rollout's fields stay
    with pytest.raises(AttributeError, match="fixed"):
        batch.segment_ids = None


def _constrained(batch: TurnBatch, vocab: int) -> TurnBatch:
    """``batch`` with allowed sets on its response tokens: forced (one token), a choice,
    the full vocabulary, in turn."""
    g = torch.Generator().manual_seed(3)
    allowed = []
    for response in batch.response_ids:
        sets = []
        for j, token in enumerate(response):
            kind = j % 3
            others = torch.randint(3, vocab, (4,), generator=g).tolist()
            sets.append([token] if kind == 0 else sorted({token, *others}) if kind == 1 else None)
        allowed.append(sets)
    return replace(batch, allowed=allowed)


@pytest.mark.parametrize("constrained", [False, True])
def test_packed_forward_matches_the_per_turn_forward(tiny_model, tokenizer, constrained):
    batch = TurnBatch.from_episodes(_episodes(tokenizer))
    if constrained:
        batch = _constrained(batch, len(tokenizer))
    head = ValueHead(tiny_model.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, generator=torch.Generator().manual_seed(0))
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        per_turn = collate(batch, list(range(len(batch))), pad)
        packed = pack(batch, batch.segments(), pad)
        assert packed.input_ids.shape[0] == 3 and packed.input_ids.numel() < per_turn.input_ids.numel() / 2
        a = forward_turns(tiny_model, per_turn, 0.7, chunk_tokens=5, value_head=head)
        b = forward_turns(tiny_model, packed, 0.7, chunk_tokens=5, value_head=head)
    order = [packed.rows.index(row) for row in per_turn.rows]
    mask = per_turn.response_mask.bool()
    assert torch.allclose(a.logp[mask], b.logp[order][mask], atol=1e-5, rtol=0)
    assert torch.allclose(a.entropy[mask], b.entropy[order][mask], atol=1e-5, rtol=0)
    assert torch.allclose(a.values, b.values[order], atol=1e-5, rtol=0)
    assert torch.all(b.logp[~packed.response_mask.bool()] == 0)
    if constrained:  # a forced token: log-prob and entropy 0 exactly
        assert torch.all(b.logp[forced_tokens(packed.allowed)] == 0) and torch.all(b.entropy[forced_tokens(packed.allowed)] == 0)


def _learner(algo: str, prompt_format: str, *overrides: str) -> Learner:
    spec = resolve_spec(None, {"algo": {"name": algo}, "model": {"name": "tiny"}}, [
        "scale=cpu", "model.autocast=none", "train.steps=4", "optim.mini_batch_size=64", "optim.micro_batch_size=2",
        f"rollout.prompt_format={prompt_format}", "epo.entropy_coef=0.3", *overrides,
    ])
    return Learner(spec, pad_id=2)


def _step(learner: Learner, batch: TurnBatch, record_gradients) -> tuple[dict, dict]:
    """One learn step: its metrics and the gradients it steps with (per optimizer)."""
    grads = record_gradients(learner, learner.actor)
    learner.history.append(1.5, {})  # a smoothing reference: every EPO term is on
    metrics = learner.learn(batch, torch.zeros(len(batch), dtype=torch.long), 1)
    assert len(grads) == 1
    return metrics, grads[0]


@pytest.mark.parametrize("algo", ["grpo+epo", "ppo+epo"])
def test_packed_update_gives_the_per_turn_loss_and_gradients(tokenizer, record_gradients, algo):
    episodes = _episodes(tokenizer)
    for episode in episodes:
        episode.turns[-1].reward = float(episode.won) * (1 + episode.episode_id)
    results = {}
    for prompt_format in ("windowed", "conversation"):
        batch = _constrained(TurnBatch.from_episodes(episodes), len(tokenizer))
        results[prompt_format] = _step(_learner(algo, prompt_format), batch, record_gradients)
    (m_turn, g_turn), (m_packed, g_packed) = results["windowed"], results["conversation"]
    for key in ("actor/loss", "actor/pg_loss", "actor/entropy", "actor/entropy_loss_term", "epo/smooth_penalty"):
        assert m_packed[key] == pytest.approx(m_turn[key], abs=1e-5), key
    if algo == "ppo+epo":
        assert m_packed["critic/value_loss"] == pytest.approx(m_turn["critic/value_loss"], abs=1e-5)
    assert g_turn.keys() == g_packed.keys() and any(float(g.norm()) > 0 for g in g_turn.values())
    for name in g_turn:
        scale = float(g_turn[name].norm())
        assert float((g_turn[name] - g_packed[name]).norm()) <= 1e-4 * scale + 1e-7, name


def test_packed_minibatches_hold_whole_segments(tokenizer):
    batch = TurnBatch.from_episodes(_episodes(tokenizer))  # 12 turns in 3 segments
    learner = _learner("grpo+epo", "conversation", "optim.mini_batch_size=5")
    units = learner.units(batch)
    assert units == batch.segments() and len(units) == 3
    minibatches = unit_minibatches(units, len(batch), 5, torch.Generator().manual_seed(0))
    assert len(minibatches) == 3 and sorted(u for m in minibatches for u in m) == [0, 1, 2]
    assert learner.needs_old_logp(batch)
    learner = _learner("grpo+epo", "conversation", "optim.mini_batch_size=12")
    assert not learner.needs_old_logp(batch) and len(unit_minibatches(units, len(batch), 12, torch.Generator())) == 1


@pytest.mark.slow
def test_train_toy_multiturn_in_conversation_format(tmp_path):
    from typer.testing import CliRunner

    from epo_cli.cli import app

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, [
        "train", "--env", "toy-multiturn", "--model", "tiny", "--steps", "2", "--tracking-uri", uri,
        "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "rollout.prompt_format=conversation",
        "--set", "rollout.tasks_per_step=4",
    ])
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("epo").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["rollout.prompt_format"] == "conversation"
    assert run.data.metrics["rollout/logprob_diff"] < 1e-5  # the packed update scores what the sampler drew


class FedTokens:
    """Counts the token positions a model is fed (padding included), per forward pass."""

    def __init__(self, model):
        self.passes: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _, args, kwargs: self.passes.append(kwargs["input_ids"].numel()),
                                                      with_kwargs=True)


def test_prefix_cache_feeds_only_new_tokens_and_samples_the_same(tiny_model, tokenizer):
    """Conversation rollouts with the kept KV caches sample exactly what whole-prompt
    prefills sample, feeding a fraction of the tokens; a segment restart (a prompt that
    extends no kept sequence) reuses the system text and task it shares with one."""
    from epo_cli.sampling.transformers import TransformersSampler

    settings = RolloutSettings(max_turns=6, max_prompt_tokens=400, max_response_tokens=12, temperature=1.0,
                               prompt_format="conversation")
    tasks = [TaskInstance("fake", "t", i, 0) for i in range(3)]
    played, fed = {}, {}
    for reuse in (False, True):
        counter = FedTokens(tiny_model)
        sampler = TransformersSampler(tiny_model, tokenizer, batch_size=2, generator=torch.Generator().manual_seed(3),
                                      prefix_cache=reuse)
        played[reuse] = play_episodes(sampler, tokenizer, WordyEnvs(), tasks, [0, 0, 1], settings)
        counter.handle.remove()
        fed[reuse] = sum(counter.passes)
    turns = {reuse: [t for e in episodes for t in e.turns] for reuse, episodes in played.items()}
    assert max(t.segment for t in turns[True]) >= 1  # 400 tokens: the fifth turn restarts
    assert [t.prompt_ids for t in turns[True]] == [t.prompt_ids for t in turns[False]]
    assert [t.response_ids for t in turns[True]] == [t.response_ids for t in turns[False]]
    for cached, plain in zip(turns[True], turns[False]):
        assert torch.allclose(torch.tensor(cached.sample_logprobs), torch.tensor(plain.sample_logprobs), atol=1e-4)
    assert fed[True] < 0.5 * fed[False]


def test_prefix_cache_lives_until_the_rollout_ends(tiny_model, tokenizer):
    """A prompt that extends the last call's sequence feeds only its new tokens, until
    ``forget_prefixes``, which ``play_episodes`` calls when a rollout ends (the weights may
    change before the next one)."""
    from epo_cli.sampling.transformers import TransformersSampler

    sampler = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(0), prefix_cache=True)
    prompt = tokenizer("a prompt of some length, to be extended")["input_ids"]
    (first,) = sampler.generate([prompt], 4, 1.0, 1.0)
    follow_up = prompt + first.token_ids + tokenizer(" and more")["input_ids"]
    counter = FedTokens(tiny_model)
    sampler.generate([follow_up], 1, 1.0, 1.0)
    sampler.forget_prefixes()
    sampler.generate([follow_up], 1, 1.0, 1.0)
    counter.handle.remove()
    assert counter.passes[0] <= len(follow_up) - len(prompt) and counter.passes[1] == len(follow_up)

    settings = RolloutSettings(max_turns=3, max_prompt_tokens=4096, max_response_tokens=4, temperature=1.0,
                               prompt_format="conversation")
    play_episodes(sampler, tokenizer, WordyEnvs(), [TaskInstance("fake", "t", 0, 0)], [0], settings)
    assert sampler.prefixes == []


def test_a_prompt_equal_to_a_kept_sequence_feeds_its_last_token_only(tiny_model, tokenizer):
    """The longest reuse: a prompt that is exactly a kept sequence feeds one token (its
    logits are needed), and samples what a sampler without kept caches samples."""
    from epo_cli.sampling.transformers import TransformersSampler

    sampler = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(0), prefix_cache=True)
    sampler.generate([tokenizer("a prompt of some length")["input_ids"]], 5, 1.0, 1.0)
    (kept,) = sampler.prefixes
    counter = FedTokens(tiny_model)
    sampler.generator, fresh = torch.Generator().manual_seed(7), TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(7))
    (reused,) = sampler.generate([kept.ids], 6, 1.0, 1.0)
    counter.handle.remove()
    (plain,) = fresh.generate([kept.ids], 6, 1.0, 1.0)
    assert counter.passes[0] == 1
    assert reused.token_ids == plain.token_ids
    assert torch.allclose(torch.tensor(reused.logprobs), torch.tensor(plain.logprobs), atol=1e-4)


def test_prefill_passes_group_rows_of_like_lengths():
    """Rows sorted by tokens to feed; a pass takes the next row while its padding stays
    within 25% of its real tokens: 10, 12 (24 <= 27.5), then 95, 100 (200 <= 243.75), then
    300 alone (900 > 618.75)."""
    from epo_cli.sampling.transformers import _prefill_buckets

    assert _prefill_buckets([100, 10, 12, 95, 300]) == [[1, 2], [3, 0], [4]]
    assert _prefill_buckets([50] * 4) == [[0, 1, 2, 3]]


def test_identical_prompts_are_computed_once(tiny_model, tokenizer):
    """A group's identical prompts take one row of the first pass; each copy still samples
    from its own random stream, and a row samples what it samples without the sharing."""
    from epo_cli.sampling.transformers import TransformersSampler

    same, other = tokenizer("the same opening")["input_ids"], tokenizer("another one, longer")["input_ids"]
    generations, first_pass = [], []
    for prompts in ([same, other], [same, same, same, other]):
        counter = FedTokens(tiny_model)
        sampler = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(1))
        generations.append(sampler.generate(prompts, 8, 1.0, 1.0))
        counter.handle.remove()
        first_pass.append(counter.passes[0])
    assert len(same) < len(other) <= 1.25 * (len(same) + len(other)) / 2  # alike: one prefill pass
    assert first_pass == [2 * len(other)] * 2  # two distinct prompts either way, left-padded to the longer
    counter = FedTokens(tiny_model)
    unshared = TransformersSampler(tiny_model, tokenizer, generator=torch.Generator().manual_seed(1), share_prompts=False)
    assert [g.token_ids for g in unshared.generate([same, same, same, other], 8, 1.0, 1.0)] == [g.token_ids for g in generations[1]]
    counter.handle.remove()
    assert counter.passes[0] == 4 * len(other)
    distinct, shared = generations
    assert shared[0].token_ids == distinct[0].token_ids  # row 0 draws the first seed in both batches
    assert torch.allclose(torch.tensor(shared[0].logprobs), torch.tensor(distinct[0].logprobs), atol=1e-5)
    assert len({tuple(g.token_ids) for g in shared[:3]}) > 1  # the copies diverge: their own streams
