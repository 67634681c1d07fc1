"""Each provider adapter against the fake provider over real HTTP, plus stream edge cases.

The fake provider (``devstack.fake_provider``) runs in the test's event loop and
speaks all three formats; faults are asked for with model-name suffixes. Edge
cases no well-behaved server produces (a ``[DONE]`` without usage, a stream cut
before any finish reason) are fed through an httpx transport with canned bytes.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from broker._config import PoolConfig, Secret
from broker._errors import ConfigError
from broker._protocol import Job, Message, Usage
from devstack import MockProvider, expected_answer
from workers.providers import (
    PROVIDERS,
    AuthFailed,
    ContentFiltered,
    ContextLengthExceeded,
    Finish,
    Malformed,
    ProviderError,
    RateLimited,
    StreamInterrupted,
    StreamItem,
    TextDelta,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamUnavailable,
    make_provider,
)
from workers.providers._errors_map import error_for_payload, error_for_status, retry_after_s

# Marked here, not only by conftest (which marks after collection, too late for parametrize).
pytestmark = pytest.mark.anyio

NAME = "mock-p"
TOKENS = 6
KINDS = ["openai", "anthropic", "ollama", "gemini"]
SYSTEM = "You are terse."
USER = "Say hello to the relay, please."


def make_job(**fields: Any) -> Job:
    messages = [Message(role="system", content=SYSTEM), Message(role="user", content=USER)]
    return Job(id="j1", route="chat", messages=messages, reply_to="r.j1", deadline_ms=0, **fields)


def make_pool(kind: str, url: str, **fields: Any) -> PoolConfig:
    base_url = f"{url}/v1" if kind == "openai" else url
    return PoolConfig(kind=kind, base_url=base_url, api_key=Secret("sk-test"), **fields)  # type: ignore[arg-type]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name=NAME, tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


async def collect(
    kind: str, url: str, client: httpx.AsyncClient, model: str = "m", **job: Any
) -> list[StreamItem]:
    provider = make_provider(make_pool(kind, url), client)
    return [item async for item in provider.stream(make_job(**job), model)]


async def collect_until_error(
    kind: str, url: str, client: httpx.AsyncClient, model: str
) -> tuple[list[StreamItem], ProviderError]:
    items: list[StreamItem] = []
    provider = make_provider(make_pool(kind, url), client)
    with pytest.raises(ProviderError) as caught:
        async for item in provider.stream(make_job(), model):
            items.append(item)
    return items, caught.value


def text_of(items: list[StreamItem]) -> str:
    return "".join(item.text for item in items if isinstance(item, TextDelta))


def prompt_estimate() -> int:
    return (len(SYSTEM) + len(USER)) // 4


# --- against the fake provider -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_full_answer_usage_and_finish(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    items = await collect(kind, mock.url, client)
    assert text_of(items) == expected_answer(NAME, TOKENS)
    assert sum(isinstance(item, TextDelta) for item in items) == TOKENS
    usage = Usage(prompt_tokens=prompt_estimate(), completion_tokens=TOKENS)
    assert items[-1] == Finish("stop", usage)


@pytest.mark.parametrize("kind", KINDS)
async def test_max_tokens_shortens_the_answer_and_reports_length(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    items = await collect(kind, mock.url, client, max_tokens=3)
    assert text_of(items) == expected_answer(NAME, 3)
    assert isinstance(items[-1], Finish)
    assert items[-1].reason == "length"


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_is_reused_across_requests(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    for _ in range(20):
        assert text_of(await collect(kind, mock.url, client)) == expected_answer(NAME, TOKENS)
    assert mock.stats()["requests"] == 20
    assert mock.stats()["connections"] == 1


async def test_stopping_at_finish_still_returns_the_connection_for_reuse(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    provider = make_provider(make_pool("anthropic", mock.url), client)
    for _ in range(5):
        async with aclosing(provider.stream(make_job(), "m")) as stream:
            async for item in stream:
                if isinstance(item, Finish):
                    break
    assert mock.stats()["connections"] == 1


async def test_abandoning_an_answer_closes_the_connection(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Closing the socket is how an upstream generation is cancelled.
    provider = make_provider(make_pool("openai", mock.url), client)
    async with aclosing(provider.stream(make_job(), "m+token_delay_ms=200")) as stream:
        assert isinstance(await anext(stream), TextDelta)
    assert text_of(await collect("openai", mock.url, client)) == expected_answer(NAME, TOKENS)
    assert mock.stats()["connections"] == 2


FAULTS: list[tuple[str, type[ProviderError], int | None, float | None]] = [
    ("status=503", UpstreamUnavailable, 503, None),
    ("status=500", UpstreamUnavailable, 500, None),
    ("status=408", UpstreamUnavailable, 408, None),
    ("status=529", UpstreamUnavailable, 529, None),
    ("status=503+retry_after=3", UpstreamUnavailable, 503, 3.0),
    ("status=429+retry_after=2", RateLimited, 429, 2.0),
    ("status=429+retry_after_ms=1500", RateLimited, 429, 1.5),
    ("status=429", RateLimited, 429, None),
    ("status=401", AuthFailed, 401, None),
    ("status=403", AuthFailed, 403, None),
    ("status=400+error=context_length_exceeded", ContextLengthExceeded, 400, None),
    ("error=context_length_exceeded", ContextLengthExceeded, 400, None),
    ("error=content_filter", ContentFiltered, 400, None),
    ("error=content_policy_violation", ContentFiltered, 400, None),
    ("status=404", UpstreamRejected, 404, None),
    ("status=400", UpstreamRejected, 400, None),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("fault", "error", "status", "retry_after"), FAULTS)
async def test_status_faults_map_to_provider_errors(
    kind: str,
    fault: str,
    error: type[ProviderError],
    status: int | None,
    retry_after: float | None,
    mock: MockProvider,
    client: httpx.AsyncClient,
) -> None:
    items, exc = await collect_until_error(kind, mock.url, client, f"m+{fault}")
    assert items == []
    assert type(exc) is error
    assert exc.status == status
    assert exc.retry_after_s == retry_after
    assert exc.message  # the provider's own words, not an empty string


@pytest.mark.parametrize("kind", KINDS)
async def test_rejection_carries_the_providers_message(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    _, exc = await collect_until_error(kind, mock.url, client, "m+status=404")
    assert isinstance(exc, UpstreamRejected)
    assert exc.message == "The model does not exist."
    assert exc.code == "bad_request"
    assert not exc.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_reset_before_headers_is_a_connect_error(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    items, exc = await collect_until_error(kind, mock.url, client, "m+reset")
    assert items == []
    assert isinstance(exc, UpstreamConnectError)
    assert exc.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_refused_connection_is_a_connect_error(kind: str, client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, exc = await collect_until_error(kind, f"http://127.0.0.1:{port}", client, "m")
    assert isinstance(exc, UpstreamConnectError)


@pytest.mark.parametrize("kind", KINDS)
async def test_cut_stream_raises_stream_interrupted_after_the_sent_deltas(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    items, exc = await collect_until_error(kind, mock.url, client, "m+cut=2")
    assert isinstance(exc, StreamInterrupted)
    assert text_of(items) == expected_answer(NAME, 2)
    assert all(isinstance(item, TextDelta) for item in items)


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_event_is_reported_and_the_rest_of_the_text_arrives(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    items = await collect(kind, mock.url, client, "m+malformed=3")
    malformed = [item for item in items if isinstance(item, Malformed)]
    assert len(malformed) == 1
    assert "<<not json>>" in malformed[0].raw
    assert items.index(malformed[0]) == 2  # in place, after two good deltas
    assert text_of(items) == expected_answer(NAME, TOKENS)
    assert isinstance(items[-1], Finish)


@pytest.mark.parametrize("kind", KINDS)
async def test_missing_terminator_finalises_without_waiting_for_the_socket(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # The server keeps the socket open forever after the usage; only finalising
    # on the usage itself lets this finish inside the deadline.
    with anyio.fail_after(2):
        items = await collect(kind, mock.url, client, "m+nodone")
    assert text_of(items) == expected_answer(NAME, TOKENS)
    assert items[-1] == Finish(
        "stop", Usage(prompt_tokens=prompt_estimate(), completion_tokens=TOKENS)
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_error_event_mid_stream_raises_the_mapped_error(
    kind: str, mock: MockProvider, client: httpx.AsyncClient
) -> None:
    items, exc = await collect_until_error(kind, mock.url, client, "m+error_after=2")
    assert text_of(items) == expected_answer(NAME, 2)
    assert isinstance(exc, UpstreamUnavailable)
    assert "Overloaded" in exc.message


async def test_error_event_mid_stream_keeps_its_kind(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    model = "m+error_after=1+error=context_length_exceeded"
    _, exc = await collect_until_error("anthropic", mock.url, client, model)
    assert isinstance(exc, ContextLengthExceeded)


def test_make_provider_picks_the_adapter_by_kind() -> None:
    assert set(PROVIDERS) == {"openai", "anthropic", "ollama", "azure", "gemini", "bedrock"}
    http = httpx.AsyncClient()
    for kind, cls in PROVIDERS.items():
        assert type(make_provider(make_pool(kind, "http://x"), http)) is cls
    bad = PoolConfig(kind="watsonx", base_url="http://x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="watsonx"):
        make_provider(bad, http)


# --- what goes on the wire -------------------------------------------------------


def js(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


def oa(chunk: Any) -> bytes:
    """One OpenAI SSE chunk."""
    return f"data: {js(chunk)}\n\n".encode()


def an(event: str, data: Any) -> bytes:
    """One Anthropic SSE event."""
    return f"event: {event}\ndata: {js(data)}\n\n".encode()


def ol(*lines: Any) -> bytes:
    """Ollama NDJSON lines (str lines are sent as they are)."""
    return b"".join((ln if isinstance(ln, str) else js(ln)).encode() + b"\n" for ln in lines)


def choice(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


DONE = b"data: [DONE]\n\n"
OA_TEXT = oa(choice("Hi"))
OA_STOP = oa(choice(finish="stop"))
OA_USAGE = oa({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}})
AN_STOP = an("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}})
CANNED = {
    "openai": oa(choice("ok", "stop")) + DONE,
    "anthropic": AN_STOP,
    "ollama": ol({"message": {"content": "ok"}, "done": True}),
}


def canned_client(body: bytes, seen: list[httpx.Request], status: int = 200) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, stream=httpx.ByteStream(body))

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def sent_request(kind: str, **job: Any) -> tuple[httpx.Request, dict[str, Any]]:
    seen: list[httpx.Request] = []
    pool = make_pool(kind, "http://upstream", headers={"x-team": Secret("relay")})
    async with canned_client(CANNED[kind], seen) as http:
        items = [item async for item in make_provider(pool, http).stream(make_job(**job), "m1")]
    assert isinstance(items[-1], Finish)
    return seen[0], msgspec.json.decode(seen[0].content)


async def test_openai_request_shape() -> None:
    request, body = await sent_request(
        "openai", max_tokens=50, temperature=0.2, stop=["\n"], seed=7, traceparent="00-ab-cd-01"
    )
    assert str(request.url) == "http://upstream/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["traceparent"] == "00-ab-cd-01"
    assert request.headers["x-team"] == "relay"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}
    sampling = {key: body[key] for key in ("max_tokens", "temperature", "stop", "seed")}
    assert sampling == {"max_tokens": 50, "temperature": 0.2, "stop": ["\n"], "seed": 7}
    assert "top_p" not in body


async def test_anthropic_request_maps_system_and_defaults_max_tokens() -> None:
    request, body = await sent_request("anthropic", top_p=0.9, stop=["END"])
    assert str(request.url) == "http://upstream/v1/messages"
    assert request.headers["x-api-key"] == "sk-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert "traceparent" not in request.headers
    assert body["system"] == SYSTEM
    assert body["messages"] == [{"role": "user", "content": USER}]
    assert (body["max_tokens"], body["top_p"], body["stop_sequences"]) == (1024, 0.9, ["END"])
    assert body["stream"] is True


async def test_ollama_request_puts_sampling_in_options() -> None:
    request, body = await sent_request("ollama", max_tokens=9, temperature=0.0, seed=1)
    assert str(request.url) == "http://upstream/api/chat"
    assert body["stream"] is True
    assert body["options"] == {"num_predict": 9, "temperature": 0.0, "seed": 1}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


async def test_secret_never_appears_in_errors() -> None:
    seen: list[httpx.Request] = []
    body = b'{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error"}}'
    async with canned_client(body, seen, status=401) as http:
        provider = make_provider(make_pool("openai", "http://upstream"), http)
        with pytest.raises(AuthFailed) as caught:
            async for _ in provider.stream(make_job(), "m1"):
                pass
    assert "sk-test" not in str(caught.value)


# --- stream edge cases, fed as canned bytes ----------------------------------------


async def canned_items(kind: str, body: bytes) -> list[StreamItem]:
    async with canned_client(body, []) as http:
        provider = make_provider(make_pool(kind, "http://upstream"), http)
        return [item async for item in provider.stream(make_job(), "m1")]


async def test_openai_done_without_usage_finishes_with_no_usage() -> None:
    items = await canned_items("openai", OA_TEXT + OA_STOP + DONE)
    assert items == [TextDelta("Hi", last=True), Finish("stop", None)]  # one read: last


async def test_openai_close_after_finish_reason_without_done_finishes() -> None:
    usage = Usage(prompt_tokens=4, completion_tokens=1)
    assert (await canned_items("openai", OA_TEXT + OA_STOP + OA_USAGE))[-1] == Finish("stop", usage)
    assert (await canned_items("openai", OA_TEXT + OA_STOP))[-1] == Finish("stop", None)


@pytest.mark.parametrize(
    "body", [OA_TEXT, OA_TEXT + DONE, OA_TEXT + OA_USAGE], ids=["eof", "done", "usage"]
)
async def test_openai_stream_without_finish_reason_is_interrupted(body: bytes) -> None:
    with pytest.raises(StreamInterrupted):
        await canned_items("openai", body)


async def test_openai_usage_in_the_finishing_chunk_finishes_at_once() -> None:
    chunk = {**choice("!", "length"), "usage": {"prompt_tokens": 2, "completion_tokens": 9}}
    items = await canned_items("openai", oa(chunk) + b"data: this is never read\n\n")
    usage = Usage(prompt_tokens=2, completion_tokens=9)
    assert items == [TextDelta("!", last=True), Finish("length", usage)]


async def test_openai_error_object_and_error_event_mid_stream() -> None:
    error = oa({"error": {"message": "The server had an error", "type": "server_error"}})
    with pytest.raises(UpstreamUnavailable, match="server had an error"):
        await canned_items("openai", OA_TEXT + error)
    event = an("error", {"error": {"message": "slow down", "type": "rate_limit_error"}})
    with pytest.raises(RateLimited):
        await canned_items("openai", OA_TEXT + event)


AN_START = an(
    "message_start",
    {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 11, "cache_read_input_tokens": 4}},
    },
)
AN_TEXT = an(
    "content_block_delta",
    {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Yo"}},
)
AN_PING = an("ping", {"type": "ping"})


async def test_anthropic_counts_usage_maps_stop_reason_and_ignores_ping() -> None:
    delta = {"stop_reason": "max_tokens"}
    end = an(
        "message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": 3}}
    )
    items = await canned_items("anthropic", AN_START + AN_PING + AN_TEXT + end)
    assert items == [
        TextDelta("Yo", last=True),
        Finish("length", Usage(prompt_tokens=15, completion_tokens=3, cached_tokens=4)),
    ]


async def test_anthropic_stream_without_stop_reason_is_interrupted() -> None:
    with pytest.raises(StreamInterrupted):
        await canned_items("anthropic", AN_START + AN_TEXT)


async def test_anthropic_message_stop_alone_finishes() -> None:
    stop = an("message_stop", {"type": "message_stop"})
    items = await canned_items("anthropic", AN_START + AN_TEXT + stop)
    usage = Usage(prompt_tokens=15, completion_tokens=0, cached_tokens=4)  # cache reads
    assert items[-1] == Finish("stop", usage)


async def test_anthropic_overloaded_error_event() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamUnavailable, match="Overloaded"):
        await canned_items("anthropic", AN_START + AN_TEXT + an("error", error))


async def test_ollama_error_line_and_malformed_line() -> None:
    text = {"message": {"content": "a"}, "done": False}
    with pytest.raises(UpstreamUnavailable, match="runner crashed"):
        await canned_items("ollama", ol(text, {"error": "runner crashed"}))
    items = await canned_items("ollama", ol('{"message":', "not json", {"done": True}))
    assert [type(item) for item in items] == [Malformed, Malformed, Finish]


async def test_ollama_stream_without_done_is_interrupted() -> None:
    with pytest.raises(StreamInterrupted):
        await canned_items("ollama", ol({"message": {"content": "a"}, "done": False}))


# --- error mapping, unit ---------------------------------------------------------------


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after": "7"}) == 7.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "7"}) == 0.25
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert retry_after_s({"retry-after": date}, now=1445412500.0) == 10.0
    assert retry_after_s({"retry-after": date}, now=1445412600.0) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def error_body(kind: str, **error: str) -> bytes:
    """An error answer in the shape of ``kind``'s provider."""
    if kind == "anthropic":
        return msgspec.json.encode({"type": "error", "error": error})
    if kind == "ollama":
        return msgspec.json.encode({"error": error["message"]})
    return msgspec.json.encode({"error": error})


STATUS_CASES: list[tuple[int, bytes, type[ProviderError]]] = [
    (
        400,
        error_body("openai", message="long", code="context_length_exceeded"),
        ContextLengthExceeded,
    ),
    (400, error_body("anthropic", message="prompt is too long: 3 > 2"), ContextLengthExceeded),
    (
        400,
        error_body("ollama", message="input length exceeds the context length"),
        ContextLengthExceeded,
    ),
    (400, error_body("openai", message="filtered", code="content_filter"), ContentFiltered),
    (400, error_body("openai", message="nope", type="invalid_request_error"), UpstreamRejected),
    (422, b"not json at all", UpstreamRejected),
    (
        529,
        error_body("anthropic", type="overloaded_error", message="Overloaded"),
        UpstreamUnavailable,
    ),
    (502, b"<html>bad gateway</html>", UpstreamUnavailable),
]


@pytest.mark.parametrize(("status", "body", "error"), STATUS_CASES)
def test_status_mapping(status: int, body: bytes, error: type[ProviderError]) -> None:
    exc = error_for_status(status, {}, body)
    assert type(exc) is error
    assert exc.status == status


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        ("overloaded_error", UpstreamUnavailable),
        ("rate_limit_error", RateLimited),
        ("invalid_request_error", UpstreamRejected),
        ("something_new", UpstreamUnavailable),
    ],
)
def test_in_stream_error_mapping_without_status(
    error_type: str, expected: type[ProviderError]
) -> None:
    assert type(error_for_payload({"error": {"type": error_type, "message": "x"}})) is expected
    assert type(error_for_payload({"error": "an Ollama failure"})) is UpstreamUnavailable
