"""Azure OpenAI: the OpenAI chat-completions wire format behind Azure's URLs and key.

``POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version=V``
with the key in an ``api-key`` header (Azure's resource keys; an Entra ID token
goes in the pool's ``headers`` as ``authorization`` instead). An Azure
target's ``model`` is the deployment's name, as the Azure portal shows it; the
``api-version`` is the pool's ``api_version`` (default ``AZURE_API_VERSION``).
Requests, streamed chunks, usage and error bodies are OpenAI's (``openai.py``);
Azure's content-filter annotations on chunks are ignored, and its
``content_filter`` errors map to ``content_filtered``.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from broker._config import AZURE_API_VERSION, PoolConfig
from workers.providers._http import join_url
from workers.providers.openai import OpenAIProvider


class AzureOpenAIProvider(OpenAIProvider):
    """Adapter for ``kind: azure`` pools."""

    kind = "azure"

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        super().__init__(pool, client)
        self._api_version = quote(pool.api_version or AZURE_API_VERSION, safe="")

    def _auth(self, pool: PoolConfig) -> dict[str, str]:
        return {"api-key": pool.api_key.reveal()} if pool.api_key else {}

    def _url(self, model: str, path: str = "/chat/completions") -> str:
        path = f"/openai/deployments/{quote(model, safe='')}{path}"
        return join_url(self._base_url, path) + f"?api-version={self._api_version}"
