"""A prefill for APIs that refuse one ending in whitespace (Anthropic Messages, Bedrock).

The continuation (``workers/_continuation.py``) hands an adapter the caller's
text to continue. Anthropic's API, and Bedrock's Converse for Anthropic models,
refuse a final assistant turn that ends in whitespace, so the adapter sends the
text without it (``TrailingWhitespace.sent``) and drops that whitespace again
from the start of the continuation (``skip``): the caller has it already. A
model that does not repeat it costs nothing: the caller's copy stands.
"""

from __future__ import annotations

__all__ = ["TrailingWhitespace"]


class TrailingWhitespace:
    """The whitespace cut off the end of a prefill, skipped once at the continuation's start."""

    def __init__(self, prefill: str | None) -> None:
        self.sent = prefill.rstrip() if prefill else ""
        self._left = (prefill or "")[len(self.sent) :]

    def skip(self, text: str) -> str:
        """``text`` (a delta of the continuation) without what the caller already has."""
        if not self._left:
            return text
        if self._left.startswith(text):
            self._left = self._left[len(text) :]
            return ""
        kept = text[len(self._left) :] if text.startswith(self._left) else text
        self._left = ""
        return kept
