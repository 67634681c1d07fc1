"""Tools and images on Bedrock pools (ConverseStream's ``toolUse``/``toolResult`` and
``image`` blocks), seen by the official ``openai`` SDK through the gateway; then the
fake provider's Bedrock wire shapes over httpx, and the adapter's request mapping alone.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from broker._errors import FeatureUnsupported
from broker._protocol import (
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageUrl,
    Job,
    Message,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import tool_arguments
from tests._harness import BEDROCK_KEYS, StartSdkStack, Upstream, streamed_tool_calls, upstream
from workers.providers import Finish, TextDelta
from workers.providers._eventstream import EventMessage, EventStreamParser
from workers.providers.bedrock import _StreamState, request_body

TOKENS = 6
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
AWS: dict[str, Any] = {**BEDROCK_KEYS, "max_retries": 0}
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather", "parameters": PARAMETERS},
}
ASK: Any = [{"role": "user", "content": "What is the weather in Oslo?"}]
PIXEL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _bedrock(name: str) -> Upstream:
    return upstream(MockProvider(name=name, tokens=TOKENS), "bedrock", **AWS)


def _openai(name: str) -> Upstream:
    return upstream(MockProvider(name=name, tokens=TOKENS), max_retries=0)


# --- through the gateway, with the openai SDK ----------------------------------------


async def test_a_streamed_bedrock_tool_call_reaches_the_sdk_whole(
    sdk_stack: StartSdkStack,
) -> None:
    async with sdk_stack({"br": _bedrock("mock-br")}, {"chat": [("br", MODEL)]}) as (s, client):
        calls, finish = await streamed_tool_calls(
            client, model="chat", messages=ASK, tools=[WEATHER]
        )
        [logged] = s.providers["br"].stats()["log"]
    [call] = calls
    assert (call["name"], call["id"]) == ("get_weather", "tooluse_mock1")
    assert call["arguments"] == tool_arguments(PARAMETERS, "mock-br")  # what the fake sent
    assert json.loads(call["arguments"]) == {"city": "from mock-br", "days": 1}
    assert finish == "tool_calls"
    assert logged["options"] == {"tools": 1}


async def test_a_two_turn_bedrock_tool_loop_ends_in_the_answer(sdk_stack: StartSdkStack) -> None:
    async with sdk_stack({"br": _bedrock("mock-br")}, {"chat": [("br", MODEL)]}) as (s, client):
        first = await client.chat.completions.create(model="chat", messages=ASK, tools=[WEATHER])
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
        [call] = message.tool_calls
        history = [
            *ASK,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        ]
        second = await client.chat.completions.create(
            model="chat", messages=history, tools=[WEATHER]
        )
        log = s.providers["br"].stats()["log"]
    assert json.loads(call.function.arguments) == {"city": "from mock-br", "days": 1}
    assert second.choices[0].message.content == expected_answer("mock-br", TOKENS)
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert log[1]["options"] == {"tools": 1, "tool_results": 1}


async def test_a_bedrock_stream_cut_mid_arguments_is_answered_whole_by_the_backup(
    sdk_stack: StartSdkStack,
) -> None:
    pools = {"br": _bedrock("mock-br"), "c": _openai("mock-c")}
    routes = {"chat": [("br", f"{MODEL}+cut=2"), ("c", "gpt")]}
    async with sdk_stack(pools, routes) as (s, client):
        stream = await client.chat.completions.create(
            model="chat", messages=ASK, tools=[WEATHER], stream=True
        )
        pieces = [
            call.function.arguments or ""
            async for chunk in stream
            for choice in chunk.choices
            for call in choice.delta.tool_calls or []
            if call.function
        ]
        tried = s.providers["br"].stats()["requests"]
    assert tried == 1
    assert pieces == [tool_arguments(PARAMETERS, "mock-c")]  # one whole call, the backup's


async def test_a_data_image_reaches_bedrock_as_bytes(sdk_stack: StartSdkStack) -> None:
    look = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": PIXEL}},
    ]}]  # fmt: skip
    async with sdk_stack({"br": _bedrock("mock-br")}, {"chat": [("br", MODEL)]}) as (s, client):
        reply = await client.chat.completions.create(model="chat", messages=look)  # type: ignore[arg-type]
        [logged] = s.providers["br"].stats()["log"]
    assert reply.choices[0].message.content == expected_answer("mock-br", TOKENS)
    assert logged["options"] == {"images": ["bytes"]}


async def test_a_linked_image_on_a_bedrock_first_route_goes_to_the_openai_pool(
    sdk_stack: StartSdkStack,
) -> None:
    """Bedrock takes image bytes only: a linked image is not sent without it, and not
    refused either: the OpenAI pool, which fetches links, answers."""
    look = [{"role": "user", "content": [
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": PIXEL}},
    ]}]  # fmt: skip
    pools = {"br": _bedrock("mock-br"), "a": _openai("mock-a")}
    routes = {"chat": [("br", MODEL), ("a", "gpt-4o")]}
    async with sdk_stack(pools, routes) as (s, client):
        reply = await client.chat.completions.create(model="chat", messages=look)  # type: ignore[arg-type]
        [logged] = s.providers["a"].stats()["log"]
        bedrock_requests = s.providers["br"].stats()["requests"]
    assert reply.model == "gpt-4o"
    assert reply.choices[0].message.content == expected_answer("mock-a", TOKENS)
    assert logged["options"] == {"images": ["url", "data"]} and bedrock_requests == 0


# --- the fake provider's Bedrock format, over httpx ------------------------------------

NAME = "mock-bedrock-tools"
SIGNED = {"authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/bedrock"}
TIME: dict[str, Any] = {"type": "object", "properties": {"zone": {"type": "string"}}}
TOOL_CONFIG: dict[str, Any] = {
    "tools": [
        {"toolSpec": {"name": "get_weather", "inputSchema": {"json": PARAMETERS}}},
        {"toolSpec": {"name": "get_time", "description": "Time", "inputSchema": {"json": TIME}}},
    ]
}
CONVERSE = [{"role": "user", "content": [{"text": "What is the weather in Oslo?"}]}]


def _path(kind: str) -> str:
    return f"/model/{MODEL.replace(':', '%3A')}/{kind}"


async def _events(mock: MockProvider, body: dict[str, Any]) -> list[tuple[str, Any]]:
    async with httpx.AsyncClient(base_url=mock.url, headers=SIGNED) as http:
        response = await http.post(_path("converse-stream"), json=body)
    assert response.status_code == 200
    frames = EventStreamParser().feed(response.content)
    assert all(isinstance(f, EventMessage) for f in frames)
    return [(f.header(":event-type"), msgspec.json.decode(f.payload)) for f in frames]  # type: ignore[union-attr]


async def test_the_fake_streams_a_tool_use_in_bedrock_s_shape() -> None:
    async with MockProvider(name=NAME, tokens=4) as mock:
        events = await _events(mock, {"messages": CONVERSE, "toolConfig": TOOL_CONFIG})
    names = [name for name, _ in events]
    assert names == ["messageStart", "contentBlockStart", *["contentBlockDelta"] * 4,
                     "contentBlockStop", "messageStop", "metadata"]  # fmt: skip
    assert events[1][1] == {
        "contentBlockIndex": 0,
        "start": {"toolUse": {"toolUseId": "tooluse_mock1", "name": "get_weather"}},
    }
    fragments = [payload["delta"]["toolUse"]["input"] for _, payload in events[2:6]]
    assert "".join(fragments) == tool_arguments(PARAMETERS, NAME)
    assert events[7][1] == {"stopReason": "tool_use"}


async def test_the_fake_calls_the_tool_tool_choice_names_in_a_whole_answer() -> None:
    config = {**TOOL_CONFIG, "toolChoice": {"tool": {"name": "get_time"}}}
    async with MockProvider(name=NAME, tokens=4) as mock:
        async with httpx.AsyncClient(base_url=mock.url, headers=SIGNED) as http:
            response = await http.post(
                _path("converse"), json={"messages": CONVERSE, "toolConfig": config}
            )
        [logged] = mock.stats()["log"]
    answer = response.json()
    assert answer["output"]["message"]["content"] == [
        {"toolUse": {"toolUseId": "tooluse_mock1", "name": "get_time",
                     "input": {"zone": f"from {NAME}"}}}
    ]  # fmt: skip
    assert answer["stopReason"] == "tool_use"
    assert logged["options"] == {"tools": 2, "tool_choice": {"type": "tool", "name": "get_time"}}


async def test_the_fake_answers_a_tool_result_in_words() -> None:
    result = {"toolResult": {"toolUseId": "tooluse_1", "content": [{"json": {"sky": "clear"}}]}}
    messages = [
        *CONVERSE,
        {"role": "assistant", "content": [
            {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {}}}]},
        {"role": "user", "content": [result]},
    ]  # fmt: skip
    async with MockProvider(name=NAME, tokens=4) as mock:
        events = await _events(mock, {"messages": messages, "toolConfig": TOOL_CONFIG})
        [logged] = mock.stats()["log"]
    text = "".join(p["delta"]["text"] for name, p in events if name == "contentBlockDelta")
    assert text == expected_answer(NAME, 4)
    assert events[-2][1] == {"stopReason": "end_turn"}
    assert logged["options"] == {"tools": 2, "tool_results": 1}


# --- the adapter's pieces alone --------------------------------------------------------

CALL = ToolCall(
    id="tooluse_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}')
)
FUNCTION = FunctionDef(name="get_weather", description="The weather", parameters=PARAMETERS)


def _job(messages: list[Message], **fields: Any) -> Job:
    return Job(id="j", route="chat", reply_to="r", deadline_ms=0, messages=messages, **fields)


def test_tools_and_tool_turns_are_converse_shaped() -> None:
    job = _job(
        [
            Message(role="user", content="Weather?"),
            Message(role="assistant", content="Let me look.", tool_calls=[CALL]),
            Message(role="tool", tool_call_id="tooluse_1", content='{"sky":"clear"}'),
            Message(role="tool", tool_call_id="tooluse_2", content="grey"),
        ],
        tools=[Tool(function=FUNCTION), Tool(function=FunctionDef(name="now"))],
        tool_choice="required",
    )
    body = msgspec.json.decode(request_body(job))
    assert body["toolConfig"] == {
        "tools": [
            {"toolSpec": {"name": "get_weather", "description": "The weather",
                          "inputSchema": {"json": PARAMETERS}}},
            {"toolSpec": {"name": "now", "inputSchema": {"json": {"type": "object"}}}},
        ],
        "toolChoice": {"any": {}},
    }  # fmt: skip
    assert body["messages"][1:] == [
        {"role": "assistant", "content": [
            {"text": "Let me look."},
            {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather",
                         "input": {"city": "Oslo"}}},
        ]},
        # Two tool results answer one assistant turn: one user turn, two blocks.
        {"role": "user", "content": [
            {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": '{"sky":"clear"}'}]}},
            {"toolResult": {"toolUseId": "tooluse_2", "content": [{"text": "grey"}]}},
        ]},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "config"),
    [(None, None), ("auto", {"auto": {}}), ("none", "absent"),
     ({"type": "function", "function": {"name": "get_weather"}},
      {"tool": {"name": "get_weather"}})],
)  # fmt: skip
def test_tool_choice_in_bedrock_s_words(choice: Any, config: Any) -> None:
    job = _job([Message(role="user", content="Weather?")], tools=[Tool(function=FUNCTION)],
               tool_choice=choice)  # fmt: skip
    body = msgspec.json.decode(request_body(job))
    if config == "absent":
        assert "toolConfig" not in body
    else:
        assert body["toolConfig"].get("toolChoice") == config and body["toolConfig"]["tools"]


def test_an_assistant_turn_with_only_tool_calls_has_no_empty_text() -> None:
    body = msgspec.json.decode(request_body(_job([Message(role="assistant", tool_calls=[CALL])])))
    assert body["messages"] == [{"role": "assistant", "content": [
        {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {"city": "Oslo"}}}
    ]}]  # fmt: skip


def test_a_data_image_is_an_image_block_of_bytes() -> None:
    parts = [TextPart(text="What is this?"), ImagePart(image_url=ImageUrl(url=PIXEL))]
    job = _job([Message(role="user", content="What is this?", parts=parts)])
    [turn] = msgspec.json.decode(request_body(job))["messages"]
    assert turn == {"role": "user", "content": [
        {"text": "What is this?"},
        {"image": {"format": "png", "source": {"bytes": PIXEL.partition(",")[2]}}},
    ]}  # fmt: skip


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.png", "data:image/svg+xml;base64,PHN2Zy8+"]
)
def test_an_image_bedrock_cannot_take_goes_elsewhere(url: str) -> None:
    job = _job([Message(role="user", parts=[ImagePart(image_url=ImageUrl(url=url))])])
    with pytest.raises(FeatureUnsupported) as caught:
        request_body(job)
    assert caught.value.features == frozenset({"images"})


def _event(event_type: str, payload: Any) -> EventMessage:
    headers = {":event-type": event_type, ":message-type": "event"}
    return EventMessage(headers, msgspec.json.encode(payload))  # type: ignore[arg-type]


def test_tool_use_blocks_stream_as_tool_call_fragments_numbered_among_calls() -> None:
    state = _StreamState()
    events = [
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Looking."}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockStart", {"contentBlockIndex": 1,
                               "start": {"toolUse": {"toolUseId": "t1", "name": "a"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"x":'}}}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "1}"}}}),
        ("contentBlockStart", {"contentBlockIndex": 2,
                               "start": {"toolUse": {"toolUseId": "t2", "name": "b"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": "{}"}}}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": {"inputTokens": 5, "outputTokens": 7}}),
    ]  # fmt: skip
    items = [state.on_message(_event(name, payload)) for name, payload in events]
    assert [item for item in items if item is not None] == [
        TextDelta("Looking."),
        ToolCallDelta(index=0, id="t1", name="a"),
        ToolCallDelta(index=0, arguments='{"x":'),
        ToolCallDelta(index=0, arguments="1}"),
        ToolCallDelta(index=1, id="t2", name="b"),
        ToolCallDelta(index=1, arguments="{}"),
        Finish("tool_calls", items[-1].usage),  # type: ignore[union-attr]
    ]
