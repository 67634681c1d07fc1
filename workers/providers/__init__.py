"""Provider adapters, chosen by a pool's ``kind`` from one table.

``make_provider(pool, client)`` builds the adapter a worker uses; adding a
provider kind means adding one module and one entry to ``PROVIDERS``.
"""

from __future__ import annotations

import httpx

from broker._config import PoolConfig
from broker._errors import ConfigError
from workers.providers._base import (
    AuthFailed,
    ContentFiltered,
    ContextLengthExceeded,
    Finish,
    Malformed,
    Provider,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    StreamInterrupted,
    StreamItem,
    TextDelta,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.providers.anthropic import AnthropicProvider
from workers.providers.ollama import OllamaProvider
from workers.providers.openai import OpenAIProvider

__all__ = [
    "PROVIDERS",
    "AnthropicProvider",
    "AuthFailed",
    "ContentFiltered",
    "ContextLengthExceeded",
    "Finish",
    "Malformed",
    "OllamaProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "ProviderTimeout",
    "RateLimited",
    "StreamInterrupted",
    "StreamItem",
    "TextDelta",
    "UpstreamConnectError",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "make_provider",
]

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
}


def make_provider(pool: PoolConfig, client: httpx.AsyncClient) -> Provider:
    """The adapter for ``pool.kind``, sharing the worker's HTTP ``client``."""
    try:
        cls = PROVIDERS[pool.kind]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigError(f"unknown provider kind {pool.kind!r} (known: {known})") from None
    return cls(pool, client)
