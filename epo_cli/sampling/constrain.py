"""Constrained decoding (``rollout.constrain: admissible``): every response is a
well-formed ``<think>...</think><action>A</action>`` answer whose action ``A`` is one of
the engine's admissible commands.

The response is generated as a small state machine over tokens:

1. ``<think>`` is forced; then up to ``think_tokens`` free tokens (the full vocabulary),
   until the text holds ``</think>``; if the budget runs out, ``</think>`` is forced.
2. ``<action>`` is forced.
3. The action walks a token trie over ``tokenize(A + "</action>")`` for every admissible
   ``A``: at each token only the children of the current node are allowed, and the
   response ends at a leaf.

End-of-sequence and ``</action>`` do not end a constrained response early: it ends at a
trie leaf, or when ``rollout.max_response_tokens`` cuts it (then it is an invalid turn,
counted in ``rollout/truncated_responses``); text the model writes inside the free think
block may still hold tags that spoil the answer.

Each token records the set it was drawn from (``None``: the full vocabulary). The sampler
draws from ``softmax(z / T)`` restricted to that set, and the trainer scores the same
restricted distribution, so PPO ratios, KL terms and entropies are those of the policy
that actually acted. A forced token (a set of one) has log-prob 0 and entropy 0 exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ACTION_OPEN = "<action>"
ACTION_CLOSE = "</action>"


class ActionTrie:
    """Token sequences of ``action + "</action>"`` for a set of actions, as nested dicts
    (an empty dict is a leaf: the response is complete)."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})


class ConstraintFactory:
    """Builds one :class:`ResponseConstraint` per turn from that turn's admissible
    actions; tokenizations are cached for the factory's life (one batch of episodes)."""

    def __init__(self, tokenizer, think_tokens: int = 0):
        self.tokenizer = tokenizer
        self.think_tokens = think_tokens
        self._encoded: dict[str, list[int]] = {}
        # With no room to think, the whole prefix is one forced sequence.
        self.prefix = self.encode(THINK_OPEN + THINK_CLOSE + ACTION_OPEN) if think_tokens == 0 else self.encode(THINK_OPEN)
        self.close_think = self.encode(THINK_CLOSE + ACTION_OPEN)

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._encoded[text]

    def trie(self, actions: Sequence[str]) -> ActionTrie:
        return ActionTrie([self.encode(" ".join(a.split()) + ACTION_CLOSE) for a in dict.fromkeys(actions)])

    def __call__(self, actions: Sequence[str]) -> ResponseConstraint:
        if not actions:
            raise ValueError("rollout.constrain: admissible needs the engine's admissible actions, and this turn has none")
        return ResponseConstraint(self, self.trie(actions))


class ResponseConstraint:
    """Which tokens the next response token may be, as the response is generated."""

    def __init__(self, factory: ConstraintFactory, trie: ActionTrie):
        self.factory = factory
        self.trie = trie
        self.forced: list[int] = list(factory.prefix)
        self.thinking = factory.think_tokens > 0
        self.think_ids: list[int] = []
        self.node: dict | None = None if self.thinking else trie.root
        self.done = False

    def allowed(self) -> list[int] | None:
        """The allowed next tokens, sorted; ``None`` for the full vocabulary."""
        if self.forced:
            return [self.forced[0]]
        if self.node is not None:
            return sorted(self.node)
        return None  # free thinking

    def advance(self, token: int) -> None:
        """Record the generated ``token`` and move to the next state."""
        if self.forced:
            self.forced.pop(0)
            if not self.forced and not self.thinking and self.node is None:
                self.node = self.trie.root
            return
        if self.node is not None:
            self.node = self.node[token]
            self.done = not self.node
            return
        self.think_ids.append(token)
        text = self.factory.tokenizer.decode(self.think_ids)
        if THINK_CLOSE in text:
            # The model closed its thought; force what <action> still lacks (its last
            # token may already hold the start of the tag, e.g. "><").
            after = text.split(THINK_CLOSE, 1)[1]
            missing = ACTION_OPEN[len(after) :] if ACTION_OPEN.startswith(after) else ACTION_OPEN
            self._start_action(self.factory.encode(missing) if missing else [])
        elif len(self.think_ids) >= self.factory.think_tokens:
            self._start_action(self.factory.close_think)

    def _start_action(self, forced: list[int]) -> None:
        self.thinking = False
        self.forced = list(forced)
        if not self.forced:
            self.node = self.trie.root
