"""The fake provider answers Ollama ``/api/chat`` requests that offer tools with a call.

Over real HTTP through httpx, the exact NDJSON lines: Ollama sends the whole
call in one line (``message.tool_calls``, ``arguments`` a JSON object the
tool's ``parameters`` accept: ``sample``), then the ``done`` line; a ``tool``
result as the last message gets the text answer. The stats log counts tools,
tool results and the messages' ``images``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from devstack import MockProvider, expected_answer
from devstack.fake_provider._structured import sample

pytestmark = pytest.mark.anyio

NAME = "mock-llama-tools"
TOKENS = 4
CHAT = "/api/chat"
WEATHER: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME: dict[str, object] = {"type": "object", "properties": {"zone": {"type": "string"}}}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PIXEL = (  # a 1x1 PNG, base64
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
CALL = {"function": {"name": "get_weather", "arguments": sample(WEATHER, NAME)}}


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name=NAME, tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url) as http:
        yield http


def body(model: str = "llama3.2", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": ASK, "tools": TOOLS, "stream": stream, **extra}


def lines_of(raw: bytes) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in raw.splitlines() if line]


async def stream_lines(client: httpx.AsyncClient, payload: dict[str, Any]) -> list[dict[str, Any]]:
    response = await client.post(CHAT, json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return lines_of(response.content)


async def test_a_streamed_tool_call_is_one_line_then_done(client: httpx.AsyncClient) -> None:
    call_line, done_line = await stream_lines(client, body())
    assert set(call_line) == {"model", "created_at", "message", "done"}
    assert call_line["model"] == "llama3.2" and call_line["done"] is False
    assert call_line["message"] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert call_line["message"]["tool_calls"][0]["function"]["arguments"] == {
        "city": f"from {NAME}",
        "unit": "celsius",
    }
    assert done_line["done"] is True and done_line["done_reason"] == "stop"
    assert done_line["message"] == {"role": "assistant", "content": ""}
    assert done_line["eval_count"] == TOKENS and done_line["prompt_eval_count"] >= 1


async def test_a_whole_answer_carries_the_call_and_is_done(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    answer = (await client.post(CHAT, json=body(stream=False))).json()
    assert answer["message"] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert (answer["done"], answer["done_reason"]) == (True, "stop")
    assert answer["eval_count"] == TOKENS
    assert mock.stats()["log"][0]["options"] == {"tools": 2}


async def test_a_tool_result_gets_the_text_answer_closing_the_loop(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    first = (await client.post(CHAT, json=body(stream=False))).json()["message"]
    turns = [*ASK, first, {"role": "tool", "content": '{"temp_c": 21}'}]
    lines = await stream_lines(client, body(messages=turns))
    assert all("tool_calls" not in line["message"] for line in lines)
    text = "".join(line["message"]["content"] for line in lines)
    assert text == expected_answer(NAME, TOKENS)
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert mock.stats()["log"][1]["options"] == {"tools": 2, "tool_results": 1}


async def test_images_are_logged_one_per_base64_image(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    look = [{"role": "user", "content": "What is in these?", "images": [PIXEL, PIXEL]}]
    lines = await stream_lines(client, {"model": "llava", "messages": look})
    assert "".join(line["message"]["content"] for line in lines) == expected_answer(NAME, TOKENS)
    assert mock.stats()["log"][0]["options"] == {"images": ["base64", "base64"]}


async def test_a_cut_stops_after_the_call_before_done(client: httpx.AsyncClient) -> None:
    raw = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", CHAT, json=body("llama3.2+cut=1")) as response:
            async for data in response.aiter_bytes():
                raw += data
    [line] = lines_of(raw)
    assert line["done"] is False and line["message"]["tool_calls"] == [CALL]


async def test_requests_without_tools_answer_in_words(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    answer = (await client.post(CHAT, json={"model": "m", "messages": ASK, "stream": False})).json()
    assert answer["message"] == {"role": "assistant", "content": expected_answer(NAME, TOKENS)}
    assert "options" not in mock.stats()["log"][0]
