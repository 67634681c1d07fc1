"""Azure OpenAI pools (``kind: azure``): the OpenAI wire format behind Azure's URLs and key.

A real worker against the fake provider, which answers Azure's paths like Azure
does: 401 without an ``api-key`` header, 404 without ``?api-version=``.
"""

from __future__ import annotations

import pytest

from broker import RequestFailed
from broker._config import AZURE_API_VERSION, ConfigError
from devstack import MockProvider, expected_answer
from tests._builders import make_config
from tests._harness import StartStack, upstream

TOKENS = 5


async def test_an_azure_deployment_answers_through_its_url_and_key(
    relay_stack: StartStack,
) -> None:
    pools = {"az": upstream(MockProvider(name="azure", tokens=TOKENS), "azure")}
    async with relay_stack(pools, {"chat": [("az", "gpt-4o-prod")]}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
        [call] = s.providers["az"].stats()["log"]
    assert text == expected_answer("azure", TOKENS)
    assert handle.done is not None and handle.done.model == "gpt-4o-prod"
    assert handle.done.usage.completion_tokens == TOKENS  # streamed usage came
    path = "/openai/deployments/gpt-4o-prod/chat/completions"
    assert call["path"] == f"{path}?api-version={AZURE_API_VERSION}"
    assert call["status"] == 200


async def test_the_pools_api_version_is_sent(relay_stack: StartStack) -> None:
    mock = MockProvider(name="azure", tokens=TOKENS)
    pools = {"az": upstream(mock, "azure", api_version="2025-01-01-preview")}
    async with relay_stack(pools, {"chat": [("az", "dep")]}) as s:
        await (await s.relay.submit("hi", route="chat")).text()
        [call] = mock.stats()["log"]
    assert call["path"].endswith("?api-version=2025-01-01-preview")


async def test_an_azure_pool_without_a_key_is_refused_as_auth_failed(
    relay_stack: StartStack,
) -> None:
    pools = {"az": upstream(MockProvider(name="azure", tokens=TOKENS), "azure", api_key=None)}
    async with relay_stack(pools, {"chat": [("az", "dep")]}) as s:
        with pytest.raises(RequestFailed) as caught:
            await (await s.relay.submit("hi", route="chat")).text()
    assert caught.value.code == "all_providers_failed"
    assert [a.code for a in caught.value.attempts] == ["auth_failed"]


def test_api_version_belongs_to_azure_pools_only() -> None:
    with pytest.raises(ConfigError, match="only kind azure takes an api-version"):
        make_config({"a": {"kind": "openai", "api_version": "2024-10-21"}}, {})
