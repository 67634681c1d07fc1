"""The table of provider kinds: a pool's ``kind`` names its adapter class."""

from __future__ import annotations

import httpx

from broker._config import PoolConfig
from broker._errors import ConfigError
from workers.providers._base import Provider
from workers.providers.anthropic import AnthropicProvider
from workers.providers.azure import AzureOpenAIProvider
from workers.providers.ollama import OllamaProvider
from workers.providers.openai import OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
    "azure": AzureOpenAIProvider,
}


def make_provider(pool: PoolConfig, client: httpx.AsyncClient) -> Provider:
    """The adapter for ``pool.kind``, sharing the worker's HTTP ``client``."""
    try:
        cls = PROVIDERS[pool.kind]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigError(f"unknown provider kind {pool.kind!r} (known: {known})") from None
    return cls(pool, client)
