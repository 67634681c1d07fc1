"""Tool calls through the gateway, seen by the official `openai` SDK: real gateway, real
NATS, real workers, and a fake OpenAI-format provider that calls the tool it is offered
(``devstack/fake_provider``: the arguments are a sample of the tool's parameter schema).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

from broker import JobOptions
from broker._protocol import FunctionDef, Tool
from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import sample
from gateway import serve_gateway
from tests._harness import RelayStack, StartStack, upstream

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOKENS = 6


def expected_arguments(name: str) -> dict[str, Any]:
    return sample(WEATHER["function"]["parameters"], name)  # type: ignore[no-any-return]


@asynccontextmanager
async def sdk(
    relay_stack: StartStack, client_url: str, **route: Any
) -> AsyncIterator[tuple[RelayStack, openai.AsyncOpenAI]]:
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), max_retries=0),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), "anthropic"),
    }
    routes = {"chat": {"targets": [("a", "gpt"), ("b", "claude")], **route}}
    async with (
        relay_stack(pools, routes) as s,
        serve_gateway(s.config, nats_url=client_url) as base_url,
        openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client,
    ):
        yield s, client


async def test_a_streamed_tool_call_reaches_the_sdk_whole(
    relay_stack: StartStack, client_url: str
) -> None:
    async with sdk(relay_stack, client_url) as (s, client):
        stream = await client.chat.completions.create(
            model="chat",
            messages=ASK,
            tools=[WEATHER],
            stream=True,  # type: ignore[list-item]
        )
        calls: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for call in choice.delta.tool_calls or []:
                    seen = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                    seen["id"] += call.id or ""
                    seen["name"] += (call.function.name or "") if call.function else ""
                    seen["arguments"] += (call.function.arguments or "") if call.function else ""
        options = s.providers["a"].stats()["log"][0]["options"]
    [call] = calls.values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == expected_arguments("mock-a")
    assert finish == "tool_calls"
    assert options["tools"] == 1


async def test_a_two_turn_tool_loop_ends_in_the_answer(
    relay_stack: StartStack, client_url: str
) -> None:
    async with sdk(relay_stack, client_url) as (s, client):
        first = await client.chat.completions.create(
            model="chat",
            messages=ASK,
            tools=[WEATHER],  # type: ignore[arg-type, list-item]
        )
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
        [call] = message.tool_calls
        assert json.loads(call.function.arguments) == expected_arguments("mock-a")
        history: list[Any] = [
            *ASK,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        ]
        second = await client.chat.completions.create(
            model="chat",
            messages=history,
            tools=[WEATHER],  # type: ignore[list-item]
        )
        second_options = s.providers["a"].stats()["log"][1]["options"]
    assert second.choices[0].message.content == expected_answer("mock-a", TOKENS)
    assert second.choices[0].finish_reason == "stop"
    assert second_options.get("tool_results") == 1


async def test_a_stream_cut_mid_arguments_never_hands_over_half_a_call(
    relay_stack: StartStack, client_url: str
) -> None:
    """The primary breaks in the middle of the arguments: the caller gets whole tool
    calls only (the gateway holds them until the answer is done), the backup's."""
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), max_retries=0),
        "c": upstream(MockProvider(name="mock-c", tokens=TOKENS), max_retries=0),
    }
    routes = {"chat": [("a", "gpt+cut=2"), ("c", "gpt")]}
    async with (
        relay_stack(pools, routes) as s,
        serve_gateway(s.config, nats_url=client_url) as base_url,
        openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(
            model="chat",
            messages=ASK,
            tools=[WEATHER],
            stream=True,  # type: ignore[list-item]
        )
        pieces = [
            call.function.arguments or ""
            async for chunk in stream
            for choice in chunk.choices
            for call in choice.delta.tool_calls or []
            if call.function
        ]
    assert len(pieces) == 1  # one whole call, no fragments of the broken one
    assert json.loads(pieces[0]) == expected_arguments("mock-c")


async def test_tools_for_a_target_that_cannot_call_them_go_to_one_that_can(
    relay_stack: StartStack,
) -> None:
    """Route [Anthropic, OpenAI]: the tool job goes to the OpenAI pool, never to Anthropic."""
    claude, gpt = MockProvider(name="mock-b", tokens=4), MockProvider(name="mock-a", tokens=4)
    pools = {"b": upstream(claude, "anthropic"), "a": upstream(gpt)}
    tool = Tool(
        function=FunctionDef(name="get_weather", parameters=WEATHER["function"]["parameters"])
    )
    async with relay_stack(pools, {"chat": [("b", "claude"), ("a", "gpt")]}) as s:
        handle = await s.relay.submit("weather?", route="chat", options=JobOptions(tools=[tool]))
        await handle.text()
    assert handle.done is not None and handle.done.pool == "a"
    assert handle.done.finish_reason == "tool_calls"
    [call] = handle.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == expected_arguments("mock-a")
    assert claude.stats()["requests"] == 0


@pytest.mark.parametrize("choice", ["none"])
async def test_tool_choice_none_gives_text(
    relay_stack: StartStack, client_url: str, choice: str
) -> None:
    async with sdk(relay_stack, client_url) as (_, client):
        reply = await client.chat.completions.create(
            model="chat",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice=choice,  # type: ignore[arg-type]
        )
    assert reply.choices[0].message.content == expected_answer("mock-a", TOKENS)
    assert not reply.choices[0].message.tool_calls
