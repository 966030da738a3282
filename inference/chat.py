"""Keeping a chat inside the model's context: drop the oldest turns, never the system prompt.

A conversation grows by a user message and a reply per turn; once its templated tokens plus the
tokens to generate exceed the context, the oldest user/assistant turns go (a leading system message
stays) and the chat continues. `fit_conversation` is pure (it takes the token counter) so the rule
is tested without a model.
"""

from __future__ import annotations

from typing import Callable, Sequence

from inference.validate import InferenceError

Message = dict
TokenCounter = Callable[[Sequence[Message]], int]


class TurnTooLong(InferenceError):
    """The newest message alone (with the system prompt) does not fit the context."""


def _first_turn(messages: Sequence[Message]) -> int:
    """Index of the first message that may be dropped (after a leading system message)."""
    return 1 if messages and messages[0].get("role") == "system" else 0


def fit_conversation(messages: Sequence[Message], count_tokens: TokenCounter,
                     budget: int) -> tuple[list[Message], int]:
    """(the newest messages that fit in `budget` tokens, number of messages dropped).

    Drops whole turns from the front: a user message and everything up to the next user message
    (its reply). The last message (the new user message) and a leading system message are always
    kept; when even they do not fit, raises TurnTooLong.
    """
    kept = list(messages)
    first = _first_turn(kept)
    while count_tokens(kept) > budget:
        if len(kept) - first <= 1:  # only the newest message is left
            raise TurnTooLong(f"this message needs {count_tokens(kept)} tokens with the chat template, "
                              f"more than the {budget} the context leaves beside the reply; "
                              f"send a shorter one (or lower --max-new-tokens)")
        del kept[first]
        while len(kept) - first > 1 and kept[first].get("role") != "user":
            del kept[first]  # the rest of that turn: the reply
    return kept, len(messages) - len(kept)


def template_counter(tokenizer) -> TokenCounter:
    """Counts the tokens of `messages` as the model will see them (template + generation prompt)."""
    def count(messages: Sequence[Message]) -> int:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))
    return count


__all__ = ["fit_conversation", "template_counter", "TurnTooLong"]
