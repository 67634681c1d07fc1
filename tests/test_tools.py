"""Tool calls through the gateway, seen by the official `openai` SDK: real gateway, real
NATS, real workers, and a fake OpenAI-format provider that calls the tool it is offered
(``devstack/fake_provider``: the arguments are a sample of the tool's parameter schema).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker._protocol import FunctionCall, FunctionDef, Job, Message, Tool, ToolCall
from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import sample
from tests._harness import StartSdkStack, Upstream, streamed_tool_calls, upstream
from workers.providers.anthropic import request_body as anthropic_body

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


def pair() -> tuple[dict[str, Upstream], dict[str, Any]]:
    """Pools and routes: route ``chat`` is pool a (OpenAI format), then pool b (Anthropic)."""
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), max_retries=0),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), "anthropic"),
    }
    return pools, {"chat": [("a", "gpt"), ("b", "claude")]}


async def test_a_streamed_tool_call_reaches_the_sdk_whole(sdk_stack: StartSdkStack) -> None:
    async with sdk_stack(*pair()) as (s, client):
        calls, finish = await streamed_tool_calls(
            client, model="chat", messages=ASK, tools=[WEATHER]
        )
        options = s.providers["a"].stats()["log"][0]["options"]
    [call] = calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == expected_arguments("mock-a")
    assert finish == "tool_calls"
    assert options["tools"] == 1


async def test_a_two_turn_tool_loop_ends_in_the_answer(sdk_stack: StartSdkStack) -> None:
    async with sdk_stack(*pair()) as (s, client):
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
    sdk_stack: StartSdkStack,
) -> None:
    """The primary breaks in the middle of the arguments: the caller gets whole tool
    calls only (the gateway holds them until the answer is done), the backup's."""
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), max_retries=0),
        "c": upstream(MockProvider(name="mock-c", tokens=TOKENS), max_retries=0),
    }
    routes = {"chat": [("a", "gpt+cut=2"), ("c", "gpt")]}
    async with sdk_stack(pools, routes) as (_, client):
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


@pytest.mark.parametrize("choice", ["none"])
async def test_tool_choice_none_gives_text(sdk_stack: StartSdkStack, choice: str) -> None:
    async with sdk_stack(*pair()) as (_, client):
        reply = await client.chat.completions.create(
            model="chat",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice=choice,  # type: ignore[arg-type]
        )
    assert reply.choices[0].message.content == expected_answer("mock-a", TOKENS)
    assert not reply.choices[0].message.tool_calls


def test_anthropic_gets_tools_and_tool_turns_in_its_own_shape() -> None:
    """What the Anthropic adapter sends for a tool loop's second turn."""
    call = ToolCall(
        id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}')
    )
    job = Job(
        id="j",
        route="chat",
        reply_to="llm.reply.j",
        deadline_ms=0,
        messages=[
            Message(role="user", content="Weather?"),
            Message(role="assistant", tool_calls=[call]),
            Message(role="tool", tool_call_id="call_1", content='{"sky":"clear"}'),
            Message(role="tool", tool_call_id="call_2", content='{"sky":"grey"}'),
        ],
        tools=[Tool(function=FunctionDef(name="get_weather", parameters={"type": "object"}))],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    body = json.loads(anthropic_body(job, "claude"))
    assert body["tools"] == [{"name": "get_weather", "input_schema": {"type": "object"}}]
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}
        ],
    }
    # Two tool results answer one assistant message: one user turn, two blocks.
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": '{"sky":"clear"}'},
            {"type": "tool_result", "tool_use_id": "call_2", "content": '{"sky":"grey"}'},
        ],
    }


async def test_an_anthropic_tool_use_reaches_the_openai_sdk_as_a_tool_call(
    sdk_stack: StartSdkStack,
) -> None:
    """Tools offered in OpenAI's words, answered by an Anthropic upstream's tool_use
    (input_json_delta fragments), and the tool result sent back as Anthropic's block."""
    mock = MockProvider(name="mock-b", tokens=TOKENS)
    stack = sdk_stack({"b": upstream(mock, "anthropic")}, {"chat": [("b", "claude")]})
    async with stack as (s, client):
        stream = await client.chat.completions.create(
            model="chat",
            messages=ASK,
            tools=[WEATHER],
            stream=True,  # type: ignore[list-item]
        )
        calls = [
            call
            async for chunk in stream
            for choice in chunk.choices
            for call in choice.delta.tool_calls or []
        ]
        [call] = calls
        assert call.function is not None and call.id is not None
        history: list[Any] = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}
            ]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        ]  # fmt: skip
        answer = await client.chat.completions.create(
            model="chat",
            messages=history,
            tools=[WEATHER],  # type: ignore[list-item]
        )
        log = s.providers["b"].stats()["log"]
    assert call.function.name == "get_weather" and call.id.startswith("toolu_")
    assert json.loads(call.function.arguments or "") == expected_arguments("mock-b")
    assert answer.choices[0].message.content == expected_answer("mock-b", TOKENS)
    assert log[1]["options"].get("tool_results") == 1


async def test_an_ollama_tool_call_reaches_the_openai_sdk_and_the_result_goes_back(
    sdk_stack: StartSdkStack,
) -> None:
    """Ollama sends a call whole (arguments as an object, no id): the SDK gets a normal
    tool call with an id, and the tool result goes back with the tool's name."""
    mock = MockProvider(name="mock-o", tokens=TOKENS)
    stack = sdk_stack({"o": upstream(mock, "ollama")}, {"chat": [("o", "llama3.1")]})
    async with stack as (s, client):
        first = await client.chat.completions.create(
            model="chat",
            messages=ASK,
            tools=[WEATHER],  # type: ignore[arg-type, list-item]
        )
        message = first.choices[0].message
        assert message.tool_calls
        [call] = message.tool_calls
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
        log = s.providers["o"].stats()["log"]
    assert first.choices[0].finish_reason == "tool_calls" and call.id
    assert json.loads(call.function.arguments) == expected_arguments("mock-o")
    assert second.choices[0].message.content == expected_answer("mock-o", TOKENS)
    assert log[1]["options"].get("tool_results") == 1
