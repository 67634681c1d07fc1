"""Provider adapters, chosen by a pool's ``kind`` from one table.

``make_provider(pool, client)`` builds the adapter a worker uses; adding a
provider kind means adding one module and one entry to ``PROVIDERS``.
"""

from broker._errors import (
    AuthFailed,
    ContentFiltered,
    ContextLengthExceeded,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    StreamInterrupted,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.providers._base import (
    Finish,
    Malformed,
    Provider,
    ReasoningDelta,
    StreamItem,
    TextDelta,
)
from workers.providers._registry import PROVIDERS, make_provider
from workers.providers.anthropic import AnthropicProvider
from workers.providers.azure import AzureOpenAIProvider
from workers.providers.bedrock import BedrockProvider
from workers.providers.gemini import GeminiProvider
from workers.providers.ollama import OllamaProvider
from workers.providers.openai import OpenAIProvider

__all__ = [
    "PROVIDERS",
    "AnthropicProvider",
    "AuthFailed",
    "AzureOpenAIProvider",
    "BedrockProvider",
    "ContentFiltered",
    "ContextLengthExceeded",
    "Finish",
    "GeminiProvider",
    "Malformed",
    "OllamaProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "ProviderTimeout",
    "RateLimited",
    "ReasoningDelta",
    "StreamInterrupted",
    "StreamItem",
    "TextDelta",
    "UpstreamConnectError",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "make_provider",
]
