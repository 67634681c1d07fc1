"""Function calls and images on Gemini pools (``kind: gemini``), both ways.

Through the gateway with the official ``openai`` SDK first (the fake provider's
Gemini format calls the tool it is offered, whole in one ``functionCall`` part,
and refuses a ``functionResponse`` turn that does not answer the call turn
before it, as Google does); then the adapter alone, on the request it builds
and on canned chunks; then the fake's Gemini paths over plain HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from broker._errors import FeatureUnsupported, UpstreamRejected
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
    Usage,
)
from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import sample
from tests._harness import StartSdkStack, streamed_tool_calls, upstream
from workers.providers import Finish, StreamItem, TextDelta
from workers.providers.gemini import _Chunk, _StreamState, request_body

MODEL = "gemini-2.5-flash"
TOKENS = 6
PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,  # JSON Schema the OpenAPI subset (``parameters``) lacks
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city",
                 "parameters": PARAMS},
}  # fmt: skip
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
PIXEL_B64 = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PIXEL = f"data:image/png;base64,{PIXEL_B64}"


def gemini_stack(sdk_stack: StartSdkStack, name: str = "mock-g") -> Any:
    mock = MockProvider(name=name, tokens=TOKENS)
    return sdk_stack({"g": upstream(mock, "gemini")}, {"chat": [("g", MODEL)]})


# --- through the gateway, with the openai SDK ----------------------------------------


async def test_a_streamed_gemini_tool_call_reaches_the_sdk_whole(sdk_stack: StartSdkStack) -> None:
    async with gemini_stack(sdk_stack) as (s, client):
        calls, finish = await streamed_tool_calls(
            client, model="chat", messages=ASK, tools=[WEATHER]
        )
        [entry] = s.providers["g"].stats()["log"]
    [call] = calls
    assert call["name"] == "get_weather"
    assert call["id"].startswith("gemini_mock")  # Gemini's own id, kept
    assert json.loads(call["arguments"]) == sample(PARAMS, "mock-g")
    assert finish == "tool_calls"
    assert entry["options"] == {"tools": 1}


async def test_a_two_turn_gemini_tool_loop_ends_in_the_answer(sdk_stack: StartSdkStack) -> None:
    async with gemini_stack(sdk_stack) as (s, client):
        first = await client.chat.completions.create(model="chat", messages=ASK, tools=[WEATHER])
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
        [call] = message.tool_calls
        history: list[Any] = [
            *ASK,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "clear skies"},
        ]
        second = await client.chat.completions.create(
            model="chat", messages=history, tools=[WEATHER]
        )
        log = s.providers["g"].stats()["log"]
    assert json.loads(call.function.arguments) == sample(PARAMS, "mock-g")  # type: ignore[union-attr]
    assert second.choices[0].message.content == expected_answer("mock-g", TOKENS)
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert [e["status"] for e in log] == [200, 200]  # the fake refuses a misplaced response
    assert log[1]["options"] == {"tools": 1, "tool_results": 1}


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("required", {"mode": "ANY"}),
        ({"type": "function", "function": {"name": "get_weather"}},
         {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
        ("none", {"mode": "NONE"}),
    ],
)  # fmt: skip
async def test_tool_choice_reaches_gemini_as_its_function_calling_config(
    sdk_stack: StartSdkStack, choice: Any, config: dict[str, Any]
) -> None:
    async with gemini_stack(sdk_stack) as (s, client):
        reply = await client.chat.completions.create(
            model="chat", messages=ASK, tools=[WEATHER], tool_choice=choice
        )
        [entry] = s.providers["g"].stats()["log"]
    assert entry["options"]["tool_config"] == {"functionCallingConfig": config}
    answer = reply.choices[0]
    if choice == "none":
        assert answer.message.content == expected_answer("mock-g", TOKENS)
    else:
        assert answer.message.tool_calls and answer.finish_reason == "tool_calls"


# --- the adapter alone: the request it builds ----------------------------------------


def _job(messages: list[Message], **fields: Any) -> Job:
    return Job(id="j", route="chat", messages=messages, reply_to="r", deadline_ms=0, **fields)


def _call(call_id: str, name: str = "get_weather", arguments: str = '{"city":"Oslo"}') -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


def _body(job: Job) -> dict[str, Any]:
    return msgspec.json.decode(request_body(job))  # type: ignore[no-any-return]


def test_tools_are_function_declarations_with_their_json_schema() -> None:
    tools = [
        Tool(function=FunctionDef(name="get_weather", description="Weather", parameters=PARAMS)),
        Tool(function=FunctionDef(name="now")),  # no parameters: none declared
    ]
    body = _body(_job([Message(role="user", content="Hi")], tools=tools))
    assert body["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather", "parametersJsonSchema": PARAMS},
        {"name": "now"},
    ]}]  # fmt: skip
    assert "toolConfig" not in body  # no tool_choice: Gemini's default (AUTO)


def test_a_tool_loop_is_function_call_and_function_response_parts() -> None:
    messages = [
        Message(role="user", content="Weather and time?"),
        Message(
            role="assistant",
            content="Looking.",
            tool_calls=[_call("c1"), _call("c2", "get_time", "")],
        ),
        Message(role="tool", tool_call_id="c1", content='{"sky": "clear"}'),
        Message(role="tool", tool_call_id="c2", content="noon"),
        Message(role="assistant", tool_calls=[_call("c1", "get_time", '{"zone":"CET"}')]),
        Message(role="tool", tool_call_id="c1", content="[1, 2]"),
    ]
    contents = _body(_job(messages))["contents"]
    assert contents[1] == {"role": "model", "parts": [
        {"text": "Looking."},
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
        {"functionCall": {"name": "get_time", "args": {}}},
    ]}  # fmt: skip
    # Both results answer one call turn: one user turn, each named by its call (Gemini
    # matches results by name and place; no ids are sent); a result that is no JSON
    # object is wrapped, as Gemini's ``response`` is an object.
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}},
        {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}},
    ]}  # fmt: skip
    # An id used again later names the later call's tool.
    assert contents[4]["parts"] == [
        {"functionResponse": {"name": "get_time", "response": {"result": "[1, 2]"}}}
    ]


def test_a_tool_result_for_no_call_in_the_conversation_is_refused() -> None:
    job = _job([Message(role="user", content="Hi"),
                Message(role="tool", tool_call_id="nowhere", content="42")])  # fmt: skip
    with pytest.raises(UpstreamRejected, match="nowhere"):
        request_body(job)


@pytest.mark.parametrize(
    ("choice", "config"),
    [("auto", {"mode": "AUTO"}), ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"}),
     ({"type": "function", "function": {"name": "get_weather"}},
      {"mode": "ANY", "allowedFunctionNames": ["get_weather"]})],
)  # fmt: skip
def test_tool_choice_is_the_function_calling_mode(choice: Any, config: dict[str, Any]) -> None:
    tools = [Tool(function=FunctionDef(name="get_weather", parameters=PARAMS))]
    body = _body(_job([Message(role="user", content="Hi")], tools=tools, tool_choice=choice))
    assert body["toolConfig"] == {"functionCallingConfig": config}


def test_images_are_inline_data_or_file_data() -> None:
    parts = [
        TextPart(text="What are these?"),
        ImagePart(image_url=ImageUrl(url=PIXEL)),
        ImagePart(image_url=ImageUrl(url="https://example.com/cat.jpg?size=2")),
        ImagePart(image_url=ImageUrl(url="https://example.com/picture")),
        ImagePart(image_url=ImageUrl(url="data:image/svg+xml,%3Csvg%2F%3E")),  # not base64
    ]
    [turn] = _body(_job([Message(role="user", content="What are these?", parts=parts)]))["contents"]
    assert turn == {"role": "user", "parts": [
        {"text": "What are these?"},
        {"inlineData": {"mimeType": "image/png", "data": PIXEL_B64}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg?size=2"}},
        {"fileData": {"fileUri": "https://example.com/picture"}},  # Gemini reads the type
        {"inlineData": {"mimeType": "image/svg+xml", "data": "PHN2Zy8+"}},
    ]}  # fmt: skip


def test_an_image_link_that_is_not_https_goes_to_another_target() -> None:
    parts = [ImagePart(image_url=ImageUrl(url="http://example.com/cat.png"))]
    with pytest.raises(FeatureUnsupported) as caught:
        request_body(_job([Message(role="user", parts=parts)]))
    assert caught.value.features == frozenset({"images"})


# --- the adapter alone: function calls in the answer ---------------------------------


def _items(*chunks: Any) -> list[StreamItem]:
    state = _StreamState()
    items: list[StreamItem] = []
    for payload in chunks:
        items += state.on_chunk(msgspec.convert(payload, _Chunk))
    return items


def _parts(*parts: Any, finish: str | None = None, **more: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], **more}


USAGE = {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3}}


def test_function_calls_become_whole_tool_calls_and_finish_as_tool_calls() -> None:
    items = _items(
        _parts({"text": "Let me look."}),
        _parts(
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo", "days": 2}},
             "thoughtSignature": "c2ln"},
            {"functionCall": {"id": "fc-7", "name": "get_time"}},
            finish="STOP", **USAGE,
        ),
    )  # fmt: skip
    assert items == [
        TextDelta("Let me look."),
        ToolCallDelta(index=0, id="call_0", name="get_weather",
                      arguments='{"city":"Oslo","days":2}'),
        ToolCallDelta(index=1, id="fc-7", name="get_time", arguments="{}"),
        Finish("tool_calls", Usage(prompt_tokens=9, completion_tokens=3)),
    ]  # fmt: skip


def test_calls_are_numbered_across_chunks_and_a_cut_answer_stays_length() -> None:
    items = _items(
        _parts({"functionCall": {"name": "a", "args": {}}}),
        _parts({"functionCall": {"name": "b", "args": {"x": [1]}}}, finish="MAX_TOKENS", **USAGE),
    )
    assert [(i.index, i.id, i.name) for i in items if isinstance(i, ToolCallDelta)] == [
        (0, "call_0", "a"), (1, "call_1", "b"),
    ]  # fmt: skip
    assert items[-1] == Finish("length", Usage(prompt_tokens=9, completion_tokens=3))


def test_a_text_answer_still_finishes_as_stop() -> None:
    assert _items(_parts({"text": "Hi"}, finish="STOP", **USAGE))[-1] == Finish(
        "stop", Usage(prompt_tokens=9, completion_tokens=3)
    )


# --- the fake provider's Gemini paths ------------------------------------------------


def _request(contents: list[Any], **more: Any) -> dict[str, Any]:
    declarations = [
        {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        {"name": "get_weather", "parametersJsonSchema": PARAMS},
    ]
    return {"contents": contents, "tools": [{"functionDeclarations": declarations}], **more}


ASK_TURN = {"role": "user", "parts": [{"text": "What is the weather in Oslo?"}]}
NAMED = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


def _events(raw: bytes) -> list[dict[str, Any]]:
    return [
        msgspec.json.decode(event.removeprefix(b"data: "))
        for event in raw.split(b"\r\n\r\n")
        if event.strip()
    ]


async def _post(body: dict[str, Any], stream: bool = True) -> tuple[MockProvider, httpx.Response]:
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    async with MockProvider(name="mock-g", tokens=4) as mock, httpx.AsyncClient() as http:
        url = f"{mock.url}/v1beta/models/{MODEL}:{method}"
        response = await http.post(url, json=body, headers={"x-goog-api-key": "k"})
        await response.aread()
    return mock, response


async def test_the_fake_streams_a_function_call_whole_in_one_event() -> None:
    mock, response = await _post(_request([ASK_TURN], toolConfig=NAMED))
    call_event, last = _events(response.content)
    assert call_event["candidates"][0]["content"] == {"role": "model", "parts": [
        {"functionCall": {"id": "gemini_mock1", "name": "get_weather",
                          "args": sample(PARAMS, "mock-g")}},
    ]}  # fmt: skip
    assert last["candidates"][0]["finishReason"] == "STOP"  # Gemini says STOP, calls or not
    assert last["usageMetadata"]["candidatesTokenCount"] == 4
    assert mock.stats()["log"][0]["options"] == {"tools": 2, "tool_config": NAMED}


async def test_the_fake_answers_generate_content_with_the_call_and_first_tool_by_default() -> None:
    _, response = await _post(_request([ASK_TURN]), stream=False)
    [candidate] = response.json()["candidates"]
    assert candidate["content"]["parts"] == [
        {"functionCall": {"id": "gemini_mock1", "name": "get_time", "args": {}}}
    ]
    assert candidate["finishReason"] == "STOP"


async def test_the_fake_answers_a_function_response_in_words() -> None:
    call = {"functionCall": {"name": "get_time", "args": {}}}
    answer = {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}}
    contents = [ASK_TURN, {"role": "model", "parts": [call]}, {"role": "user", "parts": [answer]}]
    mock, response = await _post(_request(contents), stream=False)
    [candidate] = response.json()["candidates"]
    assert candidate["content"]["parts"] == [{"text": expected_answer("mock-g", 4)}]
    assert mock.stats()["log"][0]["options"] == {"tools": 2, "tool_results": 1}


@pytest.mark.parametrize("before", [[], [{"role": "model", "parts": [{"text": "Hm."}]}]])
async def test_the_fake_refuses_a_function_response_without_its_call_turn_as_google_does(
    before: list[Any],
) -> None:
    answer = {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}}
    _, response = await _post(_request([ASK_TURN, *before, {"role": "user", "parts": [answer]}]))
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "function call turn" in response.json()["error"]["message"]


async def test_the_fake_refuses_fewer_responses_than_calls() -> None:
    calls = [{"functionCall": {"name": "get_time", "args": {}}}] * 2
    answer = {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}}
    contents = [ASK_TURN, {"role": "model", "parts": calls}, {"role": "user", "parts": [answer]}]
    _, response = await _post(_request(contents))
    assert response.status_code == 400
    assert "number of function response parts" in response.json()["error"]["message"]


async def test_the_fake_logs_inline_and_file_images() -> None:
    parts = [
        {"text": "What is this?"},
        {"inlineData": {"mimeType": "image/png", "data": PIXEL_B64}},
        {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.png"}},
    ]
    mock, response = await _post({"contents": [{"role": "user", "parts": parts}]})
    text = "".join(
        part["text"] for event in _events(response.content)
        for part in event["candidates"][0]["content"]["parts"]
    )  # fmt: skip
    assert text == expected_answer("mock-g", 4)
    assert mock.stats()["log"][0]["options"] == {"images": ["base64", "url"]}
