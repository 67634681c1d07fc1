"""A fake LLM provider: a real HTTP/1.1 server that misbehaves on request.

Tests, the demo and the benchmark need upstreams that answer predictably, fast,
and fail in exactly the ways real providers do. This server speaks the three
wire formats llmrelay's adapters speak, chosen by path:

    POST /v1/chat/completions, /chat/completions   OpenAI (SSE, or JSON with stream=false)
    POST /v1/messages                              Anthropic Messages (SSE event stream)
    POST /api/chat                                 Ollama (NDJSON)
    GET  /stats   POST /control/reset   POST|GET /control/faults   GET /healthz

It is written on raw asyncio streams (no framework) with keep-alive and chunked
transfer encoding, so one core serves thousands of streamed requests a second
and ``/stats`` can count TCP connections separately from requests.

**The answer** is ``expected_answer(name, tokens)``: ``"Hello from <name>."`` and
then deterministic words, one token per streamed delta. ``tokens`` is the
server's ``--tokens``, lowered by the request's max_tokens (``num_predict`` for
Ollama); ``finish_reason`` is ``length`` when the request's limit cut it short.

**Faults** are ``key=value`` pairs joined by ``+`` (or a JSON object). They can
be the server default (``--fault``, ``POST /control/faults``, ``set_fault``) and
per request as suffixes of the model name, which win over the default, e.g.
``gpt-4o-mini+status=429+retry_after=2``. Keys (``FAULT_KEYS``):

    status=N          answer HTTP N with the provider's error JSON (529: overloaded)
    error=KIND        error kind (``ERROR_KINDS``): context_length_exceeded, content_filter,
                      overloaded, rate_limit, ...; alone it answers the kind's status
    retry_after=S     Retry-After header (seconds or an HTTP date)
    retry_after_ms=N  retry-after-ms header
    reset             close the socket (RST) before sending headers
    noresponse        read the request, never answer, keep the socket open
    stall=N           stream N tokens, then go silent with the socket open
    cut=N             stream N tokens, then close without ending the body
    malformed=N       send an undecodable event just before token N (all tokens still follow)
    nodone            omit [DONE] / message_stop / the end of the body; keep the socket open
    error_after=N     stream N tokens, then an in-stream error event of kind ``error``
                      (default overloaded), and end the body
    ttft_ms=N  token_delay_ms=N  tokens=N   timing and length overrides
    fail_first=K      only the first K requests with this exact model string get the
                      failure faults (503 if none is given); later ones succeed
                      (timing keys still apply). ``set_fault`` and /control/reset
                      restart the count.

``/stats`` counts requests, TCP connections, in-flight and peak concurrency, and
logs the last 10,000 chat requests with their arrival time and the status they
were given (0 for ``reset``/``noresponse``).

**Running it:** ``async with MockProvider(name="mock-a") as mock:`` serves from
the current event loop (tests); ``MockProviderProcess`` runs ``llmrelay
mock-provider`` as a child process (the benchmark), which prints
``mock-provider <name> listening on http://127.0.0.1:PORT`` once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

import anyio
import httpx
import msgspec

from broker._server import llmrelay_command

DEFAULT_TOKENS = 16
LOG_SIZE = 10_000
_NATO = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
)
_WORDS = _NATO.split()
_LAST_CHUNK = b"0\r\n\r\n"
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_NDJSON = b"application/x-ndjson"


# --- the deterministic answer ------------------------------------------------


@lru_cache(maxsize=1024)
def answer_tokens(name: str, tokens: int) -> tuple[str, ...]:
    """The streamed deltas, in order: ``"Hello from <name>."`` then one word each."""
    words = (f" {_WORDS[(i * 7 + 3) % len(_WORDS)]}" for i in range(1, tokens))
    return (f"Hello from {name}.", *words) if tokens > 0 else ()


def expected_answer(name: str, tokens: int) -> str:
    """The full text a mock provider called ``name`` streams for ``tokens`` tokens."""
    return "".join(answer_tokens(name, tokens))


@lru_cache(maxsize=1024)
def _json_tokens(name: str, tokens: int) -> tuple[bytes, ...]:
    return tuple(msgspec.json.encode(t) for t in answer_tokens(name, tokens))


# --- faults ------------------------------------------------------------------


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a flag: {value!r}")


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _known_error(value: str) -> str:
    _kind(value)  # raises ValueError for an unknown kind
    return value


def _millis(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


FAULT_KEYS: dict[str, Callable[[str], Any]] = {
    "status": int,
    "error": _known_error,
    "retry_after": str,
    "retry_after_ms": _count,
    "reset": _flag,
    "noresponse": _flag,
    "stall": _count,
    "cut": _count,
    "malformed": _count,
    "nodone": _flag,
    "error_after": _count,
    "ttft_ms": _millis,
    "token_delay_ms": _millis,
    "tokens": _count,
    "fail_first": _count,
}
_TIMING_KEYS = ("ttft_ms", "token_delay_ms", "tokens")


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """How to misbehave. Every field unset means: answer normally."""

    status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    retry_after_ms: int | None = None
    reset: bool = False
    noresponse: bool = False
    stall: int | None = None
    cut: int | None = None
    malformed: int | None = None
    nodone: bool = False
    error_after: int | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    tokens: int | None = None
    fail_first: int | None = None

    def fails(self) -> bool:
        """True when this fault makes the answer fail in some way (not just slow or short)."""
        return any(
            getattr(self, key) not in (None, False)
            for key in FAULT_KEYS
            if key not in _TIMING_KEYS and key != "fail_first"
        )

    def timing_only(self) -> Fault:
        """This fault without its failures: what a request past ``fail_first`` gets."""
        return Fault(**{key: getattr(self, key) for key in _TIMING_KEYS})

    def as_dict(self) -> dict[str, Any]:
        defaults = Fault()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


FaultSpec = str | Mapping[str, Any] | Fault | None


def parse_fault(spec: FaultSpec) -> Fault:
    """A ``Fault`` from ``"k=v+k=v"``, its JSON object text, a mapping, or None (no fault)."""
    if spec is None or isinstance(spec, Fault):
        return spec or Fault()
    return Fault(**_fault_fields(spec))


def _fault_fields(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            decoded = msgspec.json.decode(text)
            if not isinstance(decoded, dict):
                raise ValueError("a JSON fault must be an object")
            return _fault_fields(decoded)
        pairs = [part.partition("=") for part in text.split("+") if part.strip()]
        spec = {key.strip(): value for key, _, value in pairs}
    return {key: _convert_fault_value(key, value) for key, value in spec.items()}


def _convert_fault_value(key: str, value: Any) -> Any:
    converter = FAULT_KEYS.get(key)
    if converter is None:
        raise ValueError(f"unknown fault key {key!r} (known: {', '.join(FAULT_KEYS)})")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        return converter(text)
    except ValueError as exc:
        raise ValueError(f"fault {key}={value!r}: {exc}") from exc


@lru_cache(maxsize=4096)
def _split_model(model: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``"m+k=v+flag"`` -> ``("m", (("k", v), ("flag", True)))``; raises ValueError."""
    base, _, suffix = model.partition("+")
    return base, tuple(_fault_fields(suffix).items()) if suffix else ()


class ErrorKind(NamedTuple):
    """One kind of provider failure, in each provider's words."""

    status: int
    openai_type: str
    openai_code: str | None
    anthropic_type: str
    message: str


ERROR_KINDS: dict[str, ErrorKind] = {
    "bad_request": ErrorKind(400, "invalid_request_error", None, "invalid_request_error",
                             "Invalid request."),
    "context_length_exceeded": ErrorKind(
        400, "invalid_request_error", "context_length_exceeded", "invalid_request_error",
        "prompt is too long: this model's maximum context length is 8192 tokens.",
    ),
    "content_filter": ErrorKind(400, "invalid_request_error", "content_filter",
                                "invalid_request_error",
                                "Output blocked by content filtering policy."),
    "content_policy_violation": ErrorKind(
        400, "invalid_request_error", "content_policy_violation", "invalid_request_error",
        "Your request was rejected by the content policy.",
    ),
    "auth": ErrorKind(401, "invalid_request_error", "invalid_api_key", "authentication_error",
                      "Incorrect API key provided."),
    "permission": ErrorKind(403, "invalid_request_error", "permission_denied", "permission_error",
                            "Your API key does not have permission to use this model."),
    "not_found": ErrorKind(404, "invalid_request_error", "model_not_found", "not_found_error",
                           "The model does not exist."),
    "timeout": ErrorKind(408, "timeout", None, "timeout_error", "Request timed out."),
    "rate_limit": ErrorKind(429, "requests", "rate_limit_exceeded", "rate_limit_error",
                            "Rate limit reached for requests."),
    "server_error": ErrorKind(500, "server_error", None, "api_error", "Internal server error."),
    "unavailable": ErrorKind(503, "server_error", None, "api_error",
                             "The server is overloaded or not ready yet."),
    "overloaded": ErrorKind(529, "server_error", "overloaded", "overloaded_error", "Overloaded"),
}  # fmt: skip
_KIND_BY_STATUS = {
    400: "bad_request", 401: "auth", 403: "permission", 404: "not_found", 408: "timeout",
    429: "rate_limit", 500: "server_error", 502: "unavailable", 503: "unavailable",
    504: "unavailable", 529: "overloaded",
}  # fmt: skip


def _error_kind(fault: Fault) -> str:
    if fault.error is not None:
        return fault.error
    status = fault.status or 503
    return _KIND_BY_STATUS.get(status, "server_error" if status >= 500 else "bad_request")


# --- requests ------------------------------------------------------------------


class _Block(msgspec.Struct):
    text: str = ""


class _Msg(msgspec.Struct):
    content: str | list[_Block] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _OllamaOptions(msgspec.Struct):
    num_predict: int | None = None


class ChatRequest(msgspec.Struct):
    """The parts of any of the three request shapes that the mock looks at."""

    model: str = ""
    messages: list[_Msg] = []
    system: str | list[_Block] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    options: _OllamaOptions | None = None


_request_decoder = msgspec.json.Decoder(ChatRequest)


def _chars(content: str | list[_Block] | None) -> int:
    if content is None:
        return 0
    return len(content) if isinstance(content, str) else sum(len(b.text) for b in content)


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """A deterministic prompt size: total characters / 4, at least 1."""
    chars = _chars(request.system) + sum(_chars(m.content) for m in request.messages)
    return max(chars // 4, 1)


class HttpRequest(NamedTuple):
    method: bytes
    path: bytes
    body: bytes
    keep_alive: bool


class _BadHttp(Exception):
    """The client sent something that is not HTTP/1.1 the mock understands."""


async def _read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadHttp("bad request line")
    length, chunked, keep_alive = _parse_headers(lines[1:], parts[2] == b"HTTP/1.1")
    body = await _read_chunked(reader) if chunked else await reader.readexactly(length)
    return HttpRequest(parts[0], parts[1].partition(b"?")[0], body, keep_alive)


def _parse_headers(lines: list[bytes], keep_alive: bool) -> tuple[int, bool, bool]:
    length, chunked = 0, False
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    return length, chunked, keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailers
    return b"".join(parts)


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Overloaded" if status == 529 else b"Unknown"


def _head(status: int, content_type: bytes, length: int | None, extra: bytes = b"") -> bytes:
    framing = (
        b"content-length: %d" % length if length is not None else b"transfer-encoding: chunked"
    )
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n%s\r\n" % (
        status,
        _phrase(status),
        content_type,
        framing,
        extra,
    )


def _json_response(status: int, payload: Any, extra: bytes = b"") -> bytes:
    body = msgspec.json.encode(payload)
    return _head(status, _JSON, len(body), extra) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunks(events: list[bytes]) -> bytes:
    return b"".join([_chunk(e) for e in events if e])


# --- the three wire formats ------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Plan:
    """Everything decided about one chat request before the first byte is written."""

    name: str
    model: str
    full_model: str
    fault: Fault
    tokens: int
    length_limited: bool
    prompt_tokens: int
    stream: bool
    include_usage: bool
    status: int
    request_no: int
    created: int

    @property
    def answer(self) -> str:
        return expected_answer(self.name, self.tokens)

    @property
    def ending(self) -> tuple[str, int]:
        """How the answer ends, and after how many tokens: the earliest of the faults set."""
        fault = self.fault
        endings = [("cut", fault.cut), ("stall", fault.stall), ("error", fault.error_after)]
        chosen = min(((n, name) for name, n in endings if n is not None), default=None)
        if chosen is None:
            return "normal", self.tokens
        return chosen[1], min(chosen[0], self.tokens)


class WireFormat(Protocol):
    content_type: bytes

    def wants_stream(self, request: ChatRequest) -> bool: ...
    def limit(self, request: ChatRequest) -> int | None: ...
    def opening(self, plan: Plan) -> list[bytes]: ...
    def token_events(self, plan: Plan) -> list[bytes]: ...
    def closing(self, plan: Plan) -> list[bytes]: ...
    def terminator(self, plan: Plan) -> list[bytes]: ...
    def garbage(self) -> bytes: ...
    def stream_error(self, kind: ErrorKind) -> bytes: ...
    def error_body(self, kind: ErrorKind) -> Any: ...
    def full(self, plan: Plan) -> Any: ...


class OpenAIFormat:
    content_type = _SSE

    def wants_stream(self, request: ChatRequest) -> bool:
        return bool(request.stream)

    def limit(self, request: ChatRequest) -> int | None:
        return request.max_completion_tokens or request.max_tokens

    def _prefix(self, plan: Plan) -> bytes:
        return b'data: {"id":"chatcmpl-mock%d","object":"chat.completion.chunk","created":%d,' % (
            plan.request_no,
            plan.created,
        ) + b'"model":%s,"choices":[' % msgspec.json.encode(plan.model)

    def opening(self, plan: Plan) -> list[bytes]:
        delta = b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        return [self._prefix(plan) + delta]

    def token_events(self, plan: Plan) -> list[bytes]:
        prefix = self._prefix(plan) + b'{"index":0,"delta":{"content":'
        suffix = b'},"finish_reason":null}]}\n\n'
        return [prefix + text + suffix for text in _json_tokens(plan.name, plan.tokens)]

    def closing(self, plan: Plan) -> list[bytes]:
        reason = b"length" if plan.length_limited else b"stop"
        events = [
            self._prefix(plan) + b'{"index":0,"delta":{},"finish_reason":"%s"}]}\n\n' % reason
        ]
        if plan.include_usage:
            events.append(self._prefix(plan) + b'],"usage":%s}\n\n' % _openai_usage(plan))
        return events

    def terminator(self, plan: Plan) -> list[bytes]:
        return [b"data: [DONE]\n\n"]

    def garbage(self) -> bytes:
        return b'data: {"choices":[{"delta":{"content": <<not json>>\n\n'

    def stream_error(self, kind: ErrorKind) -> bytes:
        return b"data: %s\n\n" % msgspec.json.encode(self.error_body(kind))

    def error_body(self, kind: ErrorKind) -> Any:
        error = {"message": kind.message, "type": kind.openai_type, "code": kind.openai_code}
        return {"error": {**error, "param": None}}

    def full(self, plan: Plan) -> Any:
        return {
            "id": f"chatcmpl-mock{plan.request_no}",
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": plan.answer},
                    "finish_reason": "length" if plan.length_limited else "stop",
                }
            ],
            "usage": msgspec.json.decode(_openai_usage(plan)),
        }


def _openai_usage(plan: Plan) -> bytes:
    total = plan.prompt_tokens + plan.tokens
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        plan.prompt_tokens,
        plan.tokens,
        total,
    )


def _sse(event: bytes, data: bytes) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event, data)


class AnthropicFormat:
    content_type = _SSE

    def wants_stream(self, request: ChatRequest) -> bool:
        return bool(request.stream)

    def limit(self, request: ChatRequest) -> int | None:
        return request.max_tokens

    def opening(self, plan: Plan) -> list[bytes]:
        message = {**self._message(plan, []), "stop_reason": None}
        message["usage"] = {"input_tokens": plan.prompt_tokens, "output_tokens": 1}
        start = {"type": "message_start", "message": message}
        block = (
            b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
        )
        return [
            _sse(b"message_start", msgspec.json.encode(start)),
            _sse(b"content_block_start", block),
            _sse(b"ping", b'{"type": "ping"}'),
        ]

    def token_events(self, plan: Plan) -> list[bytes]:
        prefix = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        prefix += b'"delta":{"type":"text_delta","text":'
        return [prefix + text + b"}}\n\n" for text in _json_tokens(plan.name, plan.tokens)]

    def closing(self, plan: Plan) -> list[bytes]:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(plan), "stop_sequence": None},
            "usage": {"output_tokens": plan.tokens},
        }
        return [
            _sse(b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
            _sse(b"message_delta", msgspec.json.encode(delta)),
        ]

    def terminator(self, plan: Plan) -> list[bytes]:
        return [_sse(b"message_stop", b'{"type":"message_stop"}')]

    def garbage(self) -> bytes:
        return _sse(b"content_block_delta", b'{"type":"content_block_delta", <<not json>>')

    def stream_error(self, kind: ErrorKind) -> bytes:
        return _sse(b"error", msgspec.json.encode(self.error_body(kind)))

    def error_body(self, kind: ErrorKind) -> Any:
        return {"type": "error", "error": {"type": kind.anthropic_type, "message": kind.message}}

    def full(self, plan: Plan) -> Any:
        message = self._message(plan, [{"type": "text", "text": plan.answer}])
        usage = {"input_tokens": plan.prompt_tokens, "output_tokens": plan.tokens}
        return {**message, "stop_reason": self._stop_reason(plan), "usage": usage}

    def _message(self, plan: Plan, content: list[Any]) -> dict[str, Any]:
        return {
            "id": f"msg_mock{plan.request_no}",
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": content,
            "stop_sequence": None,
        }

    def _stop_reason(self, plan: Plan) -> str:
        return "max_tokens" if plan.length_limited else "end_turn"


class OllamaFormat:
    content_type = _NDJSON

    def wants_stream(self, request: ChatRequest) -> bool:
        return request.stream is not False

    def limit(self, request: ChatRequest) -> int | None:
        return request.options.num_predict if request.options else None

    def opening(self, plan: Plan) -> list[bytes]:
        return []

    def token_events(self, plan: Plan) -> list[bytes]:
        prefix = b'{"model":%s,"created_at":"%s","message":{"role":"assistant","content":' % (
            msgspec.json.encode(plan.model),
            _iso(plan.created).encode(),
        )
        return [
            prefix + text + b'},"done":false}\n' for text in _json_tokens(plan.name, plan.tokens)
        ]

    def closing(self, plan: Plan) -> list[bytes]:
        return [msgspec.json.encode(self._final(plan, "")) + b"\n"]

    def terminator(self, plan: Plan) -> list[bytes]:
        return []

    def garbage(self) -> bytes:
        return b'{"model": <<not json>>\n'

    def stream_error(self, kind: ErrorKind) -> bytes:
        return msgspec.json.encode(self.error_body(kind)) + b"\n"

    def error_body(self, kind: ErrorKind) -> Any:
        return {"error": kind.message}

    def full(self, plan: Plan) -> Any:
        return self._final(plan, plan.answer)

    def _final(self, plan: Plan, content: str) -> dict[str, Any]:
        return {
            "model": plan.model,
            "created_at": _iso(plan.created),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": "length" if plan.length_limited else "stop",
            "prompt_eval_count": plan.prompt_tokens,
            "eval_count": plan.tokens,
        }


def _iso(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


_OPENAI, _ANTHROPIC, _OLLAMA = OpenAIFormat(), AnthropicFormat(), OllamaFormat()
CHAT_PATHS: dict[bytes, WireFormat] = {
    b"/v1/chat/completions": _OPENAI,
    b"/chat/completions": _OPENAI,
    b"/v1/messages": _ANTHROPIC,
    b"/api/chat": _OLLAMA,
}


# --- statistics ----------------------------------------------------------------


class Stats:
    """Counters a test reads to see how many attempts arrived, when, and on how many sockets."""

    __slots__ = ("active", "by_model", "by_path", "connections", "log", "peak", "requests")

    def __init__(self) -> None:
        self.active = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.connections = 0
        self.peak = self.active
        self.by_path: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.log: deque[tuple[float, str, str, int]] = deque(maxlen=LOG_SIZE)

    def begin(self, path: str, model: str, status: int) -> None:
        self.requests += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.by_path[path] += 1
        self.by_model[model] += 1
        self.log.append((time.time(), model, path, status))

    def end(self) -> None:
        self.active -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "connections": self.connections,
            "active": self.active,
            "peak_concurrency": self.peak,
            "by_path": dict(self.by_path),
            "by_model": dict(self.by_model),
            "log": [{"t": t, "model": m, "path": p, "status": s} for t, m, p, s in self.log],
        }


# --- the server ------------------------------------------------------------------


class _Exchange(NamedTuple):
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    request: HttpRequest


Handler = Callable[[_Exchange], Awaitable[bool]]


class MockProvider:
    """The fake provider, served from the current asyncio event loop.

    ``async with MockProvider(name="mock-a") as mock:`` then call ``mock.url``;
    ``port=0`` picks a free port (read it back from ``mock.port``).
    """

    def __init__(
        self,
        *,
        name: str = "mock",
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = DEFAULT_TOKENS,
        ttft_ms: float = 0.0,
        token_delay_ms: float = 0.0,
        fault: FaultSpec = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.tokens = tokens
        self.ttft_ms = ttft_ms
        self.token_delay_ms = token_delay_ms
        self.fault = parse_fault(fault)
        self._stats = Stats()
        self._attempts: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._routes: dict[tuple[bytes, bytes], Handler] = {
            (b"GET", b"/stats"): self._get_stats,
            (b"GET", b"/healthz"): self._get_health,
            (b"POST", b"/control/reset"): self._post_reset,
            (b"POST", b"/control/faults"): self._post_faults,
            (b"GET", b"/control/faults"): self._get_faults,
        }

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def expected_answer(self, tokens: int | None = None) -> str:
        return expected_answer(self.name, self.tokens if tokens is None else tokens)

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters and the ``fail_first`` attempt counts."""
        self._stats.reset()
        self._attempts.clear()

    def set_fault(self, spec: FaultSpec) -> None:
        """Replace the default fault (None or ``{}`` clears it); restarts ``fail_first`` counts."""
        self.fault = parse_fault(spec)
        self._attempts.clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, backlog=4096, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and drop every open connection; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> MockProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._stats.connections += 1
        try:
            while await self._serve_one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _BadHttp):
            pass  # the client went away or spoke nonsense: drop the connection
        except asyncio.CancelledError:
            # Only aclose() cancels these tasks; ending quietly keeps asyncio's
            # stream callback from reporting the cancellation as an error.
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request = await _read_request(reader)
        if request is None:
            return False
        exchange = _Exchange(reader, writer, request)
        fmt = CHAT_PATHS.get(request.path) if request.method == b"POST" else None
        if fmt is not None:
            return await self._chat(exchange, fmt)
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            writer.write(_json_response(404, {"error": "not found"}))
            return request.keep_alive
        return await handler(exchange)

    # --- chat

    async def _chat(self, exchange: _Exchange, fmt: WireFormat) -> bool:
        try:
            plan = self._plan(exchange.request.body, fmt)
        except (ValueError, msgspec.DecodeError) as exc:
            kind = ERROR_KINDS["bad_request"]._replace(message=str(exc))
            exchange.writer.write(_json_response(400, fmt.error_body(kind)))
            return exchange.request.keep_alive
        self._stats.begin(exchange.request.path.decode(), plan.full_model, plan.status)
        try:
            return await self._answer(exchange, fmt, plan) and exchange.request.keep_alive
        finally:
            self._stats.end()

    def _plan(self, body: bytes, fmt: WireFormat) -> Plan:
        request = _request_decoder.decode(body)
        base, overrides = _split_model(request.model)
        fault = self._fault_for(request.model, overrides)
        configured = self.tokens if fault.tokens is None else fault.tokens
        limit = fmt.limit(request)
        limited = limit is not None and 0 < limit < configured
        return Plan(
            name=self.name,
            model=base,
            full_model=request.model,
            fault=fault,
            tokens=limit if limited and limit is not None else configured,
            length_limited=limited,
            prompt_tokens=estimate_prompt_tokens(request),
            stream=fmt.wants_stream(request),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            status=_planned_status(fault),
            request_no=self._stats.requests + 1,
            created=int(time.time()),
        )

    def _fault_for(self, model: str, overrides: tuple[tuple[str, Any], ...]) -> Fault:
        fault = dataclasses.replace(self.fault, **dict(overrides)) if overrides else self.fault
        if fault.fail_first is None:
            return fault
        self._attempts[model] += 1
        if self._attempts[model] > fault.fail_first:
            return fault.timing_only()
        return fault if fault.fails() else dataclasses.replace(fault, status=503)

    async def _answer(self, exchange: _Exchange, fmt: WireFormat, plan: Plan) -> bool:
        fault = plan.fault
        if fault.reset:
            _abort(exchange.writer)
            return False
        if fault.noresponse:
            await _until_eof(exchange.reader)
            return False
        if plan.status >= 400:
            await self._sleep_ms(fault.ttft_ms, self.ttft_ms)
            exchange.writer.write(_error_response(fmt, fault, plan.status))
            return True
        if plan.stream:
            return await self._stream(exchange, fmt, plan)
        return await self._whole(exchange, fmt, plan)

    async def _stream(self, exchange: _Exchange, fmt: WireFormat, plan: Plan) -> bool:
        writer = exchange.writer
        extra = b"cache-control: no-cache\r\nx-mock-provider: %s\r\n" % self.name.encode()
        writer.write(_head(200, fmt.content_type, None, extra) + _chunks(fmt.opening(plan)))
        await self._sleep_ms(plan.fault.ttft_ms, self.ttft_ms)
        await self._send_tokens(writer, fmt, plan)
        return await self._end_stream(exchange, fmt, plan)

    async def _send_tokens(self, writer: asyncio.StreamWriter, fmt: WireFormat, plan: Plan) -> None:
        events = fmt.token_events(plan)[: plan.ending[1]]
        if plan.fault.malformed is not None and 0 < plan.fault.malformed <= len(events):
            events.insert(plan.fault.malformed - 1, fmt.garbage())
        delay_ms = _pick(plan.fault.token_delay_ms, self.token_delay_ms)
        if not delay_ms:
            writer.write(_chunks(events))
            return
        for i, event in enumerate(events):
            if i:
                await writer.drain()
                await asyncio.sleep(delay_ms / 1000.0)
            writer.write(_chunk(event))

    async def _end_stream(self, exchange: _Exchange, fmt: WireFormat, plan: Plan) -> bool:
        ending, _ = plan.ending
        writer = exchange.writer
        if ending == "cut":
            await writer.drain()
            return False
        if ending == "stall":
            await _hold(exchange)
            return False
        if ending == "error":
            writer.write(_chunk(fmt.stream_error(_kind(plan.fault.error or "overloaded"))))
            writer.write(_LAST_CHUNK)
            return True
        if plan.fault.nodone:
            writer.write(_chunks(fmt.closing(plan)))
            await _hold(exchange)
            return False
        writer.write(_chunks(fmt.closing(plan) + fmt.terminator(plan)) + _LAST_CHUNK)
        return True

    async def _whole(self, exchange: _Exchange, fmt: WireFormat, plan: Plan) -> bool:
        delay_ms = _pick(plan.fault.token_delay_ms, self.token_delay_ms) * max(plan.tokens - 1, 0)
        await self._sleep_ms(plan.fault.ttft_ms, self.ttft_ms, delay_ms)
        ending, _ = plan.ending
        if ending == "error":
            exchange.writer.write(_error_response(fmt, plan.fault, 500))
            return True
        response = _json_response(200, fmt.full(plan))
        if ending == "normal":
            exchange.writer.write(response)
            return True
        exchange.writer.write(response[: len(response) // 2])  # half an answer, then the fault
        if ending == "stall":
            await _hold(exchange)
        return False

    async def _sleep_ms(self, override: float | None, default: float, extra: float = 0.0) -> None:
        total_ms = _pick(override, default) + extra
        if total_ms > 0:
            await asyncio.sleep(total_ms / 1000.0)

    # --- control

    async def _get_stats(self, exchange: _Exchange) -> bool:
        exchange.writer.write(_json_response(200, self.stats()))
        return exchange.request.keep_alive

    async def _get_health(self, exchange: _Exchange) -> bool:
        exchange.writer.write(_json_response(200, {"status": "ok", "name": self.name}))
        return exchange.request.keep_alive

    async def _post_reset(self, exchange: _Exchange) -> bool:
        self.reset_stats()
        exchange.writer.write(_json_response(200, {"ok": True}))
        return exchange.request.keep_alive

    async def _get_faults(self, exchange: _Exchange) -> bool:
        exchange.writer.write(_json_response(200, {"fault": self.fault.as_dict()}))
        return exchange.request.keep_alive

    async def _post_faults(self, exchange: _Exchange) -> bool:
        try:
            self.set_fault(_fault_body(exchange.request.body))
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            exchange.writer.write(_json_response(400, {"error": str(exc)}))
        else:
            exchange.writer.write(_json_response(200, {"fault": self.fault.as_dict()}))
        return exchange.request.keep_alive


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override


def _planned_status(fault: Fault) -> int:
    if fault.reset or fault.noresponse:
        return 0
    if fault.status is not None:
        return fault.status
    if fault.error is not None and fault.error_after is None:
        return _kind(fault.error).status
    return 200


def _kind(name: str) -> ErrorKind:
    kind = ERROR_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown error kind {name!r} (known: {', '.join(ERROR_KINDS)})")
    return kind


def _error_response(fmt: WireFormat, fault: Fault, status: int) -> bytes:
    kind = _kind(_error_kind(fault))
    extra = b""
    if fault.retry_after is not None:
        extra += b"retry-after: %s\r\n" % fault.retry_after.encode()
    if fault.retry_after_ms is not None:
        extra += b"retry-after-ms: %d\r\n" % fault.retry_after_ms
    return _json_response(status, fmt.error_body(kind), extra)


def _fault_body(body: bytes) -> FaultSpec:
    text = body.decode().strip()
    if not text:
        return None
    if text.startswith(("{", '"')):
        decoded = msgspec.json.decode(text)
        if not isinstance(decoded, str | dict):
            raise ValueError("a fault is a JSON object or a 'key=value+key=value' string")
        return decoded
    return text


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, so the client sees the connection die before any header."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65_536):
        pass


async def _hold(exchange: _Exchange) -> None:
    """Send what was written, then keep the socket open until the client gives up."""
    await exchange.writer.drain()
    await _until_eof(exchange.reader)


# --- running it ----------------------------------------------------------------


def listening_line(name: str, url: str) -> str:
    return f"mock-provider {name} listening on {url}"


async def serve(mock: MockProvider) -> None:
    """Serve until SIGINT/SIGTERM, announcing the bound URL on stdout (for a parent)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with mock:
        print(listening_line(mock.name, mock.url), flush=True)
        await stop.wait()


class MockProviderProcess:
    """``llmrelay mock-provider`` as a child process (a separate core for the benchmark).

    Use as ``with MockProviderProcess(name="mock-a") as proc:`` (or ``async with``);
    ``proc.url`` is ready when the block starts.
    """

    def __init__(
        self,
        *,
        name: str = "mock",
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = DEFAULT_TOKENS,
        ttft_ms: float = 0.0,
        token_delay_ms: float = 0.0,
        fault: str | None = None,
        startup_timeout_s: float = 15.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.args = [
            *("--name", name, "--host", host, "--port", str(port), "--tokens", str(tokens)),
            *("--ttft-ms", str(ttft_ms), "--token-delay-ms", str(token_delay_ms)),
            *(("--fault", fault) if fault else ()),
        ]
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [*llmrelay_command(), "mock-provider", *self.args]

    def start(self) -> MockProviderProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, text=True, env=env)
        line = self._read_line()
        prefix = listening_line(self.name, "")
        if not line.startswith(prefix):
            self.close()
            raise RuntimeError(f"mock-provider did not start: {line!r}")
        self.port = int(line.strip().rsplit(":", 1)[1])
        return self

    def _read_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.startup_timeout_s)
        return self.process.stdout.readline() if ready else ""

    def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/stats").json()
        return result

    def set_fault(self, spec: str | Mapping[str, Any] | None) -> None:
        body = msgspec.json.encode(spec if spec is not None else {})
        httpx.post(f"{self.url}/control/faults", content=body).raise_for_status()

    def __enter__(self) -> MockProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MockProviderProcess:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.close)
