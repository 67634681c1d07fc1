"""Running the gateway: as an ASGI app, as ``llmrelay gateway``, or inside a program.

``create_app`` is the app uvicorn's worker processes build (``--workers N``);
``run_gateway`` is what ``llmrelay gateway`` runs; ``serve_gateway`` runs the
gateway in the caller's event loop on a free port, for benchmarks and tests.

Every way runs uvicorn with ``LimitedH11Protocol``, uvicorn's HTTP/1.1
protocol plus the connection limits of ``GatewaySettings`` (docs/gateway.md,
"Limits"). uvicorn alone closes a connection only after an answer (keep-alive):
one that never completes its headers or its body, or that stops reading an
answer, would hold its socket for ever, and enough of them exhaust the
process's file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import h11
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
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
    """A uvicorn config that serves with ``LimitedH11Protocol`` and carries its limits.

    The limits travel inside the config because uvicorn hands the config (pickled)
    to its worker processes (``--workers N``), and builds a protocol per connection
    from it.
    """

    def __init__(self, app: ASGIApp | str, *, limits: GatewaySettings, **kwargs: Any) -> None:
        super().__init__(app, http=LimitedH11Protocol, limit_concurrency=None, **kwargs)
        self.limits = limits


class LimitedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with header, body, keep-alive and write timeouts,
    and a connection limit answered with a 503 in OpenAI's error shape."""

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
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers" or "body": what the timer waits for
        self._write_timer: asyncio.TimerHandle | None = None

    # --- reading: a request must arrive whole within its time

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # One write per loop turn: an answer's head and events go out together (_cork.py).
        super().connection_made(CorkedTransport(transport, self.loop))
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request()

    def _watch_request(self) -> None:
        """Arm the timer for what the connection waits for (headers, body), or none."""
        state = self.conn.their_state
        waiting = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if waiting == self._reading:
            return
        self._cancel_read_timer()
        if waiting is not None and not self.transport.is_closing():
            limit_s = (
                self.limits.header_timeout_s if waiting == "headers" else self.limits.body_timeout_s
            )
            self._read_timer = self.loop.call_later(limit_s, self._read_timed_out)
            self._reading = waiting

    def _read_timed_out(self) -> None:
        self._read_timer, self._reading = None, None
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._reading = None, None

    def on_response_complete(self) -> None:
        self._cancel_read_timer()
        super().on_response_complete()
        # An idle connection is uvicorn's keep-alive timer's until its next byte; a
        # pipelined request already read (in part) is timed like any other.
        if self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            self._watch_request()

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
        if self.cycle is not None:
            self.cycle.disconnected = True
        self.transport.abort()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)

    # --- the app, behind the connection limit

    def _guarded(self, app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if len(self.connections) > self.limits.max_connections:
                await self._over_limit()(scope, receive, send)
                return
            progress = _Progress(send)
            cycle = self.cycle
            # A streamed answer looks here after each write: uvicorn's send() after a cut
            # returns as if it wrote, and a stream whose events are all queued would not
            # otherwise yield to the task that hears the disconnect (gateway/_exchange.py).
            scope.setdefault("extensions", {})[DISCONNECTED] = lambda: (
                cycle is not None and cycle.disconnected
            )
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
