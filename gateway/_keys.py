"""Bearer keys: which requests the gateway takes.

``gateway.api_keys`` (may be empty: no key asked for) are compared as SHA-256
digests with ``hmac.compare_digest`` against every configured key, so the time
taken says nothing about which key, or how much of one, matched. Keys are never
logged, and only their digests are kept.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from broker._config import Secret
from broker._errors import InvalidApiKey


class ApiKeys:
    """The configured keys, as digests; ``check`` refuses a request without one."""

    def __init__(self, keys: Iterable[Secret]) -> None:
        self._digests = [_digest(k.reveal()) for k in keys]

    def check(self, authorization: str) -> None:
        """Raise ``InvalidApiKey`` unless ``authorization`` bears a configured key (or none are)."""
        if not self._digests:
            return
        scheme, _, token = authorization.partition(" ")
        digest = _digest(token.strip())
        matched = False
        for key in self._digests:  # every key, always: the time says nothing about a match
            matched |= hmac.compare_digest(digest, key)
        if not (matched and scheme.lower() == "bearer"):
            raise InvalidApiKey("missing or incorrect API key: send `Authorization: Bearer <key>`")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
