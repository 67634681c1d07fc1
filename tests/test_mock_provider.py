"""The fake provider behaves like a real HTTP upstream: formats, keep-alive, stats, faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from devstack import (
    MockProvider,
    MockProviderProcess,
    answer_tokens,
    expected_answer,
    parse_fault,
)
from workers.providers._sse import NDJSONParser, SSEEvent, SSEParser

# Marked here, not only by conftest (which marks after collection, too late for parametrize).
pytestmark = pytest.mark.anyio

NAME = "mock-t"
TOKENS = 5
OPENAI = "/v1/chat/completions"


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name=NAME, tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url) as http:
        yield http


def chat_body(model: str = "m", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "What is the relay doing today?"}]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream, **extra}
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


async def post(
    client: httpx.AsyncClient, model: str = "m", path: str = OPENAI, **extra: Any
) -> httpx.Response:
    return await client.post(path, json=chat_body(model, **extra))


def sse(response: httpx.Response) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(response.content) + parser.close()


def openai_text(events: list[SSEEvent]) -> str:
    chunks = [msgspec.json.decode(e.data) for e in events if e.data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


# --- answers --------------------------------------------------------------------


def test_answer_is_deterministic_and_names_the_server() -> None:
    assert expected_answer("mock-a", 5) == expected_answer("mock-a", 5)
    assert expected_answer("mock-a", 5) != expected_answer("mock-b", 5)
    assert expected_answer("mock-a", 1) == "Hello from mock-a."
    assert len(answer_tokens("mock-a", 7)) == 7
    assert expected_answer("mock-a", 0) == ""


async def test_openai_stream_has_one_delta_per_token_then_usage_then_done(
    client: httpx.AsyncClient,
) -> None:
    response = await post(client)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = sse(response)
    assert openai_text(events) == expected_answer(NAME, TOKENS)
    assert events[-1].data == "[DONE]"
    usage = msgspec.json.decode(events[-2].data)["usage"]
    assert usage == {"prompt_tokens": 7, "completion_tokens": TOKENS, "total_tokens": 7 + TOKENS}


async def test_openai_without_include_usage_sends_no_usage_chunk(client: httpx.AsyncClient) -> None:
    events = sse(await post(client, stream_options={"include_usage": False}))
    assert not any('"usage"' in e.data for e in events)
    assert events[-1].data == "[DONE]"


async def test_max_tokens_shortens_the_answer(client: httpx.AsyncClient) -> None:
    events = sse(await post(client, max_tokens=2))
    assert openai_text(events) == expected_answer(NAME, 2)
    assert '"finish_reason":"length"' in events[-3].data


async def test_openai_non_streaming_returns_a_chat_completion(client: httpx.AsyncClient) -> None:
    response = await client.post(OPENAI, json=chat_body(stream=False))
    body = response.json()
    assert response.headers["content-length"] == str(len(response.content))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected_answer(NAME, TOKENS)
    assert body["usage"]["completion_tokens"] == TOKENS


async def test_anthropic_event_sequence(client: httpx.AsyncClient) -> None:
    body = chat_body(max_tokens=1024, system="Be brief.")
    events = sse(await client.post("/v1/messages", json=body))
    names = [e.event for e in events]
    assert names == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * TOKENS,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    data = [msgspec.json.decode(e.data) for e in events]
    assert "".join(d["delta"]["text"] for d in data[3:-3]) == expected_answer(NAME, TOKENS)
    assert (
        data[0]["message"]["usage"]["input_tokens"]
        == len("Be brief." + body["messages"][0]["content"]) // 4
    )
    assert data[-2]["delta"]["stop_reason"] == "end_turn"
    assert data[-2]["usage"]["output_tokens"] == TOKENS


async def test_ollama_ndjson_lines(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json=chat_body(options={"num_predict": 3}))
    assert response.headers["content-type"] == "application/x-ndjson"
    parser = NDJSONParser()
    lines = [msgspec.json.decode(line) for line in parser.feed(response.content) + parser.close()]
    assert "".join(line["message"]["content"] for line in lines) == expected_answer(NAME, 3)
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 3


# --- stats -------------------------------------------------------------------------


async def test_keep_alive_serves_sequential_requests_on_one_connection(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    for _ in range(50):
        assert (await post(client)).status_code == 200
    stats = mock.stats()
    assert (stats["requests"], stats["connections"], stats["active"]) == (50, 1, 0)
    assert stats["by_path"] == {OPENAI: 50}
    assert stats["by_model"] == {"m": 50}
    assert len(stats["log"]) == 50
    assert (await client.get("/stats")).json()["requests"] == 50


async def test_peak_concurrency_counts_overlapping_requests(mock: MockProvider) -> None:
    limits = httpx.Limits(max_connections=8)
    async with (
        httpx.AsyncClient(base_url=mock.url, limits=limits) as http,
        anyio.create_task_group() as tg,
    ):
        for _ in range(8):
            tg.start_soon(post, http, "m+ttft_ms=500")
    stats = mock.stats()
    assert (stats["peak_concurrency"], stats["connections"], stats["active"]) == (8, 8, 0)


async def test_log_records_model_path_status_and_time(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    await post(client, "m+status=503+fail_first=2")
    await post(client, "m+status=503+fail_first=2")
    await post(client, "m+status=503+fail_first=2")
    await post(client, "x", path="/api/chat")
    log = mock.stats()["log"]
    assert [(e["model"], e["path"], e["status"]) for e in log] == [
        ("m+status=503+fail_first=2", OPENAI, 503),
        ("m+status=503+fail_first=2", OPENAI, 503),
        ("m+status=503+fail_first=2", OPENAI, 200),
        ("x", "/api/chat", 200),
    ]
    times = [e["t"] for e in log]
    assert times == sorted(times)


async def test_fail_first_alone_fails_with_503_then_succeeds(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    statuses = [(await post(client, "m+fail_first=1")).status_code for _ in range(3)]
    assert statuses == [503, 200, 200]
    mock.set_fault("fail_first=1+status=429")  # a new default restarts the count
    assert [(await post(client)).status_code for _ in range(2)] == [429, 200]


async def test_per_request_tokens_and_token_delay(client: httpx.AsyncClient) -> None:
    started = anyio.current_time()
    events = sse(await post(client, "m+tokens=4+token_delay_ms=60"))
    assert anyio.current_time() - started >= 0.18  # three gaps between four tokens
    assert openai_text(events) == expected_answer(NAME, 4)


async def test_control_reset_zeroes_the_stats(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    await post(client)
    assert (await client.post("/control/reset")).status_code == 200
    stats = mock.stats()
    assert (stats["requests"], stats["log"], stats["by_model"]) == (0, [], {})


async def test_healthz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "name": NAME}


# --- faults ------------------------------------------------------------------------


async def test_runtime_fault_control_replaces_and_clears_the_default(
    client: httpx.AsyncClient,
) -> None:
    set_fault = await client.post("/control/faults", content=b"status=503+retry_after=1")
    assert set_fault.json() == {"fault": {"status": 503, "retry_after": "1"}}
    failed = await post(client)
    assert failed.status_code == 503
    assert failed.headers["retry-after"] == "1"
    assert failed.json()["error"]["type"] == "server_error"
    # A model suffix wins over the default.
    assert (await post(client, "m+status=200")).status_code == 200
    await client.post("/control/faults", json={"status": 429, "retry_after_ms": 250})
    limited = await post(client)
    assert (limited.status_code, limited.headers["retry-after-ms"]) == (429, "250")
    assert (await client.post("/control/faults", json={})).json() == {"fault": {}}
    assert (await post(client)).status_code == 200


async def test_unknown_fault_keys_are_rejected(client: httpx.AsyncClient) -> None:
    assert (await client.post("/control/faults", content=b"stauts=503")).status_code == 400
    response = await post(client, "m+stauts=503")
    assert response.status_code == 400
    assert "stauts" in response.json()["error"]["message"]
    assert (await post(client, "m+error=nonsense")).status_code == 400


OVERLOADED = "Overloaded"
ERROR_SHAPES = [
    (OPENAI, {"error": {"message": OVERLOADED, "type": "server_error", "code": "overloaded"}}),
    (
        "/v1/messages",
        {"type": "error", "error": {"type": "overloaded_error", "message": OVERLOADED}},
    ),
    ("/api/chat", {"error": OVERLOADED}),
]


@pytest.mark.parametrize(("path", "expected"), ERROR_SHAPES)
async def test_error_bodies_use_each_providers_shape(
    client: httpx.AsyncClient, path: str, expected: dict[str, Any]
) -> None:
    response = await post(client, "m+status=529", path=path)
    assert response.status_code == 529
    body = response.json()
    if path == OPENAI:
        assert body["error"].pop("param") is None
    assert body == expected


async def test_stall_sends_some_tokens_then_keeps_the_socket_silent(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    parser, events = SSEParser(), []
    async with client.stream("POST", OPENAI, json=chat_body("m+stall=2")) as response:
        chunks = response.aiter_bytes()
        with anyio.move_on_after(0.5) as silence:
            async for chunk in chunks:
                events += parser.feed(chunk)
        assert silence.cancelled_caught  # nothing more, and no end of body
        assert openai_text(events) == expected_answer(NAME, 2)
        assert mock.stats()["active"] == 1


async def test_noresponse_reads_the_request_and_never_answers(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.post(OPENAI, json=chat_body("m+noresponse"), timeout=0.3)
    assert mock.stats()["log"][0]["status"] == 0


async def test_cut_ends_the_connection_without_the_last_chunk(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, "m+cut=1")


def test_fault_specs_parse_from_text_json_and_mappings() -> None:
    text = parse_fault("status=429+retry_after=2+nodone")
    assert text == parse_fault('{"status": 429, "retry_after": "2", "nodone": true}')
    assert text == parse_fault({"status": "429", "retry_after": 2, "nodone": "1"})
    assert text.as_dict() == {"status": 429, "retry_after": "2", "nodone": True}
    assert parse_fault("noprefill").as_dict() == {"noprefill": True}
    with pytest.raises(ValueError, match="unknown fault key"):
        parse_fault("cutt=1")


# --- as a separate process ---------------------------------------------------------


async def test_cli_process_prints_its_port_and_serves() -> None:
    async with MockProviderProcess(name="mock-sub", tokens=4, fault="status=503") as proc:
        assert proc.port > 0
        async with httpx.AsyncClient(base_url=proc.url) as http:
            assert (await post(http)).status_code == 503
            await anyio.to_thread.run_sync(proc.set_fault, None)
            events = sse(await post(http))
        assert openai_text(events) == expected_answer("mock-sub", 4)
        stats = await anyio.to_thread.run_sync(proc.stats)
        assert (stats["requests"], stats["by_path"]) == (2, {OPENAI: 2})
        process = proc.process
    assert process is not None and process.returncode is not None
