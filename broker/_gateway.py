"""The OpenAI-compatible HTTP gateway: a front door that turns HTTP into llmrelay jobs.

An application that speaks the OpenAI API switches to llmrelay by changing its
base URL to ``http://<gateway>/v1``. Endpoints::

    POST /v1/chat/completions   stream and non-stream; ``model`` names a route
    GET  /v1/models             the routes (and /v1/models/<route>)
    GET  /healthz               the process is up
    GET  /readyz                NATS is connected and the route consumers exist (else 503)
    GET  /metrics               Prometheus, ``llmrelay_gateway_*``

Each request becomes one job, submitted with one shared ``RelayClient`` (one
NATS connection per process, as the ``client`` user). The answer's ``model``
is the upstream model that answered (``done.model``); in a stream every chunk
carries the upstream model named by the first chunk of the answering attempt
(a chunk sent before any text, e.g. a keep-alive, carries the route name).

**Errors** use OpenAI's JSON shape, ``{"error": {"message", "type", "param",
"code"}}``, with ``code`` one of the stable ``ERROR_CODES`` and the status its
HTTP analogue: queue full 429 (with Retry-After), deadline 504, every provider
failed 502 (the message and an ``attempts`` list give every attempt's reason),
content policy and other client errors 400 (the provider's reason), unknown
route 404, a malformed body 400 (``param`` names the field), a bad key 401.
A stream sends its HTTP headers only with its first text (or a keep-alive after
``KEEPALIVE_S`` of silence), so an error before any text still gets its
status code. An error after that is sent as an SSE ``data: {"error": ...}``
event, which the OpenAI SDKs raise as ``APIError``, and the stream ends
without ``data: [DONE]``: a stream is never closed as if complete when it was
not.

**Resets.** When a provider breaks mid-answer the worker re-queues the job and
sends ``notice{reset: true}``: the text of that attempt is void, and another
attempt starts over. Text already sent over HTTP cannot be taken back, so the
policy (``ReplyFold``) is:

- Text is forwarded as soon as it arrives (``gateway.stream_holdback_ms: 0``,
  the default), so the gateway adds no time to the first token.
- A reset before any text was sent changes nothing the client sees: the next
  attempt streams as if it were the first.
- A reset after text was sent ends the stream with an SSE error event
  (``code: stream_interrupted``, never ``[DONE]``) and cancels the job, whose
  new attempt nobody would read. The client sees the same thing as when a
  provider's own stream breaks, never a mix of two attempts.
- With ``stream_holdback_ms: N`` the first text of a stream is held until it is
  N ms old (or the answer is done), so a provider that fails within N ms of its
  first token is replaced invisibly, at the cost of up to N ms added to the
  time to first token. A non-streamed answer is held whole, so its failover is
  always invisible.

Events of an attempt older than the newest one seen are ignored (a backup's
first chunk may overtake the failing worker's notice).

**Disconnects.** When the client goes away (``http.disconnect``) while its
request is open, the gateway publishes ``llm.cancel.<id>``; the worker aborts
the provider call and answers ``cancelled``.

**Keys.** ``gateway.api_keys`` (may be empty: no key asked for) are compared as
SHA-256 digests with ``hmac.compare_digest`` against every configured key, so
the time taken says nothing about which key, or how much of one, matched. Keys
are never logged.

For benchmarks and tests, ``serve_gateway(config, nats_url=...)`` runs the
gateway in this event loop on a free port and yields its base URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import anyio
import msgspec
import nats.errors
import uvicorn
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from nats.aio.client import Client as NATS
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from broker._client import JobHandle, JobOptions, RelayClient
from broker._config import Config
from broker._errors import (
    ERROR_CODES,
    ConnectFailed,
    DeadlineExceeded,
    InvalidJob,
    PayloadTooLarge,
    RelayError,
    UnknownRoute,
)
from broker._jsapi import consumer_info
from broker._nats import connect_nats
from broker._protocol import (
    Attempt,
    Chunk,
    Done,
    Error,
    Event,
    Job,
    Message,
    Notice,
)
from broker._subjects import JOBS_STREAM, cancel_subject, route_consumer

log = logging.getLogger("llmrelay.gateway")

# With nothing to send for this long, a stream sends its headers (if not yet
# sent) and an SSE comment, so that proxies and clients do not time out.
KEEPALIVE_S = 10.0
# Events buffered between the NATS subscription and a slow HTTP client.
_EVENT_BUFFER = 256
# Error codes of the gateway itself, beside the wire ERROR_CODES.
_GATEWAY_STATUS = {"invalid_api_key": 401, "service_unavailable": 503}
_UNKNOWN_ROUTE_LABEL = "_unknown"


# --- the OpenAI request ----------------------------------------------------------


class _ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class _MessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    """The fields of an OpenAI chat completion request that llmrelay honours.

    Unknown fields are ignored; fields that would change the shape of the answer
    and that llmrelay does not relay (tools, ``n`` > 1, response formats) are
    refused, so that a client never silently gets something else.
    """

    model: str
    messages: Annotated[list[_MessageIn], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] = 1
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class InvalidApiKey(RelayError):
    """The request's bearer key is missing or not one of ``gateway.api_keys``."""

    code = "invalid_api_key"


class InvalidRequest(InvalidJob):
    """The HTTP request body is malformed; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


_request_decoder = msgspec.json.Decoder(ChatRequest)
_AT_RE = re.compile(r" - at `\$\.?(.*)`$")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def parse_request(body: bytes) -> ChatRequest:
    """Decode and check a request body; raise ``InvalidRequest`` naming the field."""
    try:
        req = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid_field(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    _refuse_unsupported(req)
    return req


def _invalid_field(text: str) -> InvalidRequest:
    m = _AT_RE.search(text)
    where = m.group(1) if m else ""
    message = text[: m.start()] if m else text
    missing = _MISSING_RE.search(message)
    if missing:
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return InvalidRequest(f"{where or 'body'}: {message}", param=where or None)


def _refuse_unsupported(req: ChatRequest) -> None:
    if req.n != 1:
        raise InvalidRequest("n: llmrelay returns one choice; n must be 1", "n")
    for field in ("tools", "functions"):
        if getattr(req, field):
            raise InvalidRequest(f"{field}: llmrelay does not relay tool calls yet", field)
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise InvalidRequest(
            f"response_format: type {fmt!r} is not supported (only 'text')", "response_format"
        )


def to_messages(req: ChatRequest) -> list[Message]:
    """OpenAI messages as wire messages (``developer`` is a system message)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role == "tool" or m.tool_calls:
            raise InvalidRequest(
                f"messages[{i}]: tool messages and tool calls are not relayed yet",
                f"messages[{i}].role",
            )
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role=role, content=_text_of(m, i), name=m.name))
    return out


def _text_of(m: _MessageIn, i: int) -> str:
    if m.content is None:
        raise InvalidRequest(f"messages[{i}].content: a message needs content", f"messages[{i}]")
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"messages[{i}].content[{j}]: only text parts are relayed, got {part.type!r}",
                f"messages[{i}].content[{j}].type",
            )
        texts.append(part.text)
    return "".join(texts)


def job_options(req: ChatRequest, traceparent: str | None) -> JobOptions:
    """The sampling options of a request, as ``Job`` fields."""
    metadata = dict(req.metadata or {})
    if req.user:
        metadata["user"] = req.user
    return JobOptions(
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=[req.stop] if isinstance(req.stop, str) else req.stop,
        seed=req.seed,
        metadata=metadata,
        traceparent=traceparent,
    )


# --- errors in OpenAI's shape ------------------------------------------------------


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    """An error as the client gets it: a status code and OpenAI's error object."""

    status: int
    code: str
    message: str
    param: str | None = None
    attempts: list[Attempt] = []
    headers: dict[str, str] = {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.attempts:
            error["attempts"] = [_attempt_json(a) for a in self.attempts]
        return {"error": error}

    def response(self) -> Response:
        return _json_response(self.body(), self.status, self.headers)


def status_for(code: str) -> int:
    """The HTTP status of an error code (the wire code's HTTP analogue)."""
    if code in ERROR_CODES:
        return int(ERROR_CODES[code][2])
    return _GATEWAY_STATUS.get(code, 502)


def api_error(code: str, message: str, *, retry_after_s: int = 0, **fields: Any) -> ApiError:
    """An ``ApiError`` for ``code``; a 429 or 503 tells the client when to retry."""
    status = status_for(code)
    if retry_after_s and status in (429, 503):
        fields["headers"] = {**fields.get("headers", {}), "retry-after": str(retry_after_s)}
    return ApiError(status=status, code=code, message=message, **fields)


def error_from_event(event: Error, *, retry_after_s: int) -> ApiError:
    """The client's view of an ``error`` event: every failed attempt's reason included."""
    message = event.message
    if event.code == "all_providers_failed" and event.attempts:
        message = f"{message}. Attempts: " + "; ".join(_attempt_line(a) for a in event.attempts)
    return api_error(
        event.code, message, attempts=list(event.attempts), retry_after_s=retry_after_s
    )


# Errors raised before a job is answered that the client is told as they are;
# anything else (NATS trouble, a missing stream) means the broker is unavailable.
_REQUEST_CODES = frozenset(
    {"invalid_api_key", "invalid_job", "unknown_route", "payload_too_large", "queue_full"}
)


def error_from_exception(exc: RelayError, *, retry_after_s: int) -> ApiError:
    """The client's view of an error raised while accepting a request."""
    if exc.code not in _REQUEST_CODES:
        message = f"the broker is unavailable: {exc.message}"
        return api_error("service_unavailable", message, retry_after_s=retry_after_s)
    param = exc.param if isinstance(exc, InvalidRequest) else None
    if isinstance(exc, UnknownRoute):
        param = "model"
    return api_error(exc.code, exc.message, param=param, retry_after_s=retry_after_s)


def _attempt_line(a: Attempt) -> str:
    status = f" (HTTP {a.status})" if a.status else ""
    return f"{a.pool}/{a.model}: {a.code}{status}: {a.message}"


def _attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "pool": a.pool,
        "model": a.model,
        "code": a.code,
        "status": a.status,
        "message": a.message,
    }


_json_encoder = msgspec.json.Encoder()


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _json_encoder.encode(body), status, headers=headers, media_type="application/json"
    )


# --- the reset policy ------------------------------------------------------------------


class StreamReset(RelayError):
    """A reset voided text that was already sent to the client."""

    code = "stream_interrupted"


class ReplyFold:
    """Folds a job's events into the text an OpenAI client may see.

    ``chunk()`` returns the text to send now ("" while it is held back);
    ``finish()`` returns what is still held when the answer is done. A reset
    (``notice{reset}``, or a chunk of a newer attempt) drops held text silently
    and raises ``StreamReset`` if text of the voided attempt was already sent.
    ``holdback_s``: how long the first text is held (``math.inf``: until done).
    """

    def __init__(self, holdback_s: float = 0.0) -> None:
        self.holdback_s = holdback_s
        self.attempt = 0
        self.sent_chars = 0
        self.resets = 0
        self._held: list[str] = []
        self._held_since: float | None = None

    def chunk(self, chunk: Chunk, now: float) -> str:
        if chunk.attempt < self.attempt:
            return ""  # a straggler of an attempt that was already voided
        if chunk.attempt > self.attempt:
            self._void(chunk.attempt, f"attempt {chunk.attempt} started over")
        if self.sent_chars:
            self.sent_chars += len(chunk.delta)
            return chunk.delta
        self._held.append(chunk.delta)
        if self._held_since is None:
            self._held_since = now
        return self.flush(now)

    def notice(self, notice: Notice) -> None:
        if notice.reset and notice.attempt >= self.attempt:
            self._void(notice.attempt, _reset_reason(notice))

    def flush(self, now: float) -> str:
        """The held text, if it has been held long enough; else ""."""
        due = self.due_at()
        return self._release() if due is not None and now >= due else ""

    def finish(self) -> str:
        return self._release()

    def due_at(self) -> float | None:
        """When the held text must be sent (None: nothing is held)."""
        if self._held_since is None:
            return None
        return self._held_since + self.holdback_s

    def _release(self) -> str:
        text = "".join(self._held)
        self._held.clear()
        self._held_since = None
        self.sent_chars += len(text)
        return text

    def _void(self, attempt: int, reason: str) -> None:
        if self.sent_chars:
            raise StreamReset(
                f"the answer was restarted ({reason}) after {self.sent_chars} characters "
                "had been sent; they are void and the request was cancelled: retry it"
            )
        if self._held:
            self.resets += 1
        self._held.clear()
        self._held_since = None
        self.attempt = attempt


def _reset_reason(notice: Notice) -> str:
    where = f" from {notice.from_pool} to {notice.to_pool}" if notice.to_pool else ""
    detail = f": {notice.message}" if notice.message else ""
    return f"{notice.kind}{where}{detail}"


# --- OpenAI response shapes ------------------------------------------------------------


class CompletionIds(msgspec.Struct, frozen=True):
    """What every chunk of one answer repeats."""

    id: str
    created: int
    route: str


def completion_body(ids: CompletionIds, text: str, done: Done) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": done.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
        ],
        "usage": _usage(done),
    }


def _usage(done: Done) -> dict[str, int]:
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


class SseWriter:
    """Encodes ``chat.completion.chunk`` SSE frames for one answer."""

    def __init__(self, ids: CompletionIds, include_usage: bool) -> None:
        self.ids = ids
        self.include_usage = include_usage
        self.role_sent = False
        self.model: str | None = None  # the upstream model, once a chunk names it

    def text(self, text: str) -> bytes:
        delta: dict[str, str] = {"content": text}
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        return self._frame(self.model or self.ids.route, [_choice(delta, None)])

    def end(self, done: Done) -> bytes:
        """The finish_reason chunk, the usage chunk if asked for, and ``[DONE]``."""
        frames = [] if self.role_sent else [self.text("")]
        frames.append(self._frame(done.model, [_choice({}, done.finish_reason)]))
        if self.include_usage:
            frames.append(self._frame(done.model, [], usage=_usage(done)))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)

    def _frame(
        self, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
    ) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.ids.id,
            "object": "chat.completion.chunk",
            "created": self.ids.created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return sse_data(chunk)


def _choice(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def sse_data(payload: Any) -> bytes:
    return b"data: " + _json_encoder.encode(payload) + b"\n\n"


# --- metrics ---------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Prometheus metrics of one gateway process, in their own registry.

    Labels are routes known to the config (anything else is ``_unknown``) and
    stable outcomes (``done``, an error code, ``disconnected``), never a request id.
    With ``multiprocess_dir`` (``--workers N``: prometheus_client's multiprocess
    mode, which the environment variable PROMETHEUS_MULTIPROC_DIR switches on at
    import) ``render()`` sums the values of every worker process.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "llmrelay_gateway_requests",
            "Chat completion requests, by outcome",
            ["route", "stream", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmrelay_gateway_ttft_seconds",
            "Time from an HTTP request to its first text sent",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llmrelay_gateway_request_duration_seconds",
            "Time from an HTTP request to its last byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "llmrelay_gateway_requests_in_flight",
            "Requests being answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.resets = Counter(
            "llmrelay_gateway_stream_resets",
            "Resets: hidden (held text dropped) or aborted (text already sent)",
            ["route", "outcome"],
            registry=r,
        )
        self.cancels = Counter(
            "llmrelay_gateway_cancels",
            "Jobs the gateway cancelled, by reason",
            ["route", "reason"],
            registry=r,
        )

    def finished(self, route: str, stream: bool, outcome: str, duration_s: float) -> None:
        self.requests.labels(route, "true" if stream else "false", outcome).inc()
        self.duration.labels(route).observe(duration_s)

    def first_text(self, route: str, seconds: float) -> None:
        self.ttft.labels(route).observe(seconds)

    def reset(self, route: str, outcome: str) -> None:
        self.resets.labels(route, outcome).inc()

    def cancelled(self, route: str, reason: str) -> None:
        self.cancels.labels(route, reason).inc()

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


# --- the gateway -------------------------------------------------------------------------


class Gateway:
    """State shared by every request of one process: config, NATS, metrics.

    An async context manager: entering connects to NATS; ``asgi()`` is the app.
    """

    def __init__(
        self, config: Config, *, nats_url: str | None = None, metrics_dir: str | None = None
    ) -> None:
        self.config = config
        self.settings = config.gateway
        self.nats_url = nats_url or config.nats.url
        self.metrics = GatewayMetrics(multiprocess_dir=metrics_dir)
        self._keys = [_digest(k.reveal()) for k in self.settings.api_keys]
        self._nc: NATS | None = None
        self._relay: RelayClient | None = None

    @property
    def relay(self) -> RelayClient:
        if self._relay is None:
            raise RelayError("the gateway is not connected to NATS")
        return self._relay

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        user, password = self._creds()
        try:
            self._nc = await connect_nats(
                self.nats_url,
                name="llmrelay-gateway",
                timeout_s=self.config.nats.connect_timeout_s,
                user=user,
                password=password,
            )
        except ConnectFailed as exc:
            raise ConnectFailed(
                f"{exc.message} (the gateway connects as the `client` user of nats.conf, "
                "from gateway.nats_user/nats_password or credentials in --nats-url)"
            ) from exc
        self._relay = RelayClient(self.nats_url, config=self.config, nc=self._nc)

    def _creds(self) -> tuple[str | None, str | None]:
        """Credentials in the NATS URL win; else gateway.nats_user/nats_password."""
        s = self.settings
        if "@" in urlsplit(self.nats_url.split(",", 1)[0].strip()).netloc:
            return None, None
        return s.nats_user, s.nats_password.reveal() if s.nats_password else None

    async def close(self) -> None:
        """Disconnect (draining). Safe to call twice."""
        nc, self._nc, self._relay = self._nc, None, None
        if nc is not None and not nc.is_closed:
            await nc.drain()

    def asgi(self, *, lifespan: bool = True) -> Starlette:
        """The ASGI app; with ``lifespan`` it connects on start-up and closes on shutdown."""

        @asynccontextmanager
        async def span(_: Starlette) -> AsyncIterator[None]:
            async with self:
                yield

        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            lifespan=span if lifespan else None,
            exception_handlers={HTTPException: _http_error},
        )

    # --- small endpoints

    async def healthz(self, request: Request) -> Response:
        return _json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problem = await self.readiness_problem()
        if problem:
            return _json_response({"status": "unready", "reason": problem}, 503)
        return _json_response({"status": "ready"})

    async def readiness_problem(self) -> str | None:
        """Why the gateway cannot take requests now, or None."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return "not connected to NATS"
        for route in self.config.routes:
            try:
                await consumer_info(nc, JOBS_STREAM, route_consumer(route))
            except RelayError as exc:
                return f"route {route}: {exc.message} (is the topology created?)"
            except nats.errors.Error as exc:
                return f"route {route}: {exc}"
        return None

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except InvalidApiKey as exc:
            return self._error(exc).response()
        return _json_response({"object": "list", "data": [_model(r) for r in self.config.routes]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            self._check_key(request)
            if name not in self.config.routes:
                raise UnknownRoute(f"no route named {name!r}")
        except RelayError as exc:
            return self._error(exc).response()
        return _json_response(_model(name))

    # --- chat completions

    async def chat_completions(self, request: Request) -> Response:
        started = time.monotonic()
        label, stream = _UNKNOWN_ROUTE_LABEL, False
        try:
            self._check_key(request)
            req = parse_request(await self._read_body(request))
            stream = req.stream
            label = req.model if req.model in self.config.routes else label
            handle = await self._submit(self._job(req, request))
        except RelayError as exc:
            err = self._error(exc)
            self.metrics.finished(label, stream, err.code, time.monotonic() - started)
            return err.response()
        except ClientDisconnect:
            return Response(status_code=499)
        exchange = _Exchange(self, handle, req, label, started)
        if req.stream:
            return _EventStreamResponse(exchange)
        return await exchange.complete(request.receive)

    async def _submit(self, job: Job) -> JobHandle:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise RelayError("the gateway is not connected to NATS (reconnecting); retry shortly")
        try:
            return await self.relay.submit_job(job)
        except nats.errors.Error as exc:
            # The job may have been stored all the same: nobody will read its answer.
            with contextlib.suppress(nats.errors.Error):
                await nc.publish(cancel_subject(job.id), b"")
            raise RelayError(f"NATS did not confirm the job: {exc}") from exc

    def _job(self, req: ChatRequest, request: Request) -> Job:
        timeout_s = self.settings.request_timeout_s
        return self.relay.build_job(
            to_messages(req),
            route=req.model,
            timeout_s=timeout_s,
            options=job_options(req, request.headers.get("traceparent")),
        )

    async def _read_body(self, request: Request) -> bytes:
        # A job larger than max_job_bytes is refused anyway; do not buffer more.
        limit = 2 * self.config.streams.max_job_bytes
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
        """Raise ``InvalidApiKey`` unless the bearer key is configured (or none are)."""
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = _digest(token.strip())
        matched = False
        for key in self._keys:  # every key, always: the time says nothing about a match
            matched |= hmac.compare_digest(digest, key)
        if not (matched and scheme.lower() == "bearer"):
            raise InvalidApiKey("missing or incorrect API key: send `Authorization: Bearer <key>`")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such path, wrong method) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = "not_found" if exc.status_code == 404 else "invalid_request"
    return ApiError(status=exc.status_code, code=code, message=message).response()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _model(route: str) -> dict[str, Any]:
    return {"id": route, "object": "model", "created": 0, "owned_by": "llmrelay"}


# --- one request's exchange with its job ------------------------------------------------


class _Exchange:
    """One HTTP request and the job answering it."""

    def __init__(
        self, gateway: Gateway, handle: JobHandle, req: ChatRequest, label: str, started: float
    ) -> None:
        self.gw = gateway
        self.handle = handle
        self.req = req
        self.label = label
        self.started = started
        self.ids = CompletionIds(f"chatcmpl-{handle.id}", int(time.time()), req.model)
        self.answered = False  # the worker sent done/error: nothing to cancel
        self.headers = {"x-request-id": handle.id}

    async def events(self) -> AsyncIterator[Event]:
        """The job's events; a missed deadline or a lost connection ends with an ``Error``."""
        try:
            async for event in self.handle.events():
                self.answered = isinstance(event, Done | Error)
                yield event
        except DeadlineExceeded as exc:
            yield Error(code="deadline_exceeded", message=exc.message)
        except nats.errors.Error as exc:
            yield Error(code="service_unavailable", message=f"lost the NATS connection: {exc}")

    async def complete(self, receive: Receive) -> Response:
        """A non-streamed answer: held whole, so any reset is invisible."""
        fold = ReplyFold(math.inf)
        outcome: Done | Error | None = None
        self.gw.metrics.in_flight.inc()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                outcome = await self._collect(fold)
                tg.cancel_scope.cancel()
        finally:
            self.gw.metrics.in_flight.dec()
            await self.finish(_outcome_label(outcome), stream=False)
        if isinstance(outcome, Done):
            body = completion_body(self.ids, fold.finish(), outcome)
            return _json_response(body, headers={**self.headers, "x-llmrelay-pool": outcome.pool})
        if isinstance(outcome, Error):
            return self.error(outcome).response()
        return Response(status_code=499)  # the client is gone; nobody reads this

    async def _collect(self, fold: ReplyFold) -> Done | Error:
        async for event in self.events():
            if isinstance(event, Chunk):
                fold.chunk(event, 0.0)
            elif isinstance(event, Notice):
                fold.notice(event)
            else:
                return event
        raise RelayError("the reply stream ended without done or error")  # pragma: no cover

    def error(self, event: Error) -> ApiError:
        err = error_from_event(event, retry_after_s=self.gw.settings.retry_after_s)
        return msgspec.structs.replace(err, headers={**err.headers, **self.headers})

    async def finish(self, outcome: str, *, stream: bool) -> None:
        """Record the outcome; cancel the job if it is still running."""
        if not self.answered:
            with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
                await self.handle.cancel()
            self.gw.metrics.cancelled(self.label, outcome)
            log.info("request %s: %s; job cancelled", self.handle.id, outcome)
        self.gw.metrics.finished(self.label, stream, outcome, time.monotonic() - self.started)


def _outcome_label(outcome: Done | Error | None) -> str:
    if outcome is None:
        return "disconnected"
    return "done" if isinstance(outcome, Done) else outcome.code


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the client disconnects (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class _EventStreamResponse(Response):
    """A streamed answer: OpenAI SSE chunks, under the reset policy (see module docstring).

    Headers go out with the first text (or a keep-alive): an error before that is
    a plain HTTP error; after it, an SSE error event that ends the stream.
    """

    def __init__(self, exchange: _Exchange) -> None:
        super().__init__(status_code=200)
        self.x = exchange
        self.fold = ReplyFold(exchange.gw.settings.stream_holdback_ms / 1000)
        self.sse = SseWriter(exchange.ids, exchange.req.include_usage)
        self.outcome = "disconnected"
        self._scope: Scope = {"type": "http"}
        self._send: Send | None = None
        self._started = False
        self._last_write = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope, self._send = scope, send
        self.x.gw.metrics.in_flight.inc()
        try:
            async with anyio.create_task_group() as tg:
                events_in, events_out = anyio.create_memory_object_stream[Event](_EVENT_BUFFER)
                tg.start_soon(self._pump, events_in)
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                self.outcome = await self._relay(events_out)
                tg.cancel_scope.cancel()
        finally:
            self.x.gw.metrics.in_flight.dec()
            await self.x.finish(self.outcome, stream=True)

    async def _pump(self, events_in: ObjectSendStream[Event]) -> None:
        async with events_in:
            async for event in self.x.events():
                await events_in.send(event)

    async def _relay(self, events: ObjectReceiveStream[Event]) -> str:
        try:
            while True:
                event = await self._next(events)
                if isinstance(event, Chunk):
                    if event.model is not None and event.attempt >= self.fold.attempt:
                        self.sse.model = event.model  # who answers, from its first chunk
                    await self._text(self.fold.chunk(event, time.monotonic()))
                elif isinstance(event, Notice):
                    self.fold.notice(event)
                elif isinstance(event, Done):
                    await self._done(event)
                    return "done"
                elif isinstance(event, Error):
                    await self._fail(self.x.error(event))
                    return event.code
                else:
                    await self._tick()
        except StreamReset as exc:
            self.x.gw.metrics.reset(self.x.label, "aborted")
            await self._fail(api_error(exc.code, exc.message))
            return exc.code

    async def _next(self, events: ObjectReceiveStream[Event]) -> Event | None:
        """The next event, or None when held text is due or a keep-alive is."""
        wake_at = self._last_write + KEEPALIVE_S
        due = self.fold.due_at()
        if due is not None:
            wake_at = min(wake_at, due)
        with anyio.move_on_after(max(0.0, wake_at - time.monotonic())):
            try:
                return await events.receive()
            except anyio.EndOfStream:
                return Error(code="internal", message="the reply stream ended without an answer")
        return None

    async def _tick(self) -> None:
        now = time.monotonic()
        text = self.fold.flush(now)
        if text:
            await self._text(text)
        elif now - self._last_write >= KEEPALIVE_S:
            await self._write(b": keep-alive\n\n")

    async def _text(self, text: str) -> None:
        if not text:
            return
        if not self.sse.role_sent:
            self.x.gw.metrics.first_text(self.x.label, time.monotonic() - self.x.started)
        await self._write(self.sse.text(text))

    async def _done(self, done: Done) -> None:
        if self.fold.resets:
            self.x.gw.metrics.reset(self.x.label, "hidden")
        text = self.fold.finish()
        head = self.sse.text(text) if text else b""
        await self._write(head + self.sse.end(done), more=False)

    async def _fail(self, err: ApiError) -> None:
        if not self._started:
            # Nothing sent yet: a plain HTTP error with its status code.
            assert self._send is not None
            await err.response()(self._scope, _no_receive, self._send)
            return
        await self._write(sse_data(err.body()), more=False)

    async def _write(self, data: bytes, *, more: bool = True) -> None:
        assert self._send is not None
        if not self._started:
            self._started = True
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": self._sse_headers()}
            )
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
        self._last_write = time.monotonic()

    def _sse_headers(self) -> list[tuple[bytes, bytes]]:
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **self.x.headers,
        }
        return [(k.encode(), v.encode()) for k, v in headers.items()]


async def _no_receive() -> AsgiMessage:
    raise RuntimeError("a response does not read the request")  # pragma: no cover


# --- running it ------------------------------------------------------------------------------


def create_app(
    config: Config, *, nats_url: str | None = None, metrics_dir: str | None = None
) -> Starlette:
    """The gateway as an ASGI app that connects to NATS on start-up (for uvicorn)."""
    return Gateway(config, nats_url=nats_url, metrics_dir=metrics_dir).asgi()


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
            uvicorn.Config(
                gateway.asgi(lifespan=False),
                host=host,
                port=port,
                lifespan="off",
                log_level=log_level,
                access_log=False,
                timeout_graceful_shutdown=graceful_s,
            )
        )
        await server.serve()


@asynccontextmanager
async def serve_gateway(
    config: Config,
    *,
    nats_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_s: int = 5,
) -> AsyncIterator[str]:
    """Run the gateway in this event loop; yield its base URL, e.g. ``http://127.0.0.1:PORT/v1``.

    ``port=0`` picks a free port. NATS is connected and the socket is listening
    before the URL is yielded, so the first request can be sent at once. To
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
    sock = socket.create_server((host, port), backlog=1024)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            (gateway := Gateway(config, nats_url=nats_url)).asgi(lifespan=False),
            lifespan="off",
            log_config=None,
            access_log=False,
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
        sock.close()


__all__ = [
    "ApiError",
    "ChatRequest",
    "Gateway",
    "GatewayMetrics",
    "InvalidRequest",
    "ReplyFold",
    "SseWriter",
    "StreamReset",
    "create_app",
    "parse_request",
    "run_gateway",
    "serve_gateway",
]
