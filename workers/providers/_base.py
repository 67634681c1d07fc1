"""The one small interface every provider adapter implements.

An adapter turns a job into an async iterator of ``StreamItem``:

    TextDelta*  (Malformed)*  Finish

It raises a ``ProviderError`` subclass for every upstream failure, translated
from httpx at the boundary. The worker, not the adapter, enforces time to first
token and stream idle limits (it wraps ``__anext__`` in deadlines), decides
retry vs failover, and publishes events.

    ProviderError (RelayError)            code                     retryable
    ├── UpstreamConnectError              connect_error            yes
    ├── UpstreamUnavailable               upstream_unavailable     yes  (5xx, 408, overloaded)
    ├── RateLimited                       rate_limited             yes  (429; carries retry_after_s)
    ├── ProviderTimeout                   upstream_timeout         yes
    ├── AuthFailed                        auth_failed              failover, open circuit
    ├── ContextLengthExceeded             context_length_exceeded  only to a larger target
    ├── ContentFiltered                   content_filtered         no
    ├── UpstreamRejected                  bad_request              no   (other 4xx)
    └── StreamInterrupted                 stream_interrupted       yes  (cut, reset, no finish)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import RelayError
from broker._protocol import Job, Usage


class TextDelta(msgspec.Struct, frozen=True):
    text: str


class Malformed(msgspec.Struct, frozen=True):
    """An upstream event that could not be decoded: text may have been lost."""

    raw: str


class Finish(msgspec.Struct, frozen=True):
    reason: str
    usage: Usage | None = None


StreamItem = TextDelta | Malformed | Finish


class ProviderError(RelayError):
    """An upstream call failed. ``retryable``: worth trying again (here or elsewhere)."""

    code = "upstream_unavailable"
    retryable = True

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class UpstreamConnectError(ProviderError):
    """The provider could not be reached (refused, DNS, reset before headers)."""

    code = "connect_error"


class UpstreamUnavailable(ProviderError):
    """5xx, 408 or an 'overloaded' answer."""

    code = "upstream_unavailable"


class RateLimited(ProviderError):
    """429: ``retry_after_s`` holds the provider's Retry-After, if it sent one."""

    code = "rate_limited"


class ProviderTimeout(ProviderError):
    """No answer within a time limit."""

    code = "upstream_timeout"


class AuthFailed(ProviderError):
    """401/403: the pool is misconfigured."""

    code = "auth_failed"


class ContextLengthExceeded(ProviderError):
    """The prompt does not fit this model."""

    code = "context_length_exceeded"
    retryable = False


class ContentFiltered(ProviderError):
    """The provider refused the content."""

    code = "content_filtered"
    retryable = False


class UpstreamRejected(ProviderError):
    """Another 4xx: the request itself is bad, so trying elsewhere fails too."""

    code = "bad_request"
    retryable = False


class StreamInterrupted(ProviderError):
    """The stream broke, stalled or ended without its terminating event."""

    code = "stream_interrupted"


class Provider(Protocol):
    """What a provider kind implements. One instance per worker process."""

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None: ...

    def stream(self, job: Job, model: str) -> AsyncIterator[StreamItem]:
        """Call the provider for ``job`` with upstream ``model``; yield items as they arrive."""
        ...
