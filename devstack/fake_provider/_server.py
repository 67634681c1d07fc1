"""The fake provider's server: one chat request in, one planned (mis)behaviour out.

``MockProvider`` serves from the current event loop (tests); each connection is
a task that reads requests with keep-alive, sends chat paths to their
``WireFormat`` and everything else to the control routes (``/stats``,
``/healthz``, ``/control/reset``, ``/control/faults``). An answer is planned
in full (``Plan``) before the first byte, then written in named steps: the
opening, the tokens, and an ending chosen by the fault in force.

A request with an assistant prefill is planned as the rest of the answer
(``_prefill``): the whole answer keeps its length, the prefill's tokens are
skipped, and ``max_tokens`` limits the tokens this answer adds. A refused
prefill (``noprefill``, or the provider's own rule) is a 400 that wins over
every fault but ``reset`` and ``noresponse``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import unquote

import msgspec

from devstack.fake_provider._answer import (
    DEFAULT_TOKENS,
    continuation,
    expected_answer,
    prefilled_tokens,
)
from devstack.fake_provider._anthropic import AnthropicFormat
from devstack.fake_provider._azure import AZURE_PREFIX, azure_refusal
from devstack.fake_provider._bedrock import BEDROCK_PREFIX, BedrockFormat, bedrock_refusal
from devstack.fake_provider._embeddings import EMBED_PATHS, OPENAI_EMBED
from devstack.fake_provider._faults import (
    ERROR_KINDS,
    Fault,
    FaultSpec,
    error_kind,
    failure_kind,
    fault_from_body,
    parse_fault,
    planned_status,
    split_model,
)
from devstack.fake_provider._gemini import GEMINI_PREFIX, GeminiFormat, gemini_refusal
from devstack.fake_provider._http import (
    LAST_CHUNK,
    BadRequest,
    HttpRequest,
    abort,
    chunk,
    chunks,
    head,
    json_response,
    read_request,
    until_eof,
)
from devstack.fake_provider._ollama import OllamaFormat
from devstack.fake_provider._openai import OpenAIFormat
from devstack.fake_provider._plan import (
    Plan,
    Prefill,
    WireFormat,
    decode_request,
    estimate_prompt_tokens,
)
from devstack.fake_provider._stats import Stats
from devstack.fake_provider._structured import answer_texts, logged_options

__all__ = ["CHAT_PATHS", "MockProvider"]

_OPENAI, _ANTHROPIC, _OLLAMA = OpenAIFormat(), AnthropicFormat(), OllamaFormat()
_BEDROCK_STREAM, _BEDROCK_JSON = BedrockFormat(stream=True), BedrockFormat(stream=False)
_GEMINI_SSE, _GEMINI_JSON = GeminiFormat(stream=True), GeminiFormat(stream=False)
# Embeddings paths are answered the same way, their vectors being the whole answer.
CHAT_PATHS: dict[bytes, WireFormat] = {
    b"/v1/chat/completions": _OPENAI,
    b"/chat/completions": _OPENAI,
    b"/v1/messages": _ANTHROPIC,
    b"/api/chat": _OLLAMA,
    **EMBED_PATHS,
}
# The formats that answer a request offering tools with a call, and their calls' ids
# (Ollama's calls carry none on the wire).
_TOOL_CALL_IDS: dict[WireFormat, str] = {
    _OPENAI: "call_mock",
    _ANTHROPIC: "toolu_mock",
    _OLLAMA: "ollama_mock",
    _BEDROCK_STREAM: "tooluse_mock",
    _BEDROCK_JSON: "tooluse_mock",
    _GEMINI_SSE: "gemini_mock",
    _GEMINI_JSON: "gemini_mock",
}


class _Exchange(NamedTuple):
    """One request and the connection it came on: what every handler gets."""

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

    def continuation(self, prefill: str, tokens: int | None = None) -> str:
        """The text this mock streams after the assistant prefill ``prefill`` (no max_tokens)."""
        return continuation(self.name, prefill, self.tokens if tokens is None else tokens)

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
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: drop the connection
        except asyncio.CancelledError:
            # Only aclose() cancels these tasks; ending quietly keeps asyncio's
            # stream callback from reporting the cancellation as an error.
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request = await read_request(reader)
        if request is None or isinstance(request, BadRequest):
            return False  # closed, or spoke nonsense: drop the connection
        exchange = _Exchange(reader, writer, request)
        fmt = CHAT_PATHS.get(request.path) if request.method == b"POST" else None
        if fmt is not None:
            return await self._chat(exchange, fmt)
        pattern = match_pattern(request.path) if request.method == b"POST" else None
        if pattern is not None:
            refusal = pattern.refuse(request) if pattern.refuse is not None else None
            if refusal is None:
                return await self._chat(exchange, pattern.fmt, pattern.model_of(request.path))
            writer.write(refusal)
            return request.keep_alive
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            writer.write(json_response(404, {"error": "not found"}))
            return request.keep_alive
        return await handler(exchange)

    # --- chat

    async def _chat(
        self, exchange: _Exchange, fmt: WireFormat, path_model: str | None = None
    ) -> bool:
        try:
            plan = self._plan(exchange.request.body, fmt, path_model)
        except (ValueError, msgspec.DecodeError) as exc:
            kind = ERROR_KINDS["bad_request"]._replace(message=str(exc))
            exchange.writer.write(json_response(400, fmt.error_body(kind)))
            return exchange.request.keep_alive
        request = exchange.request
        target = request.path + b"?" + request.query if request.query else request.path
        self._stats.begin(target.decode(), plan.full_model, plan.status, plan.options)
        if plan.prefilled:
            self._stats.prefill(refused=plan.refusal is not None)
        try:
            return await self._answer(exchange, fmt, plan) and exchange.request.keep_alive
        finally:
            self._stats.end()

    def _plan(self, body: bytes, fmt: WireFormat, path_model: str | None = None) -> Plan:
        request = decode_request(body)
        if path_model is not None:  # the model named by the path wins (Bedrock, Gemini)
            request = msgspec.structs.replace(request, model=path_model)
        base, overrides = split_model(request.model)
        prefill = fmt.prefill(request)
        fault = self._fault_for(request.model, overrides)
        start, refusal = (0, None) if prefill is None else _prefill(fmt, fault, prefill)
        configured = self.tokens if fault.tokens is None else fault.tokens
        number = self._stats.requests + 1
        prefix = _TOOL_CALL_IDS.get(fmt) if prefill is None else None
        call_id = None if prefix is None else f"{prefix}{number}"
        tool, texts = answer_texts(request, self.name, configured, call_id)
        total = configured if texts is None else len(texts)
        remaining = max(total - start, 0)
        limit = fmt.limit(request)
        limited = limit is not None and 0 < limit < remaining
        status = planned_status(fault)
        return Plan(
            name=self.name,
            model=base,
            full_model=request.model,
            fault=fault,
            tokens=limit if limited and limit is not None else remaining,
            length_limited=limited,
            prompt_tokens=estimate_prompt_tokens(request),
            stream=fmt.wants_stream(request),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            status=400 if refusal is not None and status else status,
            request_no=number,
            created=int(time.time()),
            start=start,
            prefilled=prefill is not None,
            refusal=refusal,
            texts=None if texts is None else texts[start:],
            options=logged_options(request),
            tool=tool,
            embed=request if request.input is not None else None,
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
            abort(exchange.writer)
            return False
        if fault.noresponse:
            await until_eof(exchange.reader)
            return False
        if plan.refusal is not None:
            exchange.writer.write(json_response(400, plan.refusal))
            return True
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
        writer.write(head(200, fmt.content_type, None, extra) + chunks(fmt.opening(plan)))
        await self._sleep_ms(plan.fault.ttft_ms, self.ttft_ms)
        held = await self._send_tokens(writer, fmt, plan)
        return await self._end_stream(exchange, fmt, plan, held)

    async def _send_tokens(
        self, writer: asyncio.StreamWriter, fmt: WireFormat, plan: Plan
    ) -> bytes:
        """Write the tokens one by one, ``token_delay_ms`` apart; without a delay return
        them all for one write with the stream's end, as a fast provider sends them."""
        events = fmt.token_events(plan)[: plan.ending[1]]
        if plan.fault.malformed is not None and 0 < plan.fault.malformed <= len(events):
            events.insert(plan.fault.malformed - 1, fmt.garbage())
        delay_ms = _pick(plan.fault.token_delay_ms, self.token_delay_ms)
        if not delay_ms:
            return chunks(events)
        for i, event in enumerate(events):
            if i:
                await writer.drain()
                await asyncio.sleep(delay_ms / 1000.0)
            writer.write(chunk(event))
        return b""

    async def _end_stream(
        self, exchange: _Exchange, fmt: WireFormat, plan: Plan, held: bytes
    ) -> bool:
        ending, _ = plan.ending
        writer = exchange.writer
        if ending == "normal" and not plan.fault.nodone:  # the tokens and the end in one write
            writer.write(held + chunks(fmt.closing(plan) + fmt.terminator(plan)) + LAST_CHUNK)
            return True
        writer.write(held)  # (asyncio writes nothing for b"")
        if ending == "cut":
            await writer.drain()
            return False
        if ending == "stall":
            await _hold(exchange)
            return False
        if ending == "error":
            writer.write(chunk(fmt.stream_error(error_kind(plan.fault.error or "overloaded"))))
            writer.write(LAST_CHUNK)
            return True
        writer.write(chunks(fmt.closing(plan)))  # nodone: no terminator, and held open
        await _hold(exchange)
        return False

    async def _whole(self, exchange: _Exchange, fmt: WireFormat, plan: Plan) -> bool:
        delay_ms = _pick(plan.fault.token_delay_ms, self.token_delay_ms) * max(plan.tokens - 1, 0)
        await self._sleep_ms(plan.fault.ttft_ms, self.ttft_ms, delay_ms)
        ending, _ = plan.ending
        if ending == "error":
            exchange.writer.write(_error_response(fmt, plan.fault, 500))
            return True
        response = json_response(200, fmt.full(plan))
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
        exchange.writer.write(json_response(200, self.stats()))
        return exchange.request.keep_alive

    async def _get_health(self, exchange: _Exchange) -> bool:
        exchange.writer.write(json_response(200, {"status": "ok", "name": self.name}))
        return exchange.request.keep_alive

    async def _post_reset(self, exchange: _Exchange) -> bool:
        self.reset_stats()
        exchange.writer.write(json_response(200, {"ok": True}))
        return exchange.request.keep_alive

    async def _get_faults(self, exchange: _Exchange) -> bool:
        exchange.writer.write(json_response(200, {"fault": self.fault.as_dict()}))
        return exchange.request.keep_alive

    async def _post_faults(self, exchange: _Exchange) -> bool:
        try:
            self.set_fault(fault_from_body(exchange.request.body))
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            exchange.writer.write(json_response(400, {"error": str(exc)}))
        else:
            exchange.writer.write(json_response(200, {"fault": self.fault.as_dict()}))
        return exchange.request.keep_alive


class PathPattern(NamedTuple):
    """A chat path with a variable part: ``<prefix><name><suffix>``.

    ``model_from_path``: the variable part is the model (URL-decoded), as Bedrock's
    and Gemini's paths name it; else the body's ``model`` is (Azure's deployment).
    ``refuse``: what the provider answers a request it would not take (None: takes it).
    """

    prefix: bytes
    suffix: bytes
    fmt: WireFormat
    model_from_path: bool = False
    refuse: Callable[[HttpRequest], bytes | None] | None = None

    def model_of(self, path: bytes) -> str | None:
        if not self.model_from_path:
            return None
        return unquote(path[len(self.prefix) : len(path) - len(self.suffix)].decode())


def match_pattern(path: bytes) -> PathPattern | None:
    """The pattern a chat path matches, if any (``PATTERN_PATHS``)."""
    for p in PATTERN_PATHS:
        fits = len(path) > len(p.prefix) + len(p.suffix)
        if fits and path.startswith(p.prefix) and path.endswith(p.suffix):
            return p
    return None


# Chat paths with a variable part; a provider format with a path like that adds one.
PATTERN_PATHS: list[PathPattern] = [
    PathPattern(AZURE_PREFIX, b"/chat/completions", _OPENAI, refuse=azure_refusal),
    PathPattern(AZURE_PREFIX, b"/embeddings", OPENAI_EMBED, refuse=azure_refusal),
    PathPattern(GEMINI_PREFIX, b":streamGenerateContent", _GEMINI_SSE, True, gemini_refusal),
    PathPattern(GEMINI_PREFIX, b":generateContent", _GEMINI_JSON, True, gemini_refusal),
    PathPattern(BEDROCK_PREFIX, b"/converse-stream", _BEDROCK_STREAM, True, bedrock_refusal),
    PathPattern(BEDROCK_PREFIX, b"/converse", _BEDROCK_JSON, True, bedrock_refusal),
]


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override


def _prefill(fmt: WireFormat, fault: Fault, prefill: Prefill) -> tuple[int, Any]:
    """Where the answer starts after ``prefill``, or the 400 body that refuses it."""
    if fault.noprefill:
        return 0, fmt.noprefill_body()
    if prefill.refusal is not None:
        kind = ERROR_KINDS["bad_request"]._replace(message=prefill.refusal)
        return 0, fmt.error_body(kind)
    return prefilled_tokens(prefill.text), None


def _error_response(fmt: WireFormat, fault: Fault, status: int) -> bytes:
    kind = failure_kind(fault)
    extra = b""
    if fault.retry_after is not None:
        extra += b"retry-after: %s\r\n" % fault.retry_after.encode()
    if fault.retry_after_ms is not None:
        extra += b"retry-after-ms: %d\r\n" % fault.retry_after_ms
    return json_response(status, fmt.error_body(kind), extra)


async def _hold(exchange: _Exchange) -> None:
    """Send what was written, then keep the socket open until the client gives up."""
    await exchange.writer.drain()
    await until_eof(exchange.reader)
