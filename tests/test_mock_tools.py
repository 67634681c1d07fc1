"""The fake provider answers OpenAI-format requests that offer tools with a tool call.

Over real HTTP, through httpx (the exact wire shapes) and the official OpenAI SDK
(what a client reassembles): one call to the tool ``tool_choice`` names, else the
first, with arguments the tool's schema accepts (``tool_arguments``), streamed
as argument fragments that are the plan's tokens, so faults cut mid-arguments.
After a ``tool`` result message the answer is text, so a two-turn loop ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import tool_arguments
from workers.providers._sse import SSEEvent, SSEParser

pytestmark = pytest.mark.anyio

NAME = "mock-tools"
TOKENS = 4
OPENAI = "/v1/chat/completions"
WEATHER: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME: dict[str, object] = {
    "type": "object",
    "properties": {"zone": {"type": "string"}, "offset": {"type": "integer"}},
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name=NAME, tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url) as http:
        yield http


@pytest.fixture
async def sdk(mock: MockProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def body(model: str = "m", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "messages": ASK, "tools": TOOLS, "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return {**out, **extra}


def chunks_of(events: list[SSEEvent]) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e.data) for e in events if e.data != "[DONE]"]


async def stream_events(client: httpx.AsyncClient, payload: dict[str, Any]) -> list[SSEEvent]:
    response = await client.post(OPENAI, json=payload)
    assert response.status_code == 200
    parser = SSEParser()
    return parser.feed(response.content) + parser.close()


def test_tool_arguments_are_compact_json_the_schema_accepts() -> None:
    assert tool_arguments(WEATHER, NAME) == '{"city":"from mock-tools","unit":"celsius"}'
    assert tool_arguments(None, NAME) == "{}"


async def test_a_streamed_tool_call_has_openai_s_wire_shape(client: httpx.AsyncClient) -> None:
    chunks = chunks_of(await stream_events(client, body()))
    assert chunks[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_mock1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    }
    fragments = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert len(fragments) == TOKENS
    shapes = {(tuple(f), tuple(f["tool_calls"][0])) for f in fragments}
    assert shapes == {(("tool_calls",), ("index", "function"))}
    arguments = "".join(f["tool_calls"][0]["function"]["arguments"] for f in fragments)
    assert arguments == tool_arguments(WEATHER, NAME)
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS


async def test_the_sdk_reassembles_a_streamed_tool_call(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=ASK,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    ids, names, arguments, reasons, fragments = set(), "", "", [], 0
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        reasons.append(chunk.choices[0].finish_reason)
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.index == 0
            ids |= {call.id} if call.id else set()
            names += call.function.name or "" if call.function else ""
            fragment = call.function.arguments or "" if call.function else ""
            fragments += bool(fragment)
            arguments += fragment
    assert ids == {"call_mock1"} and names == "get_weather"
    assert json.loads(arguments) == {"city": f"from {NAME}", "unit": "celsius"}
    assert reasons[-1] == "tool_calls"
    assert usage is not None and usage.completion_tokens == fragments == TOKENS


async def test_a_whole_answer_carries_the_call_in_message_tool_calls(
    sdk: openai.AsyncOpenAI,
) -> None:
    whole = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=ASK,
        tools=TOOLS,
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    [call] = choice.message.tool_calls or []
    assert call.id == "call_mock1" and call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == tool_arguments(WEATHER, NAME)
    assert whole.usage is not None and whole.usage.completion_tokens == TOKENS


async def test_tool_choice_naming_the_second_tool_calls_it(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    response = await client.post(OPENAI, json=body(stream=False, tool_choice=choice))
    [call] = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": tool_arguments(TIME, NAME)}
    assert json.loads(call["function"]["arguments"]) == {"zone": f"from {NAME}", "offset": 1}
    assert mock.stats()["log"][0]["options"] == {"tools": 2, "tool_choice": choice}


async def test_tool_choice_required_calls_the_first_tool(client: httpx.AsyncClient) -> None:
    response = await client.post(OPENAI, json=body(stream=False, tool_choice="required"))
    [call] = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


async def test_tool_choice_none_answers_in_words(
    mock: MockProvider, sdk: openai.AsyncOpenAI
) -> None:
    whole = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=ASK,
        tools=TOOLS,
        tool_choice="none",
    )
    assert whole.choices[0].message.content == expected_answer(NAME, TOKENS)
    assert whole.choices[0].message.tool_calls is None
    assert whole.choices[0].finish_reason == "stop"
    assert mock.stats()["log"][0]["options"] == {"tools": 2, "tool_choice": "none"}


async def test_a_tool_result_gets_the_text_answer_closing_the_loop(
    mock: MockProvider, sdk: openai.AsyncOpenAI
) -> None:
    first = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=ASK,
        tools=TOOLS,
    )
    [call] = first.choices[0].message.tool_calls or []
    turn: Any = first.choices[0].message.model_dump(exclude_none=True)
    result: ChatCompletionMessageParam = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": '{"temp_c": 21}',
    }
    second = await sdk.chat.completions.create(
        model="gpt-4o",
        messages=[*ASK, turn, result],
        tools=TOOLS,
    )
    assert second.choices[0].message.content == expected_answer(NAME, TOKENS)
    assert second.choices[0].finish_reason == "stop"
    assert mock.stats()["log"][1]["options"] == {"tools": 2, "tool_results": 1}


async def test_cut_ends_the_stream_mid_arguments(client: httpx.AsyncClient) -> None:
    parser, events = SSEParser(), []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", OPENAI, json=body("m+cut=2")) as response:
            async for data in response.aiter_bytes():
                events += parser.feed(data)
    chunks = chunks_of(events)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks]
    arguments = "".join(call["function"]["arguments"] for call in calls)
    full = tool_arguments(WEATHER, NAME)
    assert arguments and full.startswith(arguments) and arguments != full


async def test_max_tokens_cuts_the_arguments_with_finish_reason_length(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(OPENAI, json=body(stream=False, max_tokens=1))
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
    assert tool_arguments(WEATHER, NAME).startswith(arguments)
    assert response.json()["usage"]["completion_tokens"] == 1


async def test_tool_choice_naming_an_unknown_tool_is_a_400(client: httpx.AsyncClient) -> None:
    choice = {"type": "function", "function": {"name": "nope"}}
    response = await client.post(OPENAI, json=body(stream=False, tool_choice=choice))
    assert response.status_code == 400
    assert "nope" in response.json()["error"]["message"]


async def test_ollama_answers_a_request_with_tools_with_a_call(
    client: httpx.AsyncClient,
) -> None:
    """Ollama's format calls the first tool too (its wire shapes: test_mock_ollama_tools)."""
    ollama = {"model": "m", "messages": ASK, "tools": TOOLS, "stream": False}
    message = (await client.post("/api/chat", json=ollama)).json()["message"]
    assert message["content"] == ""
    [call] = message["tool_calls"]
    arguments = json.loads(tool_arguments(WEATHER, NAME))
    assert call == {"function": {"name": "get_weather", "arguments": arguments}}
