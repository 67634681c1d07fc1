"""The ``Gateway``: what every request of one process shares, and its endpoints.

One ``Gateway`` holds the config, one NATS connection (as the ``client`` user)
with the ``RelayClient`` that submits every job, the API keys and the metrics.
It is an async context manager: entering connects to NATS; ``asgi()`` is the
Starlette app. A chat completion (``/v1/chat/completions``, OpenAI's API) or a
message (``/v1/messages``, Anthropic's) is checked and submitted here, the same
way for both (each API is a ``Dialect``, ``gateway._dialect``), then handed to an
``Exchange`` (``gateway._exchange``) with only what it needs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from broker._client import JobHandle, RelayClient, cancel_payload
from broker._config import Config
from broker._errors import (
    BrokerUnavailable,
    ConnectFailed,
    PayloadTooLarge,
    RelayError,
    UnknownRoute,
)
from broker._jsapi import consumer_info
from broker._nats import connect, nats_errors
from broker._protocol import Job
from broker._subjects import JOBS_STREAM, cancel_subject, route_consumer
from broker._tracing import sdk_missing
from gateway._apierror import ApiError, error_from_exception, http_error
from gateway._dialect import CHAT, Call, Dialect
from gateway._embeddings import EMBEDDINGS
from gateway._exchange import EventStreamResponse, Exchange, ExchangeContext
from gateway._keys import ApiKeys
from gateway._messages import MESSAGES, count_tokens
from gateway._metrics import GatewayMetrics
from gateway._responses import Status, json_response, model_card, model_list

if TYPE_CHECKING:  # imported only when tracing is on (README "Tracing")
    from broker._otel import Tracing

_UNKNOWN_ROUTE_LABEL = "_unknown"
_CONNECT_HINT = (
    "the gateway connects as the `client` user of nats.conf, "
    "from gateway.nats_user/nats_password or credentials in --nats-url"
)


class Gateway:
    """State shared by every request of one process: config, NATS, metrics.

    An async context manager: entering connects to NATS; ``asgi()`` is the app.
    """

    def __init__(
        self,
        config: Config,
        *,
        nats_url: str | None = None,
        metrics_dir: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.settings = config.gateway
        self.nats_url = nats_url or config.nats.url
        self.metrics = GatewayMetrics(multiprocess_dir=metrics_dir)
        self.context = ExchangeContext(settings=self.settings, metrics=self.metrics)
        self._keys = ApiKeys(self.settings.api_keys)
        self._nc: NATS | None = None
        self._relay: RelayClient | None = None
        # Spans (``gateway/_tracing.py``): the caller's ``tracing``, else the config's, else None.
        self._owns_tracing = tracing is None
        self.tracing = tracing if tracing is not None else self._open_tracing()

    @property
    def relay(self) -> RelayClient:
        if self._relay is None:
            raise BrokerUnavailable("the gateway is not connected to NATS")
        return self._relay

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to NATS; a problem is one ``ConnectFailed`` that says which user is used."""
        try:
            self._nc = await connect(
                self.config.nats,
                url=self.nats_url,
                name="llmrelay-gateway",
                user=self.settings.nats_user,
                password=self.settings.nats_password,
            )
        except ConnectFailed as exc:
            raise ConnectFailed(f"{exc.message} ({_CONNECT_HINT})") from exc
        self._relay = self._relay_client(self._nc)

    async def close(self) -> None:
        """Disconnect (draining). Safe to call twice."""
        nc, self._nc, self._relay = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with nats_errors("drain the gateway's NATS connection"):
                await nc.drain()
        if self._owns_tracing and self.tracing is not None:
            self.tracing.close()

    def asgi(self, *, lifespan: bool = True) -> Starlette:
        """The ASGI app; with ``lifespan`` it connects on start-up and closes on shutdown."""

        @asynccontextmanager
        async def span(_: Starlette) -> AsyncIterator[None]:
            async with self:
                yield

        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            lifespan=span if lifespan else None,
            exception_handlers={HTTPException: http_error},
            middleware=self._traced(),
        )

    def _open_tracing(self) -> Tracing | None:
        """The gateway's own tracing, or None: with tracing off nothing of OpenTelemetry is
        imported."""
        if not self.config.tracing.enabled:
            return None
        try:
            from broker._otel import Tracing
        except ModuleNotFoundError as exc:
            raise sdk_missing(exc) from exc
        return Tracing.start(self.config.tracing, kind="gateway")

    def _relay_client(self, nc: NATS) -> RelayClient:
        """The client that submits every job; with tracing, each under a producer span."""
        if self.tracing is None:
            return RelayClient(self.nats_url, config=self.config, nc=nc)
        from broker._otel import TracedRelayClient

        return TracedRelayClient(self.nats_url, config=self.config, nc=nc, tracing=self.tracing)

    def _traced(self) -> list[Middleware]:
        """A server span around each API request (``gateway/_tracing.py``), if tracing is on."""
        if self.tracing is None:
            return []
        from gateway._tracing import TracedApp

        return [Middleware(TracedApp, tracing=self.tracing)]

    # --- small endpoints

    async def healthz(self, request: Request) -> Response:
        return json_response(Status(status="ok"))

    async def readyz(self, request: Request) -> Response:
        problem = await self.readiness_problem()
        if problem:
            return json_response(Status(status="unready", reason=problem), 503)
        return json_response(Status(status="ready"))

    async def readiness_problem(self) -> str | None:
        """Why the gateway cannot take requests now, or None."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return "not connected to NATS"
        for route in self.config.routes:
            try:
                await consumer_info(nc, JOBS_STREAM, route_consumer(route))
            except BrokerUnavailable as exc:
                return f"route {route}: {exc.message}"
            except RelayError as exc:
                return f"route {route}: {exc.message} (is the topology created?)"
        return None

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except RelayError as exc:
            return self._error(exc).response()
        return json_response(model_list(self.config.routes))

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            self._check_key(request)
            if name not in self.config.routes:
                raise UnknownRoute(f"no route named {name!r}")
        except RelayError as exc:
            return self._error(exc).response()
        return json_response(model_card(name))

    # --- chat completions and messages

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, CHAT)

    async def messages(self, request: Request) -> Response:
        return await self._answer(request, MESSAGES)

    async def embeddings(self, request: Request) -> Response:
        return await self._answer(request, EMBEDDINGS)

    async def _answer(self, request: Request, dialect: Dialect) -> Response:
        started = time.monotonic()
        label, stream = _UNKNOWN_ROUTE_LABEL, False
        try:
            self._keys.check(dialect.credential(request.headers))
            call = dialect.parse(await self._read_body(request))
            stream = call.stream
            label = call.route if call.route in self.config.routes else label
            handle = await self._submit(self._job(call, request))
        except RelayError as exc:
            err = self._error(exc)
            self.metrics.finished(label, stream, err.code, time.monotonic() - started)
            return dialect.error_response(err)
        except ClientDisconnect:
            return Response(status_code=499)
        exchange = Exchange(self.context, handle, call.writer, label=label, started=started)
        if call.stream:
            return EventStreamResponse(exchange)
        return await exchange.complete(request.receive)

    async def _submit(self, job: Job) -> JobHandle:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BrokerUnavailable(
                "the gateway is not connected to NATS (reconnecting); retry shortly"
            )
        try:
            return await self.relay.submit_job(job)
        except BrokerUnavailable as exc:
            # The job may have been stored all the same: nobody will read its answer.
            await _cancel_quietly(nc, job)
            raise BrokerUnavailable(f"NATS did not confirm the job: {exc.message}") from exc

    def _job(self, call: Call, request: Request) -> Job:
        messages, options = call.parts(request.headers.get("traceparent"))
        return self.relay.build_job(
            messages,
            route=call.route,
            timeout_s=self.settings.request_timeout_s,
            options=options,
        )

    async def _read_body(self, request: Request) -> bytes:
        # A job larger than max_job_bytes is refused anyway; do not buffer more.
        limit = 2 * self.config.streams.max_job_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body ({declared} bytes) exceeds {limit} bytes")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            parts.append(part)
        return b"".join(parts)

    def _error(self, exc: RelayError) -> ApiError:
        return error_from_exception(exc, retry_after_s=self.settings.retry_after_s)

    def _check_key(self, request: Request) -> None:
        self._keys.check(request.headers.get("authorization", ""))


async def _cancel_quietly(nc: NATS, job: Job) -> None:
    """Ask workers to drop a job; best effort (its deadline ends it anyway)."""
    with contextlib.suppress(BrokerUnavailable), nats_errors(f"cancel of {job.id}"):
        await nc.publish(cancel_subject(job.id), cancel_payload(job))
