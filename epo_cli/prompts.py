"""Prompt token ids of a turn, in either ``rollout.prompt_format``.

``windowed`` (the paper's): every turn's prompt is a fresh chat rendered
from :func:`~epo_cli.envs.base.build_prompt` and encoded by :func:`encode_prompt`.

``conversation``: one chat per episode, kept by a :class:`Conversation`. Turn 0's prompt
is the system and first user message; each later prompt is the previous prompt, the
previous response and the ids of the new user message with the generation prompt (the
chat template's delta, :func:`user_turn_ids`), concatenated, never re-tokenized, so a
prompt extends the one before token for token. A prompt that would exceed
``max_prompt_tokens`` starts a new segment: a fresh opening (system, task, actions so
far, the current observation). A segment is one token sequence: its last prompt plus its
last response holds every turn of it, which is what the packed update scores.
"""

from __future__ import annotations

from epo_cli.envs.base import PromptState, conversation_opening, conversation_turn

_SENTINEL_ANSWER = "\x00ANSWER\x00"
_SENTINEL_USER = "\x00USER\x00"


class PromptTooLong(ValueError):
    """A prompt exceeded rollout.max_prompt_tokens with rollout.on_overflow = error."""


def encode_prompt(tokenizer, messages: list[dict[str, str]], max_tokens: int, on_overflow: str) -> tuple[list[int], int]:
    """Chat-template token ids, and how many tokens were cut to fit ``max_tokens``.

    An overlong prompt loses its middle: the head (task) and the tail (current
    observation, admissible actions, answer format, generation prompt) are kept.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    overflow = len(ids) - max_tokens
    if overflow <= 0:
        return ids, 0
    if on_overflow == "error":
        raise PromptTooLong(f"a prompt of {len(ids)} tokens exceeds rollout.max_prompt_tokens={max_tokens}")
    head = max_tokens // 3
    return ids[:head] + ids[len(ids) - (max_tokens - head) :], overflow


def user_turn_template(tokenizer) -> tuple[str, str]:
    """The text the chat template puts between an assistant's answer and a new user
    message's content, and after that content up to the generation prompt: for ChatML
    ``("<|im_end|>\\n<|im_start|>user\\n", "<|im_end|>\\n<|im_start|>assistant\\n")``."""
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": _SENTINEL_ANSWER},
        {"role": "user", "content": _SENTINEL_USER},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(_SENTINEL_ANSWER) != 1 or text.count(_SENTINEL_USER) != 1:
        raise ValueError("rollout.prompt_format=conversation: the tokenizer's chat template does not render "
                         "assistant and user contents verbatim")
    between, after = text.split(_SENTINEL_ANSWER, 1)[1].split(_SENTINEL_USER, 1)
    return between, after


def user_turn_ids(tokenizer, template: tuple[str, str], content: str, response_ids: list[int]) -> list[int]:
    """The ids that follow an assistant response: the end of its turn, the user message
    ``content`` and the generation prompt (``template``: :func:`user_turn_template`). A
    response that already ends with the end-of-turn token (EOS; free sampling stops on
    it) does not get it twice."""
    between, after = template
    ids = tokenizer(between + content + after, add_special_tokens=False)["input_ids"]
    if response_ids and ids and response_ids[-1] == ids[0] == tokenizer.eos_token_id:
        ids = ids[1:]
    return ids


class Conversation:
    """One episode's chat as token ids (``rollout.prompt_format: conversation``).

    :meth:`prompt` gives a turn's prompt, :meth:`answer` records the response; ``segment``
    counts the segments started so far, minus one (the current segment's index).
    ``settings``: the episode's ``rollout.RolloutSettings`` (turns, prompt limit, overflow
    rule, listed actions)."""

    def __init__(self, tokenizer, env_title: str, settings):
        self.tokenizer = tokenizer
        self.env_title = env_title
        self.settings = settings
        self.template = user_turn_template(tokenizer)
        self.segment = -1
        self.ids: list[int] = []  # the current segment: its last prompt and, once answered, response
        self.last_response: list[int] | None = None

    def prompt(self, state: PromptState, turn: int) -> tuple[list[int], int]:
        """The prompt of ``turn`` and how many tokens were cut from it (only a segment's
        opening is ever cut: a continuation that does not fit opens a new segment)."""
        settings = self.settings
        if self.last_response is not None:
            content = conversation_turn(state, turn, settings.max_turns, settings.max_listed_actions)
            delta = user_turn_ids(self.tokenizer, self.template, content, self.last_response)
            if len(self.ids) + len(delta) <= settings.max_prompt_tokens:
                self.ids = self.ids + delta
                self.last_response = None
                return list(self.ids), 0
        self.segment += 1
        messages = conversation_opening(self.env_title, state, turn, settings.max_turns, settings.max_listed_actions)
        self.ids, cut = encode_prompt(self.tokenizer, messages, settings.max_prompt_tokens, settings.on_overflow)
        self.last_response = None
        return list(self.ids), cut

    def answer(self, response_ids: list[int]) -> None:
        """Record the response to the last prompt."""
        self.ids = self.ids + list(response_ids)
        self.last_response = list(response_ids)
