"""The one small interface every provider adapter implements.

An adapter turns a job into an async iterator of ``StreamItem``:

    (TextDelta | ReasoningDelta | ToolCallDelta)*  (Malformed)*  Finish

It raises a ``ProviderError`` subclass (the tree in ``broker/_errors.py``) for
every upstream failure, translated from httpx at the boundary. The worker, not
the adapter, enforces time to first token and stream idle limits (it wraps
``__anext__`` in deadlines), decides retry vs failover, and publishes events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar, Protocol

import httpx
import msgspec
from msgspec import UNSET, UnsetType

from broker._config import PoolConfig
from broker._protocol import Job, TokenLogprob, ToolCallDelta, Usage


class TextDelta(msgspec.Struct, frozen=True):
    text: str
    logprobs: list[TokenLogprob] | None = None  # of ``text``'s tokens, when asked for
    # The provider events joined in it (``answer_items``): each about one token, which
    # is what a run counts when the provider reports no usage.
    tokens: int = 1
    # The ``Finish`` came in the same read, next: the run may send this text with its
    # ``done`` (``Done.final``), since nothing is left to wait for.
    last: bool = False


class ReasoningDelta(msgspec.Struct, frozen=True):
    """Reasoning ("thinking") text the model streams beside its answer."""

    text: str


class Malformed(msgspec.Struct, frozen=True):
    """An upstream event that could not be decoded: text may have been lost."""

    raw: str


class Finish(msgspec.Struct, frozen=True):
    reason: str
    usage: Usage | None = None
    # An embeddings job's vectors (``workers/providers/_embed.py``), packed for ``Done``.
    embeddings: list[str] | UnsetType = UNSET


# A fragment of a tool call is the wire's own ``ToolCallDelta`` (index, id, name, arguments).
StreamItem = TextDelta | ReasoningDelta | ToolCallDelta | Malformed | Finish


class Provider(Protocol):
    """What a provider kind implements. One instance per worker process.

    ``features``: the optional job features the adapter maps (the names
    ``broker._protocol.requested_features`` gives); a job asking for one that is
    not here is refused with ``bad_request`` naming it, never sent without it.
    """

    features: ClassVar[frozenset[str]]

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None: ...

    def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        """Call the provider for ``job`` with upstream ``model``; yield items as they arrive.

        ``prefill``: the start of the answer, which the provider is to continue (an
        assistant prefill); the items are then only what follows it.
        """
        ...
