"""The fake provider answers Anthropic Messages requests that offer tools with ``tool_use``.

Over real HTTP through httpx, the exact wire shapes: one ``tool_use`` block for
the tool ``tool_choice`` names, else the first, with an ``input`` its
``input_schema`` accepts (``sample``), streamed as ``input_json_delta``
fragments that are the plan's tokens, so faults cut mid-input. ``{"type":
"none"}``, or a ``tool_result`` in the last user message, gets the text answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import sample
from workers.providers._sse import SSEEvent, SSEParser

pytestmark = pytest.mark.anyio

NAME = "mock-claude-tools"
TOKENS = 4
MESSAGES = "/v1/messages"
WEATHER: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME: dict[str, object] = {
    "type": "object",
    "properties": {"zone": {"type": "string"}, "offset": {"type": "integer"}},
}
TOOLS = [
    {"name": "get_weather", "description": "Weather", "input_schema": WEATHER},
    {"name": "get_time", "input_schema": TIME},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name=NAME, tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url) as http:
        yield http


def body(model: str = "claude", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 256, "messages": ASK, "tools": TOOLS,
            "stream": stream, **extra}  # fmt: skip


def compact(document: Any) -> str:
    return msgspec.json.encode(document).decode()


def decoded(events: list[SSEEvent]) -> list[tuple[str, dict[str, Any]]]:
    return [(e.event, msgspec.json.decode(e.data)) for e in events]


async def stream_events(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    response = await client.post(MESSAGES, json=payload)
    assert response.status_code == 200
    parser = SSEParser()
    return decoded(parser.feed(response.content) + parser.close())


async def test_a_streamed_tool_use_has_anthropic_s_wire_shape(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, body())
    names = [name for name, _ in events]
    deltas = ["content_block_delta"] * TOKENS
    assert names == ["message_start", "content_block_start", "ping", *deltas,
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["content"] == []
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "toolu_mock1", "name": "get_weather",
                          "input": {}},
    }  # fmt: skip
    fragments = [data for _, data in events[3 : 3 + TOKENS]]
    assert {(f["index"], f["delta"]["type"]) for f in fragments} == {(0, "input_json_delta")}
    joined = "".join(f["delta"]["partial_json"] for f in fragments)
    assert joined == compact(sample(WEATHER, NAME))
    assert msgspec.json.decode(joined) == {"city": f"from {NAME}", "unit": "celsius"}
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": TOKENS},
    }


async def test_a_whole_answer_is_one_tool_use_block(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    response = await client.post(MESSAGES, json=body(stream=False))
    message = response.json()
    assert message["content"] == [
        {"type": "tool_use", "id": "toolu_mock1", "name": "get_weather",
         "input": sample(WEATHER, NAME)}
    ]  # fmt: skip
    assert message["stop_reason"] == "tool_use"
    assert message["usage"]["output_tokens"] == TOKENS
    assert mock.stats()["log"][0]["options"] == {"tools": 2}


async def test_tool_choice_naming_the_second_tool_calls_it(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    choice = {"type": "tool", "name": "get_time"}
    response = await client.post(MESSAGES, json=body(stream=False, tool_choice=choice))
    [block] = response.json()["content"]
    assert (block["name"], block["input"]) == ("get_time", {"zone": f"from {NAME}", "offset": 1})
    assert mock.stats()["log"][0]["options"] == {"tools": 2, "tool_choice": choice}


async def test_tool_choice_any_calls_the_first_tool(client: httpx.AsyncClient) -> None:
    response = await client.post(MESSAGES, json=body(stream=False, tool_choice={"type": "any"}))
    assert [b["name"] for b in response.json()["content"]] == ["get_weather"]


async def test_tool_choice_none_answers_in_words(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    choice = {"type": "none"}
    message = (await client.post(MESSAGES, json=body(stream=False, tool_choice=choice))).json()
    assert message["content"] == [{"type": "text", "text": expected_answer(NAME, TOKENS)}]
    assert message["stop_reason"] == "end_turn"
    assert mock.stats()["log"][0]["options"] == {"tools": 2, "tool_choice": choice}


async def test_a_tool_result_gets_the_text_answer_closing_the_loop(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    first = (await client.post(MESSAGES, json=body(stream=False))).json()
    [call] = first["content"]
    result = {"type": "tool_result", "tool_use_id": call["id"], "content": '{"temp_c": 21}'}
    turns = [*ASK, {"role": "assistant", "content": first["content"]},
             {"role": "user", "content": [result]}]  # fmt: skip
    events = await stream_events(client, body(messages=turns))
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == expected_answer(NAME, TOKENS)
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert mock.stats()["log"][1]["options"] == {"tools": 2, "tool_results": 1}


async def test_cut_ends_the_stream_mid_input(client: httpx.AsyncClient) -> None:
    parser, events = SSEParser(), []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", MESSAGES, json=body("claude+cut=2")) as response:
            async for data in response.aiter_bytes():
                events += parser.feed(data)
    names = [e.event for e in events]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta"]  # fmt: skip
    partial = "".join(d["delta"]["partial_json"] for _, d in decoded(events[3:]))
    full = compact(sample(WEATHER, NAME))
    assert partial and full.startswith(partial) and partial != full


async def test_max_tokens_stops_the_tool_use_with_max_tokens(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, body(max_tokens=1))
    [fragment] = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert compact(sample(WEATHER, NAME)).startswith(fragment)
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
