"""The deterministic answer a fake provider streams, so a test can assert every byte.

``"Hello from <name>."`` and then NATO words, one token per streamed delta: a
test that knows the provider's name and token count knows the whole answer,
and an answer that names its provider shows which pool served a request.

The words do not depend on the name, so one mock can continue another's
answer from an assistant prefill (``prefilled_tokens``, ``continuation``): a
backup that is sent the first k tokens of mock A's answer streams the rest of
it, and prefill plus continuation is A's full answer, byte for byte.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec

__all__ = [
    "DEFAULT_TOKENS",
    "answer_tokens",
    "continuation",
    "expected_answer",
    "expected_reasoning",
    "json_tokens",
    "prefilled_tokens",
    "reasoning_tokens",
    "token_logprob",
]

DEFAULT_TOKENS = 16
_NATO = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
)
_WORDS = _NATO.split()
_GREETING = "Hello from "


def _word(i: int) -> str:
    """Token ``i`` (``i >= 1``) of every answer: the same whatever the provider's name."""
    return f" {_WORDS[(i * 7 + 3) % len(_WORDS)]}"


@lru_cache(maxsize=1024)
def answer_tokens(name: str, tokens: int) -> tuple[str, ...]:
    """The streamed deltas, in order: ``"Hello from <name>."`` then one word each."""
    return (f"{_GREETING}{name}.", *map(_word, range(1, tokens))) if tokens > 0 else ()


def expected_answer(name: str, tokens: int) -> str:
    """The full text a mock provider called ``name`` streams for ``tokens`` tokens."""
    return "".join(answer_tokens(name, tokens))


@lru_cache(maxsize=256)
def reasoning_tokens(tokens: int) -> tuple[str, ...]:
    """The reasoning ("thinking") deltas a ``think=N`` fault streams before the answer."""
    return tuple(f"Thought {i + 1}. " for i in range(tokens))


def expected_reasoning(tokens: int) -> str:
    """The reasoning text of ``think=tokens``."""
    return "".join(reasoning_tokens(tokens))


# Every answer token is said to have this log probability; the k-th alternative a lower one.
TOKEN_LOGPROB = -0.25


def token_logprob(token: str, top: int) -> dict[str, Any]:
    """The log probability entry of ``token`` with ``top`` alternatives, in OpenAI's shape."""
    alternatives = [(token, TOKEN_LOGPROB)] + [(f" alt{k}", -1.0 - k) for k in range(1, top)]
    return {
        "token": token,
        "logprob": TOKEN_LOGPROB,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in alternatives[:top]
        ],
    }


@lru_cache(maxsize=1024)
def json_tokens(name: str, tokens: int) -> tuple[bytes, ...]:
    """The deltas as JSON strings, encoded once per (name, tokens) for the hot path."""
    return tuple(msgspec.json.encode(t) for t in answer_tokens(name, tokens))


def _greeting_end(prefill: str) -> int | None:
    """Where a mock's greeting ends in ``prefill``: after its first ``.`` that ends the
    text or precedes a space (so a dotted name like ``mock.a`` still reads as one)."""
    if not prefill.startswith(_GREETING):
        return None
    dot = prefill.find(".", len(_GREETING))
    while dot != -1 and dot + 1 < len(prefill) and prefill[dot + 1] != " ":
        dot = prefill.find(".", dot + 1)
    return None if dot == -1 else dot + 1


def prefilled_tokens(prefill: str) -> int:
    """How many tokens of a mock's answer ``prefill`` already holds: the index to go on at.

    0 for an empty prefill; k when it is some mock's greeting and then exactly words
    1..k-1; 1 for any other (foreign) text, which the mock follows with its words.
    """
    if not prefill:
        return 0
    end = _greeting_end(prefill)
    if end is None:
        return 1
    held, at = 1, end
    while at < len(prefill):
        word = _word(held)
        if not prefill.startswith(word, at):
            return 1
        held, at = held + 1, at + len(word)
    return held


def continuation(name: str, prefill: str, tokens: int) -> str:
    """The text a mock called ``name`` with a ``tokens``-token answer streams after ``prefill``."""
    return "".join(answer_tokens(name, tokens)[prefilled_tokens(prefill) :])
