"""The gateway's Anthropic Messages front door (``POST /v1/messages``), seen through the
official `anthropic` SDK: real gateway, real NATS, real workers, fake providers over HTTP.

The same jobs answer it as ``/v1/chat/completions`` (``model`` names a route), so what is
asserted is what an Anthropic SDK (or Claude Code) user sees: the assembled text, tool_use
blocks with their parsed input, stop reasons, usage, and errors as the SDK's classes.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anthropic
import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS

from broker import RelayClient, ensure_topology
from broker._config import GatewaySettings, Secret
from broker._errors import InvalidRequest
from devstack import MockProvider, expected_answer, expected_reasoning
from gateway import serve_gateway
from gateway._messages import parse_messages_request, to_job_parts
from tests._harness import NatsUrls, RelayStack, Upstream, start_stack, upstream
from tests.test_tools import WEATHER, expected_arguments

TOKENS = 6
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOOL = {
    "name": "get_weather",
    "description": WEATHER["function"]["description"],
    "input_schema": WEATHER["function"]["parameters"],
}
PIXEL = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

ClaudeStack = tuple[RelayStack, anthropic.AsyncAnthropic]
StartClaude = Callable[..., AbstractAsyncContextManager[ClaudeStack]]


@asynccontextmanager
async def start_claude_stack(
    urls: NatsUrls,
    pools: dict[str, Upstream],
    routes: dict[str, Any],
    *,
    api_key: str = "x",
    gateway: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[ClaudeStack]:
    """``start_stack``, a gateway on it (``gateway``: its settings) and an ``anthropic``
    SDK client of that gateway (no SDK retries)."""
    async with start_stack(urls, pools, routes, relay=None, **options) as stack:
        cfg = stack.config
        if gateway:
            cfg = msgspec.structs.replace(cfg, gateway=GatewaySettings(**gateway))
        async with (
            serve_gateway(cfg, nats_url=urls.client) as base_url,
            anthropic.AsyncAnthropic(
                base_url=base_url.removesuffix("/v1"), api_key=api_key, max_retries=0
            ) as client,
        ):
            yield stack, client


@pytest.fixture
def claude_stack(worker_url: str, client_url: str) -> StartClaude:
    """``async with claude_stack(pools, routes) as (s, client)``: see ``start_claude_stack``."""
    return functools.partial(start_claude_stack, NatsUrls(worker_url, client_url))


def solo(
    kind: str = "openai", name: str = "mock-a", model: str = "gpt", token_delay_ms: float = 0
) -> Any:
    mock = MockProvider(name=name, tokens=TOKENS, token_delay_ms=token_delay_ms)
    pools = {"a": upstream(mock, kind, max_retries=0)}
    return pools, {"chat": [("a", model)]}


# --- answers -----------------------------------------------------------------------------


async def test_a_streamed_answer_is_the_exact_text(claude_stack: StartClaude) -> None:
    async with (
        claude_stack(*solo(token_delay_ms=3)) as (_, client),  # tokens apart: pieces
        client.messages.stream(
            model="chat", max_tokens=100, messages=ASK, system="Be brief."
        ) as stream,
    ):
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == expected_answer("mock-a", TOKENS)
    assert len(pieces) > 1  # streamed, not sent whole
    assert [b.type for b in final.content] == ["text"]
    assert final.stop_reason == "end_turn" and final.stop_sequence is None
    assert final.model == "gpt" and final.role == "assistant"
    assert final.usage.output_tokens == TOKENS and final.usage.input_tokens > 0


async def test_the_stream_on_the_wire_is_anthropics_event_sequence(
    claude_stack: StartClaude,
) -> None:
    """Named events, each with its type repeated in the data, in Anthropic's order."""
    body = {"model": "chat", "max_tokens": 100, "messages": ASK, "stream": True}
    async with (
        claude_stack(*solo(model="gpt+think=2")) as (_, client),
        httpx.AsyncClient(base_url=str(client.base_url)) as http,
    ):
        response = await http.post("/v1/messages", json=body)
    frames = [f.split("\n") for f in response.text.split("\n\n") if f.strip()]
    names = [lines[0].removeprefix("event: ") for lines in frames]
    data = [msgspec.json.decode(lines[1].removeprefix("data: ")) for lines in frames]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert [d["type"] for d in data] == names
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks = [(d["index"], d["content_block"]["type"]) for d in data if "content_block" in d]
    assert blocks == [(0, "thinking"), (1, "text")]
    stops = [d["index"] for d in data if d["type"] == "content_block_stop"]
    assert stops == [0, 1]
    assert data[0]["message"]["content"] == [] and data[0]["message"]["model"] == "gpt+think=2"
    assert data[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert data[-2]["usage"]["output_tokens"] == TOKENS


async def test_a_whole_answer_is_one_message(claude_stack: StartClaude) -> None:
    async with claude_stack(*solo()) as (_, client):
        raw = await client.messages.with_raw_response.create(
            model="chat",
            max_tokens=100,
            system=[{"type": "text", "text": "Be brief."}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}],
            stop_sequences=["\n\n"],
            metadata={"user_id": "u-1"},
            extra_body={"temperature": 0.5, "top_k": 5},  # older SDKs' parameters
        )
        message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [
        ("text", expected_answer("mock-a", TOKENS))
    ]
    assert message.stop_reason == "end_turn"
    assert message.id == f"msg_{raw.headers['x-request-id']}"
    assert message.usage.output_tokens == TOKENS
    assert raw.headers["x-llmrelay-pool"] == "a"


async def test_a_length_stop_is_max_tokens(claude_stack: StartClaude) -> None:
    async with claude_stack(*solo()) as (_, client):
        message = await client.messages.create(model="chat", max_tokens=3, messages=ASK)
    assert message.stop_reason == "max_tokens"  # the fake stops at the limit: "length"
    assert message.usage.output_tokens == 3


# --- tools -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "name"), [("openai", "mock-a"), ("anthropic", "mock-b")])
async def test_a_streamed_tool_call_is_a_tool_use_block_with_its_input(
    claude_stack: StartClaude, kind: str, name: str
) -> None:
    async with claude_stack(*solo(kind, name)) as (s, client):
        async with client.messages.stream(
            model="chat",
            max_tokens=100,
            messages=ASK,
            tools=[TOOL],  # type: ignore[list-item]
            tool_choice={"type": "any"},
        ) as stream:
            events = [event.type async for event in stream]
            final = await stream.get_final_message()
        options = s.providers["a"].stats()["log"][0]["options"]
    [block] = [b for b in final.content if b.type == "tool_use"]
    assert block.name == "get_weather" and block.id
    assert block.input == expected_arguments(name)
    assert final.stop_reason == "tool_use"
    assert events.count("input_json") == 1  # the call arrives whole, never in halves
    assert options["tools"] == 1


@pytest.mark.parametrize(("kind", "name"), [("openai", "mock-a"), ("anthropic", "mock-b")])
async def test_a_tool_result_turn_gets_the_final_answer(
    claude_stack: StartClaude, kind: str, name: str
) -> None:
    async with claude_stack(*solo(kind, name)) as (s, client):
        first = await client.messages.create(
            model="chat",
            max_tokens=100,
            messages=ASK,
            tools=[TOOL],  # type: ignore[list-item]
        )
        [call] = [b for b in first.content if b.type == "tool_use"]
        history: list[Any] = [
            *ASK,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id,
                 "content": [{"type": "text", "text": '{"sky": "clear"}'}]},
            ]},
        ]  # fmt: skip
        second = await client.messages.create(
            model="chat",
            max_tokens=100,
            messages=history,
            tools=[TOOL],  # type: ignore[list-item]
        )
        log = s.providers["a"].stats()["log"]
    assert first.stop_reason == "tool_use" and call.input == expected_arguments(name)
    assert [(b.type, getattr(b, "text", None)) for b in second.content] == [
        ("text", expected_answer(name, TOKENS))
    ]
    assert second.stop_reason == "end_turn"
    assert log[1]["options"].get("tool_results") == 1


# --- images and thinking -------------------------------------------------------------------


async def test_image_blocks_reach_the_upstream(claude_stack: StartClaude) -> None:
    look = [{"role": "user", "content": [
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
    ]}]  # fmt: skip
    async with claude_stack(*solo()) as (s, client):
        message = await client.messages.create(model="chat", max_tokens=100, messages=look)  # type: ignore[arg-type]
        [call] = s.providers["a"].stats()["log"]
    assert message.content[0].type == "text"
    assert message.content[0].text == expected_answer("mock-a", TOKENS)
    assert call["options"]["images"] == ["url", "data"]  # OpenAI's words: a link, a data URL


@pytest.mark.parametrize("stream", [False, True])
async def test_thinking_comes_back_as_a_thinking_block(
    claude_stack: StartClaude, stream: bool
) -> None:
    """``thinking`` becomes ``reasoning_effort``; the upstream's reasoning text comes back
    as a thinking block before the text."""
    async with claude_stack(*solo(model="gpt+think=3")) as (s, client):
        ask: dict[str, Any] = {
            "model": "chat",
            "max_tokens": 4000,
            "messages": ASK,
            "thinking": {"type": "enabled", "budget_tokens": 2048},
        }
        if stream:
            async with client.messages.stream(**ask) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(**ask)
        options = s.providers["a"].stats()["log"][0]["options"]
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == expected_reasoning(3)  # type: ignore[union-attr]
    assert message.content[1].text == expected_answer("mock-a", TOKENS)  # type: ignore[union-attr]
    assert options["reasoning_effort"] == "low"


# --- errors ------------------------------------------------------------------------------


async def test_an_unknown_route_is_not_found(claude_stack: StartClaude) -> None:
    async with claude_stack(*solo()) as (_, client):
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.messages.create(model="nope", max_tokens=10, messages=ASK)
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no route named 'nope' (routes: chat)"},
    }


async def test_missing_max_tokens_is_a_bad_request(claude_stack: StartClaude) -> None:
    async with claude_stack(*solo()) as (_, client):
        with pytest.raises(anthropic.BadRequestError) as caught:
            # The SDK's own create() needs max_tokens: post what another client might.
            body = {"model": "chat", "messages": ASK}
            await client.post("/v1/messages", body=body, cast_to=httpx.Response)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in caught.value.body["error"]["message"]


async def test_a_malformed_block_is_a_bad_request_naming_it(claude_stack: StartClaude) -> None:
    bad = [{"role": "user", "content": [{"type": "document", "source": {}}]}]
    async with claude_stack(*solo()) as (_, client):
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(model="chat", max_tokens=10, messages=bad)  # type: ignore[arg-type]
    assert "messages[0].content" in caught.value.message


async def test_keys_are_taken_from_x_api_key_or_bearer(claude_stack: StartClaude) -> None:
    settings = {"api_keys": [Secret("sk-gw-right")]}
    async with claude_stack(*solo(), api_key="sk-gw-right", gateway=settings) as (_, client):
        bearer = await client.messages.create(model="chat", max_tokens=10, messages=ASK)
        async with httpx.AsyncClient(base_url=str(client.base_url)) as http:
            body = {"model": "chat", "max_tokens": 10, "messages": ASK}
            header = await http.post(
                "/v1/messages", json=body, headers={"x-api-key": "sk-gw-right"}
            )
            wrong = await http.post("/v1/messages", json=body, headers={"x-api-key": "sk-gw-wrong"})
        with pytest.raises(anthropic.AuthenticationError):
            await client.with_options(api_key="nope").messages.create(
                model="chat", max_tokens=10, messages=ASK
            )
    assert bearer.content[0].type == "text"
    assert header.status_code == 200 and header.json()["type"] == "message"
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"


async def test_a_full_queue_is_overloaded_with_retry_after(
    nc: NATS, client_url: str, claude_stack: StartClaude
) -> None:
    settings = {"retry_after_s": 3}
    stack = claude_stack(*solo(), workers=[], streams={"queue_capacity": 1}, gateway=settings)
    async with stack as (s, client):
        await ensure_topology(nc, s.config)  # no workers: the queue only fills
        async with RelayClient(client_url, config=s.config) as relay:
            await relay.submit("occupy the only slot", route="chat")
        with pytest.raises(anthropic.OverloadedError) as caught:
            await client.messages.create(model="chat", max_tokens=10, messages=ASK, stream=True)
    assert caught.value.status_code == 529
    assert caught.value.response.headers["retry-after"] == "3"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "overloaded_error"


async def test_a_reset_after_text_is_an_error_event(claude_stack: StartClaude) -> None:
    """`midstream: restart` and a cut after text was sent: the stream ends with an
    ``error`` event, which the SDK raises, never a message_stop."""
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), max_retries=0),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), max_retries=0),
    }
    routes = {"chat": {"targets": [("a", "x+cut=3"), ("b", "y")], "midstream": "restart"}}
    seen: list[str] = []
    async with (
        claude_stack(pools, routes) as (_, client),
        client.messages.stream(model="chat", max_tokens=100, messages=ASK) as stream,
    ):
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for text in stream.text_stream:
                seen.append(text)
    assert "".join(seen) == expected_answer("mock-a", 3)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "api_error"
    assert "restarted" in caught.value.body["error"]["message"]


async def test_count_tokens_is_refused_plainly(claude_stack: StartClaude) -> None:
    async with claude_stack(*solo()) as (_, client):
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.messages.count_tokens(model="chat", messages=ASK)
    assert "tokenizer" in caught.value.message


# --- the request mapping (no server) -------------------------------------------------------


def _parts(body: dict[str, Any]) -> Any:
    return to_job_parts(parse_messages_request(msgspec.json.encode(body)), None)


def test_a_tool_loop_maps_to_openai_style_messages() -> None:
    messages, options = _parts({
        "model": "chat", "max_tokens": 50, "system": [{"type": "text", "text": "A"},
                                                      {"type": "text", "text": "B"}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "clear"},
                {"type": "text", "text": "and tomorrow?"}]},
        ],
        "tools": [TOOL], "tool_choice": {"type": "tool", "name": "get_weather",
                                         "disable_parallel_tool_use": True},
        "top_k": 5, "unknown_field": 1,
    })  # fmt: skip
    assert [(m.role, m.content) for m in messages] == [
        ("system", "A\n\nB"),
        ("user", "weather?"),
        ("assistant", "Let me look."),
        ("tool", "clear"),
        ("user", "and tomorrow?"),
    ]
    [call] = messages[2].tool_calls
    assert (call.id, call.function.name) == ("toolu_1", "get_weather")
    assert msgspec.json.decode(call.function.arguments) == {"city": "Oslo"}
    assert messages[3].tool_call_id == "toolu_1"
    assert options.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert options.parallel_tool_calls is False
    assert options.tools and options.tools[0].function.parameters == TOOL["input_schema"]
    assert options.provider_options == {"anthropic": {"top_k": 5}}
    assert options.max_tokens == 50


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 4096}, "low"),
        ({"type": "enabled", "budget_tokens": 8000}, "medium"),
        ({"type": "enabled", "budget_tokens": 32000}, "high"),
        ({"type": "disabled"}, None),
        ({"type": "adaptive"}, None),  # the upstream's default
        ({"type": "adaptive", "output_config": {"effort": "max"}}, "high"),
        ({"type": "enabled", "budget_tokens": 32000, "output_config": {"effort": "low"}}, "low"),
    ],
)
def test_thinking_and_effort_map_to_reasoning_effort(
    thinking: dict[str, Any], effort: str | None
) -> None:
    output = thinking.pop("output_config", None)
    body = {"model": "m", "max_tokens": 64000, "messages": ASK, "thinking": thinking}
    _, options = _parts({**body, "output_config": output} if output else body)
    assert options.reasoning_effort == effort


def test_an_output_format_is_a_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    output = {"format": {"type": "json_schema", "schema": schema}}
    _, options = _parts({"model": "m", "max_tokens": 10, "messages": ASK, "output_config": output})
    assert options.response_format is not None
    assert options.response_format.type == "json_schema"
    assert options.response_format.json_schema is not None
    assert options.response_format.json_schema.schema == schema


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                        "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}]}]},
         "messages[0].content[0].content"),
    ],
)  # fmt: skip
def test_what_is_not_relayed_is_refused_naming_the_field(
    change: dict[str, Any], where: str
) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": ASK, **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(InvalidRequest) as caught:
        _parts(body)
    assert caught.value.message.startswith(where)
