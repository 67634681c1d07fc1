"""Clients that attack the gateway's connections, and a provider that stalls a pool.

Raw sockets against a real gateway (uvicorn in this event loop, real NATS): a
connection that sends nothing, one that never finishes its headers or its
body, one that stays idle after an answer, more connections than the limit,
a client that stops reading its stream, and requests pipelined behind a slow
answer. Each is cut by the server within
its configured time (the test awaits the EOF, it does not sleep), and the
gateway still answers a normal request afterwards. Last, a provider whose
``Retry-After`` asks for forever pauses its pool for a bounded time only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec
import openai
import pytest
from nats.aio.client import Client as NATS

from broker._config import Config, GatewaySettings, parse_config
from broker._errors import ConfigError
from broker._server import NatsServer, free_port
from devstack import MockProvider, expected_answer
from gateway import serve_gateway
from tests._harness import mock_pool, relay_config, running_workers
from workers.providers._errors_map import MAX_RETRY_AFTER_S, retry_after_s

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
# Seconds beyond a configured timeout within which the server must have acted.
MARGIN_S = 3.0


def config(mock: MockProvider, *, streams: dict[str, Any] | None = None, **gateway: Any) -> Config:
    cfg = relay_config(
        {"a": mock_pool(mock.url, max_retries=0, concurrency=4)},
        {"chat": [("a", "gpt-a")]},
        streams=streams,
    )
    return msgspec.structs.replace(cfg, gateway=GatewaySettings(**gateway))


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name="a", tokens=5) as m:
        yield m


@asynccontextmanager
async def gateway(
    cfg: Config, client_url: str, *, sndbuf: int | None = None
) -> AsyncIterator[tuple[str, int]]:
    """A running gateway; yields its (host, port).

    ``sndbuf``: the kernel send buffer of the gateway's connections (inherited
    from the listening socket), so that a client that stops reading fills it
    with kilobytes, not the megabytes Linux would otherwise buffer.
    """
    with socket.create_server(("127.0.0.1", 0)) as sock:
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        async with serve_gateway(cfg, nats_url=client_url, sock=sock) as base_url:
            parts = urlsplit(base_url)
            assert parts.hostname is not None and parts.port is not None
            yield parts.hostname, parts.port


class Raw:
    """A raw TCP connection to the gateway (asyncio socket calls, no HTTP client)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, addr: tuple[str, int], *, rcvbuf: int | None = None) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: it sets the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr)
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv(self) -> bytes:
        """The next bytes; b"" at EOF (a reset counts as EOF)."""
        try:
            return await self.loop.sock_recv(self.sock, 65536)
        except ConnectionResetError:
            return b""

    async def read_to_eof(self) -> bytes:
        data = bytearray()
        while chunk := await self.recv():
            data += chunk
        return bytes(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """One whole response with a Content-Length body; the connection stays open."""
        data = bytearray()
        while b"\r\n\r\n" not in data:
            chunk = await self.recv()
            assert chunk, f"EOF before a whole response: {bytes(data)!r}"
            data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        while len(body) < int(headers.get("content-length", "0")):
            chunk = await self.recv()
            assert chunk, "EOF inside the body"
            body += chunk
        return int(status_line.split()[1]), headers, body

    def close(self) -> None:
        self.sock.close()


@asynccontextmanager
async def raw(addr: tuple[str, int], **options: Any) -> AsyncIterator[Raw]:
    conn = await Raw.open(addr, **options)
    try:
        yield conn
    finally:
        conn.close()


async def closed_by_server_within(conn: Raw, seconds: float) -> float:
    """Await the server's EOF (no bytes may come first); return how long it took."""
    started = time.monotonic()
    with anyio.fail_after(seconds + MARGIN_S):
        data = await conn.read_to_eof()
    assert data == b"", f"the server answered instead of closing: {data[:200]!r}"
    return time.monotonic() - started


async def trickle(conn: Raw, pieces: Iterable[bytes], pace_s: float = 0.1) -> None:
    """Send ``pieces`` one at a time, ``pace_s`` apart, until they or the connection end."""
    with contextlib.suppress(OSError):
        for piece in pieces:
            await conn.send(piece)
            await anyio.sleep(pace_s)  # the attack's pace, not a synchronisation


def get(path: str, host: str = "gw") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def chat_request(*, stream: bool, body: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(body or {"model": "chat", "messages": MESSAGES, "stream": stream})
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}"
    ).encode()


async def answers_normally(addr: tuple[str, int]) -> str:
    """A normal chat completion through the official SDK."""
    base_url = f"http://{addr[0]}:{addr[1]}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    return reply.choices[0].message.content or ""


# --- connections that never make a request ------------------------------------------


async def test_an_idle_connection_is_closed_by_the_header_timeout(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    cfg = config(mock, header_timeout_s=0.5)
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        took = await closed_by_server_within(conn, 0.5)
    assert took >= 0.4


async def test_headers_trickled_forever_are_cut_by_the_header_timeout(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    """Slowloris: a header line every 0.1 s, never the blank line that ends them."""
    cfg = config(mock, header_timeout_s=0.5)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
    lines = (f"X-Pad-{i}: a\r\n".encode() for i in range(1000))
    async with (
        gateway(cfg, client_url) as addr,
        raw(addr) as conn,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(trickle, conn, itertools.chain([head], lines))
        took = await closed_by_server_within(conn, 0.5)
        tg.cancel_scope.cancel()
    assert took >= 0.4


async def test_blank_lines_after_an_answer_do_not_hold_the_connection(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    """Each byte ends the keep-alive wait; blank lines never start a request (a parser
    skips them, or refuses them with a 400), and the header timeout still closes."""
    cfg = config(mock, header_timeout_s=0.5, keepalive_timeout_s=0.5)
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(get("/healthz"))
        assert (await conn.response())[0] == 200
        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle, conn, itertools.repeat(b"\r\n", 1000))
            with anyio.fail_after(0.5 + MARGIN_S):
                data = await conn.read_to_eof()
            tg.cancel_scope.cancel()
    assert data == b"" or data.startswith(b"HTTP/1.1 400 "), data[:200]


async def test_a_body_that_never_arrives_is_cut_by_the_body_timeout(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    cfg = config(mock, body_timeout_s=0.5)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n"
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(head + b'{"model": "chat", ')
        await closed_by_server_within(conn, 0.5)


async def test_a_pipelined_request_whose_body_never_arrives_is_cut(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    cfg = config(mock, body_timeout_s=0.5, keepalive_timeout_s=30)
    second = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n{"
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(get("/healthz") + second)  # both at once, the second unfinished
        assert (await conn.response())[0] == 200
        await closed_by_server_within(conn, 0.5)


async def test_a_keep_alive_connection_left_idle_is_closed(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    cfg = config(mock, keepalive_timeout_s=0.5, header_timeout_s=30)
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(get("/healthz"))
        status, _, _ = await conn.response()
        assert status == 200
        await closed_by_server_within(conn, 0.5)


async def test_a_request_asking_to_upgrade_is_answered_then_the_connection_closes(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    """The gateway serves no WebSocket: the request gets its answer with ``connection:
    close``, and what was sent after it on the connection is not read as a request."""
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    cfg = config(mock, keepalive_timeout_s=30)
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(upgrade + get("/healthz") + get("/healthz"))
        with anyio.fail_after(MARGIN_S):
            data = await conn.read_to_eof()
        async with raw(addr) as again:
            await again.send(get("/healthz"))
            assert (await again.response())[0] == 200
    assert data.count(b"HTTP/1.1 200 ") == 1, data
    assert b"connection: close" in data.lower()


async def test_unfinished_headers_over_16_kib_get_a_400(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    """Headers that grow without end are not buffered without end."""
    pad = "".join(f"X-Pad-{i}: {'a' * 1000}\r\n" for i in range(17))  # never the blank line
    async with gateway(config(mock), client_url) as addr, raw(addr) as conn:
        await conn.send(f"GET /healthz HTTP/1.1\r\nHost: gw\r\n{pad}".encode())
        with anyio.fail_after(MARGIN_S):
            status, _, _ = await conn.response()
    assert status == 400


async def test_one_header_grown_a_kib_at_a_time_past_16_kib_gets_a_400(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    """The bound holds across reads, for a header value that never ends."""
    pieces = [b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Pad: ", *[b"a" * 1024] * 40]
    async with (
        gateway(config(mock), client_url) as addr,
        raw(addr) as conn,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(trickle, conn, pieces, 0.02)
        with anyio.fail_after(MARGIN_S):
            status, _, _ = await conn.response()
        tg.cancel_scope.cancel()
    assert status == 400


# --- more connections than the limit ----------------------------------------------


async def test_connections_beyond_the_limit_get_503_in_openai_shape(
    nc: NATS, worker_url: str, client_url: str, mock: MockProvider
) -> None:
    limit = 3
    cfg = config(mock, max_connections=limit, keepalive_timeout_s=1.0, retry_after_s=2)
    async with (
        running_workers(cfg, ["a"], worker_url),
        gateway(cfg, client_url) as addr,
        contextlib.AsyncExitStack() as stack,
    ):
        held = [await stack.enter_async_context(raw(addr)) for _ in range(limit)]
        for conn in held:  # each is served, then held open (keep-alive)
            await conn.send(get("/healthz"))
            assert (await conn.response())[0] == 200
        async with raw(addr) as extra:
            await extra.send(get("/v1/models"))
            status, headers, body = await extra.response()
        assert status == 503
        assert headers["retry-after"] == "2"
        assert headers["content-type"].startswith("application/json")
        error = json.loads(body)["error"]
        assert error["code"] == "service_unavailable"
        assert error["type"] == "server_error"
        assert "connections" in error["message"]
        # The held connections are closed by the keep-alive timeout; then the
        # gateway serves again.
        for conn in held:
            await closed_by_server_within(conn, 1.0)
        assert await answers_normally(addr) == expected_answer("a", 5)


# --- a client that stops reading ---------------------------------------------------


async def gateway_outcomes(addr: tuple[str, int]) -> dict[str, float]:
    """outcome -> count of streamed chat requests, from the gateway's /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{addr[0]}:{addr[1]}/metrics")).text
    outcomes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmrelay_gateway_requests_total{") and 'stream="true"' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            outcomes[outcome] = float(line.rsplit(" ", 1)[1])
    return outcomes


async def wait_for_outcome(addr: tuple[str, int], outcome: str, timeout_s: float) -> float:
    """Poll the gateway's metrics (another server's state) until ``outcome`` is counted."""
    started = time.monotonic()
    with anyio.fail_after(timeout_s):
        while outcome not in await gateway_outcomes(addr):
            await anyio.sleep(0.05)
    return time.monotonic() - started


# Tokens: ~300 kB of text, far more than the (small) socket buffers and uvicorn's
# write buffer hold. The provider sends them at once, so they come in a few large
# chunks (one per read), not one small SSE event per token.
BIG = 50_000


@pytest.fixture
async def big_mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name="a", tokens=BIG) as m:
        yield m


async def test_a_client_that_stops_reading_is_cut_by_the_write_timeout(
    nc: NATS, worker_url: str, client_url: str, big_mock: MockProvider
) -> None:
    cfg = config(big_mock, write_timeout_s=0.5, request_timeout_s=60)
    async with (
        running_workers(cfg, ["a"], worker_url),
        gateway(cfg, client_url, sndbuf=8192) as addr,
    ):
        async with raw(addr, rcvbuf=4096) as conn:
            await conn.send(chat_request(stream=True))
            took = await wait_for_outcome(addr, "disconnected", 0.5 + 10)
            received = await conn.read_to_eof()
        assert took < 30  # not the request's deadline
        assert received.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" not in received
        assert await answers_normally(addr) == expected_answer("a", BIG)


async def test_a_slow_reader_is_cut_at_the_jobs_deadline(
    nc: NATS, worker_url: str, client_url: str, big_mock: MockProvider
) -> None:
    """A write timeout far away; the job's deadline ends the stream all the same."""
    cfg = config(big_mock, write_timeout_s=120, request_timeout_s=1.5)
    async with (
        running_workers(cfg, ["a"], worker_url),
        gateway(cfg, client_url, sndbuf=8192) as addr,
    ):
        async with raw(addr, rcvbuf=4096) as conn:
            started = time.monotonic()
            await conn.send(chat_request(stream=True))
            await wait_for_outcome(addr, "deadline_exceeded", 1.5 + 10)
            took = time.monotonic() - started
            received = await conn.read_to_eof()
        assert 1.4 <= took < 1.5 + MARGIN_S
        assert b"data: [DONE]" not in received


# --- pipelined requests behind a slow answer ------------------------------------------


async def test_a_pipelined_request_is_not_timed_while_it_waits_its_turn(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    """Its body is read only once the answer before it is done, so its clock starts then."""
    second = chat_request(stream=False)
    async with MockProvider(name="a", tokens=5, ttft_ms=1500) as slow:
        cfg = config(slow, body_timeout_s=0.5, keepalive_timeout_s=30)
        async with (
            running_workers(cfg, ["a"], worker_url),
            gateway(cfg, client_url) as addr,
            raw(addr) as conn,
        ):
            await conn.send(chat_request(stream=False) + second[:-10])
            await anyio.sleep(1.0)  # the client's pace: the first answer is still coming
            await conn.send(second[-10:])
            with anyio.fail_after(2 * 1.5 + MARGIN_S):
                first_status, _, first = await conn.response()
                second_status, _, answer = await conn.response()
    assert (first_status, second_status) == (200, 200)
    for body in (first, answer):
        assert json.loads(body)["choices"][0]["message"]["content"] == expected_answer("a", 5)


async def test_a_hang_up_with_a_request_queued_behind_a_stream_cancels_the_stream(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="a", tokens=50, token_delay_ms=100) as slow:  # a 5 s stream
        cfg = config(slow, keepalive_timeout_s=30)
        async with running_workers(cfg, ["a"], worker_url), gateway(cfg, client_url) as addr:
            async with raw(addr) as conn:
                await conn.send(chat_request(stream=True) + get("/healthz"))
                assert (await conn.recv()).startswith(b"HTTP/1.1 200")
            took = await wait_for_outcome(addr, "disconnected", 3.0)
            assert "done" not in await gateway_outcomes(addr)
    assert took < 3.0


# --- request size ---------------------------------------------------------------------


async def test_a_body_over_twice_max_job_bytes_is_refused_with_413(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    cfg = config(mock, streams={"max_job_bytes": 1024})
    big = {"model": "chat", "messages": [{"role": "user", "content": "x" * 4096}]}
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(chat_request(stream=False, body=big))
        status, _, body = await conn.response()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    nc: NATS, client_url: str, mock: MockProvider
) -> None:
    cfg = config(mock, streams={"max_job_bytes": 1024})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    )
    async with gateway(cfg, client_url) as addr, raw(addr) as conn:
        await conn.send(head)  # and not one byte of the body
        with anyio.fail_after(MARGIN_S):
            status, _, body = await conn.response()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


# --- settings ---------------------------------------------------------------------------


def test_gateway_limits_have_safe_defaults() -> None:
    g = GatewaySettings()
    assert 0 < g.header_timeout_s <= 30
    assert 0 < g.body_timeout_s <= 60
    assert 0 < g.keepalive_timeout_s <= 30
    assert 0 < g.write_timeout_s <= 60
    assert 0 < g.max_connections <= 10_000


@pytest.mark.parametrize(
    "key", ["header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "write_timeout_s"]
)
def test_gateway_timeouts_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"gateway\.{key}"):
        parse_config(f"gateway: {{{key}: 0}}")


# --- a provider cannot pause a pool for ever ----------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1000000000"}, MAX_RETRY_AFTER_S),
        ({"retry-after": "1e999"}, MAX_RETRY_AFTER_S),
        ({"retry-after": "inf"}, MAX_RETRY_AFTER_S),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "99999999999"}, MAX_RETRY_AFTER_S),
        ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_RETRY_AFTER_S),
    ],
)
def test_retry_after_is_bounded(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers, now=1_700_000_000.0) == expected


@pytest.mark.parametrize("retry_after", ["86400000", "inf", "nan"])
async def test_a_provider_asking_for_forever_pauses_its_pool_for_a_bounded_time(
    nc: NATS, worker_url: str, client_url: str, retry_after: str
) -> None:
    async with MockProvider(name="a", tokens=3) as a, MockProvider(name="b", tokens=3) as b:
        cfg = relay_config(
            {
                "a": mock_pool(a.url, max_retries=0, concurrency=2),
                "b": mock_pool(b.url, max_retries=0, concurrency=2),
            },
            {"chat": [("a", f"gpt-a+status=429+retry_after={retry_after}"), ("b", "gpt-b")]},
        )
        async with (
            running_workers(cfg, ["a", "b"], worker_url) as (worker_a, _),
            gateway(cfg, client_url) as addr,
        ):
            assert await answers_normally(addr) == expected_answer("b", 3)
            assert worker_a.budget.pause_remaining_s() <= MAX_RETRY_AFTER_S
            assert worker_a.running == {}
            assert await answers_normally(addr) == expected_answer("b", 3)


# --- metrics and monitoring listen on loopback unless told otherwise ---------------------


def other_address() -> str | None:
    """An address of this machine that is not loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks the source address, sends nothing
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


async def test_worker_metrics_listen_on_loopback_only(
    nc: NATS, worker_url: str, mock: MockProvider
) -> None:
    port = free_port()
    cfg = config(mock)
    async with running_workers(cfg, ["a"], worker_url, metrics_port=port):
        assert reachable("127.0.0.1", port)
        outside = other_address()
        if outside is None:
            pytest.skip("this machine has no address but loopback")
        assert not reachable(outside, port)


async def test_nats_monitoring_listens_on_loopback_only(nats_server: NatsServer) -> None:
    """The server as `llmrelay up` and the tests start it, from the repo's nats.conf."""
    assert reachable("127.0.0.1", nats_server.monitor_port)
    outside = other_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    assert not reachable(outside, nats_server.monitor_port)


# --- bodies and headers a job must never be built from (issue 11, defects 10 and 7) -----

DEPTH = 200_000  # far deeper than msgspec's and Python's recursion limits
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def post_chat(payload: bytes, *extra_headers: bytes) -> bytes:
    """A raw chat completion request: ``payload`` as is, ``extra_headers`` as raw lines."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    lines = b"".join(h + b"\r\n" for h in extra_headers)
    return head + lines + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload


async def jobs_published(nc: NATS) -> int:
    """How many jobs were ever stored (sequence numbers; a served job is removed)."""
    return (await nc.jetstream().stream_info("LLM_JOBS")).state.last_seq


async def dead_letter_count(nc: NATS) -> int:
    return (await nc.jetstream().stream_info("LLM_DLQ")).state.messages


@pytest.mark.parametrize(
    "payload",
    [
        b'{"model":"chat","messages":[{"role":"user","content":'
        + b"[" * DEPTH
        + b"]" * DEPTH
        + b"}]}",
        b'{"model":"chat","messages":[{"role":"user","content":"Say hello"}],"unknown":'
        + b"[" * DEPTH
        + b"]" * DEPTH
        + b"}",
    ],
    ids=["content", "unknown-field"],
)
async def test_a_body_nested_200000_deep_gets_a_400_and_publishes_no_job(
    nc: NATS, worker_url: str, client_url: str, mock: MockProvider, payload: bytes
) -> None:
    cfg = config(mock)
    assert len(payload) <= 2 * cfg.streams.max_job_bytes  # refused for its depth, not its size
    async with running_workers(cfg, ["a"], worker_url), gateway(cfg, client_url) as addr:
        async with raw(addr) as conn:
            await conn.send(post_chat(payload))
            with anyio.fail_after(MARGIN_S):
                status, headers, body = await conn.response()
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_job"
        assert error["type"] == "invalid_request_error"
        assert await jobs_published(nc) == 0  # the job was never built, let alone published
        assert await answers_normally(addr) == expected_answer("a", 5)
        assert await jobs_published(nc) == 1
        assert await dead_letter_count(nc) == 0


@pytest.mark.parametrize(
    "traceparent",
    [
        TRACE.encode() + "é".encode(),  # non-ASCII (UTF-8 bytes; Starlette reads latin-1)
        TRACE.encode() + b"\x85",  # latin-1 NEL: a line break to str.splitlines
        TRACE.encode() + "\u2028x-injected: 1".encode(),  # UTF-8 LINE SEPARATOR
        TRACE.replace("31-01", "3\u0661-01").encode(),  # ARABIC-INDIC DIGIT ONE for a 1
    ],
    ids=["utf8", "nel", "line-separator", "unicode-digit"],
)
async def test_an_invalid_traceparent_through_the_gateway_is_dropped(
    nc: NATS, worker_url: str, client_url: str, mock: MockProvider, traceparent: bytes
) -> None:
    """W3C: a receiver drops a traceparent it cannot parse; the request is served."""
    payload = json.dumps({"model": "chat", "messages": MESSAGES}).encode()
    cfg = config(mock)
    async with running_workers(cfg, ["a"], worker_url), gateway(cfg, client_url) as addr:
        async with raw(addr) as conn:
            await conn.send(post_chat(payload, b"traceparent: " + traceparent))
            with anyio.fail_after(10):
                status, _, body = await conn.response()
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == expected_answer("a", 5)
        assert await answers_normally(addr) == expected_answer("a", 5)
        assert await dead_letter_count(nc) == 0
