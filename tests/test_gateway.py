"""The OpenAI-compatible gateway, seen through the official `openai` SDK.

Every integration test runs a real gateway (uvicorn, in this event loop), real
NATS, real workers and fake providers over HTTP, and asserts what an OpenAI
client sees: the text, usage, model, status codes and error bodies. A few
tests read the raw SSE wire with httpx where the SDK hides it ([DONE]).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import openai
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from broker import Chunk, Error, Notice, RelayClient, ensure_topology
from broker._config import Config, GatewaySettings, Secret
from broker._protocol import decode_event
from broker._server import free_port, llmrelay_command
from devstack import MockProvider, expected_answer
from gateway import InvalidRequest, ReplyFold, StreamReset, parse_request, serve_gateway
from tests._harness import (
    NatsUrls,
    StartStack,
    mock_pool,
    relay_config,
    running_workers,
    upstream,
)

PROMPT = "Say hello"  # the fake provider counts len // 4 = 2 prompt tokens
PROMPT_TOKENS = 2
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]
FAST_FAILOVER: dict[str, Any] = {"max_retries": 0, "concurrency": 4}


def gateway_config(
    a: MockProvider,
    b: MockProvider,
    *,
    a_model: str = "gpt-a",
    b_model: str = "gpt-b",
    streams: dict[str, Any] | None = None,
    midstream: str = "continue",
    **gateway: Any,
) -> Config:
    """Route `chat`: pool a (a_model) then pool b (b_model); route `solo`: pool a only."""
    chat = {"targets": [("a", a_model), ("b", b_model)], "midstream": midstream}
    cfg = relay_config(
        {"a": mock_pool(a.url, **FAST_FAILOVER), "b": mock_pool(b.url, **FAST_FAILOVER)},
        {"chat": chat, "solo": [("a", a_model)]},
        streams=streams,
    )
    return msgspec.structs.replace(cfg, gateway=GatewaySettings(**gateway))


@asynccontextmanager
async def _sdk_gateway(
    urls: NatsUrls, cfg: Config, *, api_key: str = "unused"
) -> AsyncIterator[openai.AsyncOpenAI]:
    """Workers for both pools, a gateway, and an SDK client (no SDK retries)."""
    async with (
        running_workers(cfg, ["a", "b"], urls.worker),
        serve_gateway(cfg, nats_url=urls.client) as base_url,
        openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0) as client,
    ):
        yield client


@asynccontextmanager
async def _wire_gateway(urls: NatsUrls, cfg: Config) -> AsyncIterator[httpx.AsyncClient]:
    """A worker of pool a, a gateway, and an httpx client on its /v1 (the raw wire)."""
    async with (
        running_workers(cfg, ["a"], urls.worker),
        serve_gateway(cfg, nats_url=urls.client) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        yield http


StartGateway = Callable[..., AbstractAsyncContextManager[openai.AsyncOpenAI]]
StartWire = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture(name="gateway")
def _gateway_fixture(worker_url: str, client_url: str) -> StartGateway:
    """``async with gateway(cfg, api_key=...) as client``: an SDK client of a running gateway."""
    return functools.partial(_sdk_gateway, NatsUrls(worker_url, client_url))


@pytest.fixture(name="wire")
def _wire_fixture(worker_url: str, client_url: str) -> StartWire:
    """``async with wire(cfg) as http``: httpx on a running gateway's /v1."""
    return functools.partial(_wire_gateway, NatsUrls(worker_url, client_url))


@pytest.fixture
async def mocks() -> AsyncIterator[tuple[MockProvider, MockProvider]]:
    async with MockProvider(name="a", tokens=5) as a, MockProvider(name="b", tokens=4) as b:
        yield a, b


async def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Poll a condition that has no event to await (another server's state)."""
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.01)


async def get(client: openai.AsyncOpenAI, path: str) -> httpx.Response:
    """GET a path beside /v1 (probes, metrics) of the gateway behind ``client``."""
    root = str(client.base_url).removesuffix("/").removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        return await http.get(root + path)


async def read_stream(stream: Any) -> tuple[str, list[Any]]:
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# --- answers -------------------------------------------------------------------------


async def test_non_streamed_completion_is_the_exact_answer_with_usage(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with gateway(cfg) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=MESSAGES
        )
        completion = raw.parse()
    assert completion.choices[0].message.content == expected_answer("a", 5)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-a"
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert completion.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 5,
    }
    assert completion.usage.total_tokens == PROMPT_TOKENS + 5
    assert completion.id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert raw.headers["x-llmrelay-pool"] == "a"


async def test_streamed_completion_is_the_exact_answer_with_usage_last(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with gateway(cfg) as client:
        stream = await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text, chunks = await read_stream(stream)
    assert text == expected_answer("a", 5)
    # The provider sends the 5 tokens at once: they are one delta (one read, one message).
    assert chunks[0].choices[0].delta.content == expected_answer("a", 5)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"gpt-a"}  # every chunk names the upstream model
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (PROMPT_TOKENS, 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_stream_ends_with_done_marker_on_the_wire(
    wire: StartWire, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with wire(cfg) as http:
        body = {"model": "chat", "messages": MESSAGES, "stream": True}
        response = await http.post("/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in response.text  # not asked for


async def test_failover_before_any_text_is_invisible_but_for_the_model(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks, a_model="gpt-a+status=503")
    async with gateway(cfg) as client:
        whole = await client.chat.completions.create(model="chat", messages=MESSAGES)
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        text, chunks = await read_stream(stream)
    assert whole.choices[0].message.content == expected_answer("b", 4)
    assert whole.model == "gpt-b"
    assert text == expected_answer("b", 4)
    assert {c.model for c in chunks} == {"gpt-b"}  # the backup's, from its first chunk on
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_failover_mid_answer_is_invisible_in_a_non_streamed_completion(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    a, b = mocks
    cfg = gateway_config(a, b, a_model="x+cut=3")
    async with gateway(cfg) as client:
        completion = await client.chat.completions.create(model="chat", messages=MESSAGES)
    # b continues a's three tokens (a prefill) up to its own length of 4.
    assert completion.choices[0].message.content == expected_answer("a", 4)
    assert completion.model == "gpt-b"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert a.stats()["requests"] == 1 and b.stats()["requests"] == 1
    assert b.stats()["prefills"] == 1


# --- the reset policy ----------------------------------------------------------------------


async def test_reset_after_text_was_sent_ends_the_stream_with_an_error(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    """`midstream: restart`: text flows at once; a reset after it is an error, never a mix."""
    cfg = gateway_config(*mocks, a_model="x+cut=3", midstream="restart")
    seen: list[str] = []
    async with gateway(cfg) as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == expected_answer("a", 3)  # what the SDK user saw: a's partial text
    assert caught.value.code == "stream_interrupted"
    assert "restarted" in caught.value.message and "retry" in caught.value.message
    assert not any("Hello from b" in s for s in seen)


async def test_a_broken_stream_is_never_closed_as_complete(
    wire: StartWire, mocks: tuple[MockProvider, MockProvider]
) -> None:
    """No target left after text was sent: an SSE error event and no [DONE]."""
    cfg = gateway_config(*mocks, a_model="x+error_after=2")
    async with wire(cfg) as http:
        body = {"model": "solo", "messages": MESSAGES, "stream": True}
        response = await http.post("/chat/completions", json=body)
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert response.status_code == 200
    assert "[DONE]" not in events
    last = msgspec.json.decode(events[-1])
    assert last["error"]["code"] == "all_providers_failed"
    assert last["error"]["type"] == "server_error"
    texts = [msgspec.json.decode(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert "".join(texts) == expected_answer("a", 2)


async def test_a_slow_start_gets_keepalives_and_a_later_error_arrives_in_the_stream(
    wire: StartWire, mocks: tuple[MockProvider, MockProvider]
) -> None:
    """Headers are held for the first text only up to the keep-alive interval."""
    cfg = gateway_config(*mocks, a_model="x+error=content_filter+ttft_ms=600", keepalive_s=0.1)
    async with wire(cfg) as http:
        body = {"model": "solo", "messages": MESSAGES, "stream": True}
        response = await http.post("/chat/completions", json=body)
    events = [e for e in response.text.split("\n\n") if e]
    assert response.status_code == 200  # committed by the first keep-alive
    assert events[0] == ": keep-alive"
    assert msgspec.json.decode(events[-1].removeprefix("data: "))["error"]["code"] == (
        "content_filtered"
    )
    assert "[DONE]" not in response.text


async def test_holdback_hides_a_reset_within_the_window(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    """With stream_holdback_ms, an early mid-stream failover is invisible."""
    cfg = gateway_config(*mocks, a_model="x+cut=3", midstream="restart", stream_holdback_ms=5000)
    async with gateway(cfg) as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        text, chunks = await read_stream(stream)
        metrics = (await get(client, "/metrics")).text
    assert text == expected_answer("b", 4)
    assert chunks[-1].model == "gpt-b"
    assert 'llmrelay_gateway_stream_resets_total{outcome="hidden",route="chat"} 1.0' in metrics


def _chunk(attempt: int, delta: str, seq: int = 0) -> Chunk:
    return Chunk(seq=seq, attempt=attempt, delta=delta)


def test_fold_forwards_at_once_and_refuses_to_mix_attempts() -> None:
    fold = ReplyFold(0.0)
    assert fold.chunk(_chunk(1, "Hello"), now=0.0) == "Hello"
    with pytest.raises(StreamReset, match="after 5 characters"):
        fold.notice(Notice(kind="failover", attempt=1, from_pool="a", to_pool="b", reset=True))


def test_fold_drops_held_text_on_reset_and_ignores_stale_events() -> None:
    fold = ReplyFold(0.2)
    assert fold.chunk(_chunk(1, "partial"), now=10.0) == ""
    assert fold.due_at() == pytest.approx(10.2)
    # The backup's first chunk overtakes the failing worker's notice.
    assert fold.chunk(_chunk(2, "clean "), now=10.1) == ""
    fold.notice(Notice(kind="failover", attempt=1, reset=True))
    assert fold.chunk(_chunk(1, "stale"), now=10.15) == ""
    assert fold.flush(now=10.2) == ""  # the window restarted with attempt 2
    assert fold.flush(now=10.3) == "clean "
    assert fold.chunk(_chunk(2, "answer", seq=1), now=10.4) == "answer"
    assert fold.resets == 1


def test_fold_ignores_a_reset_notice_before_any_text() -> None:
    fold = ReplyFold(0.0)
    fold.notice(Notice(kind="redelivered", attempt=2, reset=True))
    assert fold.chunk(_chunk(2, "fine"), now=0.0) == "fine"


def test_non_streamed_fold_holds_everything_until_done() -> None:
    fold = ReplyFold(float("inf"))
    for attempt, seq, delta in [(1, 0, "a "), (1, 1, "b "), (2, 0, "c "), (2, 1, "d")]:
        assert fold.chunk(_chunk(attempt, delta, seq), now=1e9) == ""
    assert fold.finish() == "c d"


# --- errors ----------------------------------------------------------------------------------


async def test_queue_full_is_429_with_retry_after(
    nc: NATS, client_url: str, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks, streams={"queue_capacity": 1}, retry_after_s=3)
    await ensure_topology(nc, cfg)  # no workers: the queue only fills
    async with RelayClient(client_url, config=cfg) as relay:
        await relay.submit("occupy the only slot", route="chat")
    async with (
        serve_gateway(cfg, nats_url=client_url) as base_url,
        openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "queue_full"
    assert caught.value.type == "rate_limit_error"
    assert "queue is full" in caught.value.message


async def test_deadline_exceeded_is_504(gateway: StartGateway) -> None:
    slow = MockProvider(name="slow", tokens=3, ttft_ms=2000)
    async with slow, gateway(gateway_config(slow, slow, request_timeout_s=0.5)) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="solo", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.code == "deadline_exceeded"


async def test_all_providers_failed_is_502_with_every_reason(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks, a_model="gpt-a+status=503", b_model="gpt-b+status=500")
    async with gateway(cfg) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    err = caught.value
    assert err.status_code == 502
    assert err.code == "all_providers_failed"
    assert "a/gpt-a+status=503: upstream_unavailable (HTTP 503)" in err.message
    assert "b/gpt-b+status=500: upstream_unavailable (HTTP 500)" in err.message
    assert isinstance(err.body, dict)
    assert [(t["pool"], t["status"]) for t in err.body["attempts"]] == [("a", 503), ("b", 500)]


@pytest.mark.parametrize(
    ("fault", "code", "reason"),
    [
        ("error=content_filter", "content_filtered", "content filtering policy"),
        ("status=400+error=context_length_exceeded", "context_length_exceeded", "prompt is too"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_client_errors_are_400_with_the_providers_reason(
    fault: str,
    code: str,
    reason: str,
    stream: bool,
    gateway: StartGateway,
    mocks: tuple[MockProvider, MockProvider],
) -> None:
    a, b = mocks
    cfg = gateway_config(a, b, a_model=f"gpt-a+{fault}")
    async with gateway(cfg) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES, stream=stream)
    assert caught.value.code == code
    assert reason in caught.value.message
    assert caught.value.type == "invalid_request_error"
    assert b.stats()["requests"] == 0  # trying elsewhere would fail too


async def test_unknown_route_is_404_naming_the_model(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with gateway(cfg) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-5", messages=MESSAGES)
        models = await client.models.list()
        chat = await client.models.retrieve("chat")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-5")
    assert caught.value.code == "unknown_route"
    assert caught.value.param == "model"
    assert "gpt-5" in caught.value.message and "chat" in caught.value.message
    assert [m.id for m in models.data] == ["chat", "solo"]
    assert chat.owned_by == "llmrelay"


def body(**fields: Any) -> dict[str, Any]:
    """A chat request for route `chat`; ``fields`` replace or add fields (None removes one)."""
    merged = {"model": "chat", "messages": MESSAGES, **fields}
    return {k: v for k, v in merged.items() if v is not None}


def user_says(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize(
    ("request_body", "param", "words"),
    [
        (body(model=None), "model", "missing required field"),
        (body(messages=user_says(5)), "messages[0].content", "got `int`"),
        (body(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", "robot"),
        (body(messages=[]), "messages", "length >= 1"),
        (body(temperature=9), "temperature", "<= 2"),
        (body(n=2), "n", "n must be 1"),
        (body(tools=[{"type": "function"}]), "tools[0].function", "missing required field"),
        (body(functions=[{"name": "f"}]), "functions", "use tools"),
        (
            body(messages=[{"role": "tool", "content": "42"}]),
            "messages[0].tool_call_id",
            "names the call",
        ),
        (
            body(messages=user_says([{"type": "image_url"}])),
            "messages[0].content[0].image_url",
            "missing required field",
        ),
        (
            body(messages=user_says([{"type": "video", "video": {}}])),
            "messages[0].content[0].type",
            "video",
        ),
    ],
)
async def test_malformed_body_is_400_naming_the_field(
    request_body: dict[str, Any],
    param: str,
    words: str,
    gateway: StartGateway,
    mocks: tuple[MockProvider, MockProvider],
) -> None:
    cfg = gateway_config(*mocks)
    async with gateway(cfg) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.post("/chat/completions", body=request_body, cast_to=object)
    assert caught.value.param == param
    assert words in caught.value.message
    assert caught.value.code == "invalid_job"


def test_text_parts_are_joined_and_developer_is_system() -> None:
    from gateway import to_messages

    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    developer = {"role": "developer", "content": "Be brief."}
    req = parse_request(msgspec.json.encode(body(messages=[developer, *user_says(parts)])))
    assert [(m.role, m.content) for m in to_messages(req)] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_request(b"{nope")


async def test_invalid_json_is_400(
    client_url: str, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with (
        serve_gateway(cfg, nats_url=client_url) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        response = await http.post("/chat/completions", content=b'{"model": "chat", ')
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"]


# --- keys --------------------------------------------------------------------------------------


async def test_api_keys_are_required_when_configured(
    gateway: StartGateway,
    mocks: tuple[MockProvider, MockProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    keys = [Secret("sk-gw-first"), Secret("sk-gw-second")]
    cfg = gateway_config(*mocks, api_keys=keys)
    async with gateway(cfg, api_key="sk-gw-second") as client:
        ok = await client.chat.completions.create(model="chat", messages=MESSAGES)
        models = await client.models.list()
        for bad in ("sk-gw-firs", "sk-gw-first-and-more", "SK-GW-SECOND"):
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.with_options(api_key=bad).chat.completions.create(
                    model="chat", messages=MESSAGES
                )
            assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client.with_options(api_key="nope").models.list()
        health = await get(client, "/healthz")
        async with httpx.AsyncClient(base_url=str(client.base_url)) as http:
            keyless = await http.post("chat/completions", json=body())
    assert ok.choices[0].message.content == expected_answer("a", 5)
    assert len(models.data) == 2
    assert health.status_code == 200  # probes need no key
    assert keyless.status_code == 401
    assert keyless.json()["error"]["type"] == "authentication_error"
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("llmrelay", "uvicorn"))]
    assert ours and not any("sk-gw" in line for line in ours)
    assert "sk-gw" not in repr(cfg)


# --- disconnects ------------------------------------------------------------------------------


async def _last_reply(nc: NATS, request_id: str) -> Any:
    try:
        msg = await nc.jetstream().get_last_msg("LLM_REPLIES", f"llm.reply.{request_id}")
    except NotFoundError:
        return None
    return decode_event(msg.data or b"")


async def test_client_disconnect_cancels_the_job_and_the_upstream_stream(
    nc: NATS, gateway: StartGateway
) -> None:
    long = MockProvider(name="long", tokens=200, token_delay_ms=50)
    async with long, gateway(gateway_config(long, long)) as client:
        stream = await client.chat.completions.create(model="solo", messages=MESSAGES, stream=True)
        first = await stream.__anext__()
        assert first.choices[0].delta.content == "Hello from long."
        assert long.stats()["active"] == 1
        request_id = stream.response.headers["x-request-id"]
        await stream.close()  # the client goes away mid-answer
        await wait_until(lambda: long.stats()["active"] == 0)
        last = await _last_reply(nc, request_id)
        metrics = (await get(client, "/metrics")).text
    assert isinstance(last, Error) and last.code == "cancelled"
    assert 'llmrelay_gateway_cancels_total{reason="disconnected",route="solo"} 1.0' in metrics


async def test_disconnect_while_waiting_for_a_whole_answer_cancels_the_job(wire: StartWire) -> None:
    long = MockProvider(name="long", tokens=200, token_delay_ms=50)
    async with long, wire(gateway_config(long, long)) as http:
        body = {"model": "solo", "messages": MESSAGES}
        await _post_then_give_up(http, body, once=lambda: long.stats()["active"] == 1)
        await wait_until(lambda: long.stats()["active"] == 0)
    assert long.stats()["requests"] == 1


async def _post_then_give_up(
    http: httpx.AsyncClient, body: dict[str, Any], *, once: Callable[[], bool]
) -> None:
    """POST a chat request; close the connection (as a client giving up) once ``once()``."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(http.post, "/chat/completions", json=body))
        await wait_until(once)
        tg.cancel_scope.cancel()  # the client gives up and closes its connection


# --- probes -------------------------------------------------------------------------------------


async def test_readyz_needs_nats_and_the_topology(
    nc: NATS, client_url: str, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with (
        serve_gateway(cfg, nats_url=client_url) as base_url,
        httpx.AsyncClient(base_url=base_url.removesuffix("/v1")) as http,
    ):
        before = await http.get("/readyz")
        await ensure_topology(nc, cfg)
        after = await http.get("/readyz")
        health = await http.get("/healthz")
    assert before.status_code == 503
    assert "route chat" in before.json()["reason"]
    assert after.status_code == 200 and after.json() == {"status": "ready"}
    assert health.status_code == 200


async def test_metrics_count_requests_by_route_and_outcome(
    gateway: StartGateway, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with gateway(cfg) as client:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-route", messages=MESSAGES)
        text = (await get(client, "/metrics")).text
    assert 'llmrelay_gateway_requests_total{outcome="done",route="chat",stream="false"} 1.0' in text
    assert 'outcome="unknown_route",route="_unknown",stream="false"' in text
    assert "no-such-route" not in text


async def test_unknown_path_is_a_json_404(
    client_url: str, mocks: tuple[MockProvider, MockProvider]
) -> None:
    cfg = gateway_config(*mocks)
    async with (
        serve_gateway(cfg, nats_url=client_url) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        missing = await http.post("/completions", json={})
        wrong_method = await http.get("/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_gateway_command_with_two_worker_processes(
    relay_stack: StartStack, client_url: str, tmp_path: Path
) -> None:
    """`llmrelay gateway --workers 2` answers, and /metrics counts every process's requests."""
    port = free_port()
    a = {"a": upstream(MockProvider(name="a", tokens=3))}
    async with relay_stack(a, {"chat": [("a", "gpt-a")]}, relay=None) as s:
        config_file = tmp_path / "llmrelay.yaml"
        config_file.write_text(
            yaml.safe_dump(
                {
                    "pools": s.pools,
                    "routes": {"chat": {"targets": [{"pool": "a", "model": "gpt-a"}]}},
                    "gateway": {"port": port, "api_keys": ["sk-cli"]},
                }
            )
        )
        args = ["--config", str(config_file), "--nats-url", client_url, "--workers", "2"]
        async with gateway_process(args, port, api_key="sk-cli") as client:
            answers = [
                await client.chat.completions.create(model="chat", messages=MESSAGES)
                for _ in range(6)
            ]
            metrics = (await get(client, "/metrics")).text
    assert {r.choices[0].message.content for r in answers} == {expected_answer("a", 3)}
    assert 'llmrelay_gateway_requests_total{outcome="done",route="chat",stream="false"} 6.0' in (
        metrics
    )


@asynccontextmanager
async def gateway_process(
    args: list[str], port: int, *, api_key: str
) -> AsyncIterator[openai.AsyncOpenAI]:
    """`llmrelay gateway ARGS` on ``port``, and an SDK client once it is ready."""
    command = [*llmrelay_command(), "gateway", *args]
    async with (
        await anyio.open_process(command, stderr=subprocess.DEVNULL) as gw,
        openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key=api_key,
            max_retries=0,
            default_headers={"connection": "close"},  # new connections: either process
        ) as client,
    ):
        try:
            await wait_until_ready(port)
            yield client
        finally:
            gw.terminate()


async def wait_until_ready(port: int, timeout_s: float = 20.0) -> None:
    """Poll /readyz of a gateway process until it answers 200."""
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(timeout_s):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        return
                await anyio.sleep(0.05)
