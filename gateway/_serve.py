"""Running the gateway: as an ASGI app, as ``llmrelay gateway``, or inside a program.

``create_app`` is the app uvicorn's worker processes build (``--workers N``);
``run_gateway`` is what ``llmrelay gateway`` runs; ``serve_gateway`` runs the
gateway in the caller's event loop on a free port, for benchmarks and tests.

Every way runs uvicorn with ``LimitedHttpToolsProtocol``, uvicorn's HTTP/1.1
protocol on the httptools (C) parser plus the connection limits of
``GatewaySettings`` (docs/gateway.md, "Limits"). uvicorn alone closes a
connection only after an answer (keep-alive): one that never completes its
headers or its body, or that stops reading an answer, would hold its socket for
ever, and enough of them exhaust the process's file descriptors. httptools
rather than h11: its server CPU per streamed answer is 0.46x h11's
(bench/RESULTS.md, issue 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from broker._config import Config, GatewaySettings
from gateway._apierror import api_error
from gateway._app import Gateway
from gateway._cork import CorkedTransport
from gateway._exchange import DISCONNECTED

if TYPE_CHECKING:  # imported only when tracing is on (README "Tracing")
    from broker._otel import Tracing

log = logging.getLogger("llmrelay.gateway")


def create_app(
    config: Config, *, nats_url: str | None = None, metrics_dir: str | None = None
) -> Starlette:
    """The gateway as an ASGI app that connects to NATS on start-up (for uvicorn)."""
    return Gateway(config, nats_url=nats_url, metrics_dir=metrics_dir).asgi()


class LimitedConfig(uvicorn.Config):
    """A uvicorn config that serves with ``LimitedHttpToolsProtocol`` and carries its limits.

    The limits travel inside the config because uvicorn hands the config (pickled)
    to its worker processes (``--workers N``), and builds a protocol per connection
    from it.
    """

    def __init__(self, app: ASGIApp | str, *, limits: GatewaySettings, **kwargs: Any) -> None:
        # ws="none": the gateway serves no WebSocket, so an upgrade is never handed off.
        super().__init__(
            app, http=LimitedHttpToolsProtocol, ws="none", limit_concurrency=None, **kwargs
        )
        self.limits = limits


# Unfinished headers are refused beyond this (h11's bound, which the gateway served
# with before httptools; httptools itself buffers a head without end).
MAX_HEAD_BYTES = 16 * 1024


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, body, keep-alive and write timeouts,
    a bound on unfinished headers, and a connection limit answered with a 503 in
    OpenAI's error shape.

    httptools parses whatever has arrived, requests pipelined behind an answer too
    (uvicorn queues them in ``self.pipeline`` and stops reading), so the parser's
    callbacks say where the connection is: ``_awaiting`` is what it waits for of the
    request being read, and ``_open`` the requests not yet answered (``self.cycle``
    is only the last one read).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, LimitedConfig), "serve the gateway with a LimitedConfig"
        self.limits = config.limits
        # A call_later delay: a float is fine whatever uvicorn's annotation says.
        self.timeout_keep_alive = self.limits.keepalive_timeout_s  # type: ignore[assignment]
        self.app = self._guarded(self.app)
        self._awaiting: str | None = "headers"  # or "body"; None: the request is read whole
        self._head_bytes = 0  # of the unfinished head, as far as known
        self._ended_in_data = False  # a request ended in the data being parsed
        self._open: deque[RequestResponseCycle] = deque()  # unanswered requests, oldest first
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers" or "body": what the timer waits for
        self._write_timer: asyncio.TimerHandle | None = None

    # --- reading: a request must arrive whole within its time

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # One write per loop turn: an answer's head and events go out together (_cork.py).
        super().connection_made(CorkedTransport(transport, self.loop))
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        self._ended_in_data = False
        super().data_received(data)
        if self._awaiting is None and not self._answering_earlier():
            self._awaiting = "headers"  # bytes that begin no request (blank lines) yet
        if self._awaiting == "headers" and not self._ended_in_data:
            # Where a request ended in this data, the next head's share of it is
            # unknown: one read at most goes uncounted.
            self._head_bytes += len(data)
        self._bound_head()
        self._watch_request()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting, self._head_bytes = "headers", 0

    def on_headers_complete(self) -> None:
        super().on_headers_complete()  # a new self.cycle: ws="none" hands nothing off
        self._awaiting, self._head_bytes = "body", 0
        cycle = self.cycle
        while self._open and self._open[0].response_complete:
            self._open.popleft()
        self._open.append(cycle)
        # A streamed answer looks here after each write: uvicorn's send() after a cut
        # returns as if it wrote, and a stream whose events are all queued would not
        # otherwise yield to the task that hears the disconnect (gateway/_exchange.py).
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[DISCONNECTED] = lambda: cycle.disconnected

    def _unsupported_upgrade_warning(self) -> None:
        """A request with ``Upgrade`` is answered as a plain one, and the connection closed
        after it: the parser reads nothing after an upgrade, so the connection is spent
        (and an attacker's every later read would log uvicorn's two warnings)."""
        if self.cycle is not None and self.cycle.keep_alive:
            log.info(
                "a request from %s asked to upgrade; answered, then closing", _peer(self.client)
            )
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting, self._ended_in_data = None, True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn started the next pipelined request, or armed its keep-alive timer;
        # a next request already begun is timed from now, as it is read from now.
        self._bound_head()
        self._watch_request()

    def _answering_earlier(self) -> bool:
        """Whether an answer is being written before the request being read."""
        if self._awaiting == "body":  # self.cycle is the request being read
            return bool(self.pipeline)
        return self.cycle is not None and not self.cycle.response_complete

    def _bound_head(self) -> None:
        """Refuse unfinished headers over MAX_HEAD_BYTES with a 400, as h11 did."""
        if self._awaiting != "headers" or self._head_bytes <= MAX_HEAD_BYTES:
            return
        if self.transport.is_closing():
            return
        if self._answering_earlier():
            # Its turn comes after the answer (uvicorn reads again then), as with h11.
            self.flow.pause_reading()
            return
        msg = "Invalid HTTP request received."  # uvicorn's words for what it cannot parse
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _watch_request(self) -> None:
        """Arm the timer for what the connection waits for (headers, body), or none."""
        waiting = self._waiting_for()
        if waiting == self._reading:
            return
        self._cancel_read_timer()
        if waiting is not None:
            limit_s = (
                self.limits.header_timeout_s if waiting == "headers" else self.limits.body_timeout_s
            )
            self._read_timer = self.loop.call_later(limit_s, self._read_timed_out)
            self._reading = waiting

    def _waiting_for(self) -> str | None:
        """What the client owes within its time: none while an answer before it is written,
        since uvicorn reads a pipelined request only once the answers before it are done."""
        if self.transport.is_closing() or self._awaiting is None or self._answering_earlier():
            return None
        return self._awaiting

    def _read_timed_out(self) -> None:
        self._read_timer, self._reading = None, None
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._reading = None, None

    # --- writing: a client that takes nothing for write_timeout_s is cut

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self.limits.write_timeout_s, self._write_timed_out
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self._cut(f"it took nothing of its answer for {self.limits.write_timeout_s:g}s")

    def _cut(self, why: str) -> None:
        """Drop the connection and what is buffered for it (close() would wait for the
        client to read it), as uvicorn does when a client goes away."""
        if self.transport.is_closing():
            return
        log.info("cut the connection from %s: %s", _peer(self.client), why)
        self._disconnect_open()
        self.transport.abort()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        self._cancel_write_timer()
        # uvicorn tells only self.cycle, the last request read: the one answered may
        # be older (pipelining), and its app must hear the disconnect too.
        self._disconnect_open()
        super().connection_lost(exc)

    def _disconnect_open(self) -> None:
        for cycle in self._open:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._open.clear()

    # --- the app, behind the connection limit

    def _guarded(self, app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if len(self.connections) > self.limits.max_connections:
                await self._over_limit()(scope, receive, send)
                return
            progress = _Progress(send)
            try:
                await app(scope, receive, progress.send)
            finally:
                if progress.started and not progress.complete:
                    # An answer cut short (a slow reader at its deadline, an error).
                    self._cut("its answer was cut short")

        return guarded

    def _over_limit(self) -> ASGIApp:
        err = api_error(
            "service_unavailable",
            f"the gateway has too many open connections (gateway.max_connections = "
            f"{self.limits.max_connections}); retry shortly",
            retry_after_s=self.limits.retry_after_s,
        )
        return msgspec.structs.replace(
            err, headers={**err.headers, "connection": "close"}
        ).response()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


class _Progress:
    """Whether an answer's headers went out, and its last byte."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)


def server_config(app: ASGIApp | str, settings: GatewaySettings, **kwargs: Any) -> LimitedConfig:
    """The uvicorn config every way of serving the gateway uses."""
    return LimitedConfig(app, limits=settings, access_log=False, **kwargs)


async def run_gateway(
    config: Config,
    *,
    nats_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    graceful_s: int = 10,
    log_level: str = "info",
) -> None:
    """Serve in this process until SIGINT/SIGTERM (``llmrelay gateway``).

    NATS is connected before the port opens, so a NATS problem is one clear
    ``ConnectFailed``; on a signal, open requests get ``graceful_s`` to finish.
    """
    async with Gateway(config, nats_url=nats_url) as gateway:
        server = uvicorn.Server(
            server_config(
                gateway.asgi(lifespan=False),
                config.gateway,
                host=host,
                port=port,
                lifespan="off",
                log_level=log_level,
                timeout_graceful_shutdown=graceful_s,
            )
        )
        await server.serve()


def run_gateway_processes(
    config: Config,
    app_factory: str,
    *,
    workers: int,
    host: str,
    port: int,
    graceful_s: int,
    log_level: str,
) -> None:
    """``llmrelay gateway --workers N``: N uvicorn processes sharing one port.

    Each process imports ``app_factory`` (``"module:function"``) to build its own
    app; each applies the limits of ``config.gateway`` (``max_connections`` is
    per process).
    """
    uv = server_config(
        app_factory,
        config.gateway,
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_s,
    )
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(uv, sockets=[uv.bind_socket()]).run()


@asynccontextmanager
async def serve_gateway(
    config: Config,
    *,
    nats_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_s: int = 5,
    sock: socket.socket | None = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[str]:
    """Run the gateway in this event loop; yield its base URL, e.g. ``http://127.0.0.1:PORT/v1``.

    ``port=0`` picks a free port; ``sock``, a listening socket of the caller's
    (with its own socket options), is served instead of ``host``/``port``; ``tracing``:
    the gateway's spans go there instead of where the config says. NATS
    is connected and the socket is listening before the URL is yielded, so the
    first request can be sent at once. To
    measure the time to first token through it (bench/gateway_ttft.py does)::

        async with serve_gateway(cfg, nats_url=client_url) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(model=route, messages=..., stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft_s = time.perf_counter() - t0
                    break
    """
    own_sock = sock is None
    sock = sock or socket.create_server((host, port), backlog=1024)
    host, bound_port = sock.getsockname()[:2]
    server = uvicorn.Server(
        server_config(
            (gateway := Gateway(config, nats_url=nats_url, tracing=tracing)).asgi(lifespan=False),
            config.gateway,
            lifespan="off",
            log_config=None,
            timeout_graceful_shutdown=graceful_s,
        )
    )
    try:
        async with gateway, anyio.create_task_group() as tg:
            # Connections made before uvicorn accepts wait in the listen backlog.
            tg.start_soon(server.serve, [sock])
            try:
                yield f"http://{host}:{bound_port}/v1"
            finally:
                server.should_exit = True
    finally:
        if own_sock:
            sock.close()
