"""The table of provider kinds: a pool's ``kind`` names its adapter class."""

from __future__ import annotations

import httpx

from broker._config import PoolConfig
from broker._errors import ConfigError
from workers.providers._base import Provider
from workers.providers.anthropic import AnthropicProvider
from workers.providers.azure import AzureOpenAIProvider
from workers.providers.bedrock import BedrockProvider
from workers.providers.gemini import GeminiProvider
from workers.providers.ollama import OllamaProvider
from workers.providers.openai import OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
    "azure": AzureOpenAIProvider,
    "bedrock": BedrockProvider,
    "gemini": GeminiProvider,
}


def make_provider(pool: PoolConfig, client: httpx.AsyncClient) -> Provider:
    """The adapter for ``pool.kind``, sharing the worker's HTTP ``client``."""
    try:
        cls = PROVIDERS[pool.kind]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigError(f"unknown provider kind {pool.kind!r} (known: {known})") from None
    return cls(pool, client)


def provider_features(kind: str) -> frozenset[str]:
    """The optional job features the adapter of ``kind`` maps (``Provider.features``)."""
    cls = PROVIDERS.get(kind)
    return cls.features if cls is not None else frozenset()
