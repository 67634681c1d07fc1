"""Reasoning ("thinking") text, streamed beside the answer and never inside it: each upstream
format's own shape (OpenAI-compatible ``reasoning_content``, Anthropic ``thinking`` blocks,
Ollama's ``message.thinking``) reaches the caller as reasoning, through ``RelayClient`` and
through the `openai` SDK against the gateway (``delta.reasoning_content``).

The fake provider streams ``expected_reasoning(N)`` before its answer for ``think=N``.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from broker import JobOptions, RequestFailed
from broker._protocol import Job, Message
from devstack import MockProvider, expected_answer, expected_reasoning
from devstack.fake_provider._answer import TOKEN_LOGPROB
from tests._harness import BEDROCK_KEYS, StartSdkStack, StartStack, upstream
from workers.providers.anthropic import request_body as anthropic_body

TOKENS = 5
KINDS = ["openai", "anthropic", "ollama", "bedrock", "gemini"]
AWS = BEDROCK_KEYS


def pool(mock: MockProvider, kind: str) -> Any:
    return upstream(mock, kind, **(AWS if kind == "bedrock" else {}))


@pytest.mark.parametrize("kind", KINDS)
async def test_reasoning_arrives_beside_the_answer(relay_stack: StartStack, kind: str) -> None:
    mock = MockProvider(name="mock-r", tokens=TOKENS)
    async with relay_stack({"r": pool(mock, kind)}, {"chat": [("r", "thinker+think=3")]}) as s:
        handle = await s.relay.submit("think first", route="chat")
        text = await handle.text()
    assert text == expected_answer("mock-r", TOKENS)
    assert handle.reasoning == expected_reasoning(3)


async def test_a_failed_attempt_s_reasoning_is_not_the_answer_s(relay_stack: StartStack) -> None:
    """The primary thinks, then breaks before any text; the backup's reasoning alone counts."""
    a, b = MockProvider(name="mock-a", tokens=TOKENS), MockProvider(name="mock-b", tokens=TOKENS)
    pools = {"a": upstream(a, max_retries=0), "b": upstream(b, "anthropic")}
    routes = {"chat": [("a", "gpt+think=4+cut=0"), ("b", "claude+think=2")]}
    async with relay_stack(pools, routes) as s:
        handle = await s.relay.submit("think first", route="chat")
        text = await handle.text()
    assert text == expected_answer("mock-b", TOKENS)
    assert handle.reasoning == expected_reasoning(2)
    assert a.stats()["requests"] == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_the_sdk_reads_reasoning_streamed_and_whole(
    sdk_stack: StartSdkStack, kind: str
) -> None:
    mock = MockProvider(name="mock-r", tokens=TOKENS)
    async with sdk_stack({"r": pool(mock, kind)}, {"chat": [("r", "thinker+think=3")]}) as (
        _,
        client,
    ):
        ask: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": "hm"}]}
        stream = await client.chat.completions.create(**ask, stream=True)
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(**ask)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == expected_reasoning(3)
    assert "".join(d.content or "" for d in deltas) == expected_answer("mock-r", TOKENS)
    message = whole.choices[0].message
    assert getattr(message, "reasoning_content", None) == expected_reasoning(3)
    assert message.content == expected_answer("mock-r", TOKENS)


async def test_reasoning_effort_is_an_anthropic_thinking_budget(relay_stack: StartStack) -> None:
    mock = MockProvider(name="mock-b", tokens=TOKENS)
    async with relay_stack({"b": upstream(mock, "anthropic")}, {"chat": [("b", "claude")]}) as s:
        options = JobOptions(reasoning_effort="low", max_tokens=100)
        handle = await s.relay.submit("think first", route="chat", options=options)
        text = await handle.text()
        [call] = mock.stats()["log"]
    assert text == expected_answer("mock-b", TOKENS)
    assert call["options"]["thinking"] == {"type": "enabled", "budget_tokens": 2048}


def test_the_thinking_budget_comes_on_top_of_the_answer_s_max_tokens() -> None:
    job = Job(
        id="j",
        route="chat",
        messages=[Message(role="user", content="hi")],
        reply_to="llm.reply.j",
        deadline_ms=0,
        reasoning_effort="high",
        max_tokens=300,
    )
    body = json.loads(anthropic_body(job, "claude"))
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 16384}
    assert body["max_tokens"] == 300 + 16384


async def test_logprobs_come_with_the_answer_s_tokens(relay_stack: StartStack) -> None:
    mock = MockProvider(name="mock-a", tokens=TOKENS)
    async with relay_stack({"a": upstream(mock)}, {"chat": [("a", "gpt")]}) as s:
        options = JobOptions(logprobs=True, top_logprobs=2)
        handle = await s.relay.submit("how sure?", route="chat", options=options)
        text = await handle.text()
        [call] = mock.stats()["log"]
    assert text == expected_answer("mock-a", TOKENS)
    assert "".join(entry.token for entry in handle.logprobs) == text
    assert {entry.logprob for entry in handle.logprobs} == {TOKEN_LOGPROB}
    assert [len(entry.top_logprobs) for entry in handle.logprobs] == [2] * TOKENS
    assert call["options"]["logprobs"] == 2


async def test_logprobs_go_to_a_target_that_reports_them(relay_stack: StartStack) -> None:
    """Route [Anthropic, OpenAI]: Anthropic reports no logprobs, so the job goes to OpenAI;
    with Anthropic alone it is refused by name, never answered without them."""
    claude, gpt = MockProvider(name="mock-b", tokens=TOKENS), MockProvider(name="mock-a")
    pools = {"b": upstream(claude, "anthropic"), "a": upstream(gpt)}
    routes = {"chat": [("b", "claude"), ("a", "gpt")], "solo": [("b", "claude")]}
    async with relay_stack(pools, routes) as s:
        options = JobOptions(logprobs=True)
        handle = await s.relay.submit("how sure?", route="chat", options=options)
        await handle.text()
        with pytest.raises(RequestFailed) as caught:
            await (await s.relay.submit("how sure?", route="solo", options=options)).text()
    assert handle.done is not None and handle.done.pool == "a"
    assert handle.logprobs
    assert caught.value.code == "bad_request" and "logprobs" in caught.value.message
    assert claude.stats()["requests"] == 0


async def test_reasoning_effort_is_a_gemini_thinking_budget(relay_stack: StartStack) -> None:
    mock = MockProvider(name="mock-g", tokens=TOKENS)
    async with relay_stack({"g": upstream(mock, "gemini")}, {"chat": [("g", "gemini")]}) as s:
        options = JobOptions(reasoning_effort="medium")
        handle = await s.relay.submit("think first", route="chat", options=options)
        text = await handle.text()
        [call] = mock.stats()["log"]
    assert text == expected_answer("mock-g", TOKENS)
    assert call["options"]["thinking_config"] == {"thinkingBudget": 8192, "includeThoughts": True}


async def test_the_sdk_gets_logprobs_streamed_and_whole(sdk_stack: StartSdkStack) -> None:
    mock = MockProvider(name="mock-a", tokens=TOKENS)
    async with sdk_stack({"a": upstream(mock)}, {"chat": [("a", "gpt")]}) as (_, client):
        ask: dict[str, Any] = {
            "model": "chat",
            "messages": [{"role": "user", "content": "how sure?"}],
            "logprobs": True,
            "top_logprobs": 3,
        }
        chunks = [c async for c in await client.chat.completions.create(**ask, stream=True)]
        whole = await client.chat.completions.create(**ask)
        plain = await client.chat.completions.create(model="chat", messages=ask["messages"])
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or ()]  # fmt: skip
    assert "".join(e.token for e in streamed) == expected_answer("mock-a", TOKENS)
    assert [len(e.top_logprobs) for e in streamed] == [3] * TOKENS
    assert whole.choices[0].logprobs is not None
    content = whole.choices[0].logprobs.content or []
    assert [(e.token, e.logprob) for e in content] == [(e.token, e.logprob) for e in streamed]
    assert plain.choices[0].logprobs is None


async def test_a_restart_after_reasoning_was_streamed_is_an_error_not_a_mix(
    sdk_stack: StartSdkStack,
) -> None:
    """The primary streams its reasoning, then breaks before any text; the gateway has sent
    that reasoning, so the stream ends with ``stream_interrupted`` rather than going on with
    the backup's reasoning after it. Through NATS the backup's answer stands alone."""
    a, b = MockProvider(name="mock-a", tokens=TOKENS), MockProvider(name="mock-b", tokens=TOKENS)
    pools = {"a": upstream(a, max_retries=0), "b": upstream(b)}
    routes = {"chat": [("a", "gpt+think=2+cut=0"), ("b", "gpt+think=2")]}
    async with sdk_stack(pools, routes) as (_, client):
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hm"}], stream=True
        )
        seen: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                seen += [getattr(c.delta, "reasoning_content", None) or "" for c in chunk.choices]
        whole = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hm"}]
        )
    assert "".join(seen) == expected_reasoning(2)
    assert caught.value.code == "stream_interrupted"
    assert whole.choices[0].message.content == expected_answer("mock-b", TOKENS)
    assert getattr(whole.choices[0].message, "reasoning_content", None) == expected_reasoning(2)
