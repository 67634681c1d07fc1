"""The deterministic answer a fake provider streams, so a test can assert every byte.

``"Hello from <name>."`` and then NATO words, one token per streamed delta: a
test that knows the provider's name and token count knows the whole answer,
and an answer that names its provider shows which pool served a request.
"""

from __future__ import annotations

from functools import lru_cache

import msgspec

__all__ = ["DEFAULT_TOKENS", "answer_tokens", "expected_answer", "json_tokens"]

DEFAULT_TOKENS = 16
_NATO = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
)
_WORDS = _NATO.split()


@lru_cache(maxsize=1024)
def answer_tokens(name: str, tokens: int) -> tuple[str, ...]:
    """The streamed deltas, in order: ``"Hello from <name>."`` then one word each."""
    words = (f" {_WORDS[(i * 7 + 3) % len(_WORDS)]}" for i in range(1, tokens))
    return (f"Hello from {name}.", *words) if tokens > 0 else ()


def expected_answer(name: str, tokens: int) -> str:
    """The full text a mock provider called ``name`` streams for ``tokens`` tokens."""
    return "".join(answer_tokens(name, tokens))


@lru_cache(maxsize=1024)
def json_tokens(name: str, tokens: int) -> tuple[bytes, ...]:
    """The deltas as JSON strings, encoded once per (name, tokens) for the hot path."""
    return tuple(msgspec.json.encode(t) for t in answer_tokens(name, tokens))
