"""One HTTP request's exchange with the job answering it: whole, or streamed as SSE.

A request becomes one job; ``Exchange`` reads the job's events and records the
outcome. ``Exchange.complete`` holds a non-streamed answer whole, so any reset
is invisible. ``EventStreamResponse`` streams under the reset policy
(``gateway._fold``): it sends its HTTP headers only with its first text (or a
keep-alive after ``gateway.keepalive_s`` of silence), so an error before any text still
gets its status code. An error after that is sent as an SSE ``data: {"error":
...}`` event, which the OpenAI SDKs raise as ``APIError``, and the stream ends
without ``data: [DONE]``: a stream is never closed as if complete when it was not.

In a stream every chunk carries the upstream model named by the first chunk of
the answering attempt (a chunk sent before any text, e.g. a keep-alive, carries
the route name); a whole answer's ``model`` is ``done.model``.

**Disconnects.** When the client goes away (``http.disconnect``) while its
request is open, the job is cancelled (``llm.cancel.<id>``); the worker aborts
the provider call and answers ``cancelled``.

**APIs.** What an exchange writes is its ``Writer``'s (``gateway._dialect``):
OpenAI's chat completion objects and chunks, or Anthropic's message and named
events; an error before any text is the writer's error response, one after it
the writer's error event. The policy above is the same for every API.

**Reasoning.** The reasoning text (``Chunk.reasoning``) of the attempts whose
text stands is kept beside the answer and, in a stream, written as it arrives
(a writer without a place for it writes nothing). It is not held back; once
some was sent, a reset that voids it ends the stream with ``stream_interrupted``,
as a reset after sent text does.

An exchange gets what it needs from the gateway in an ``ExchangeContext``
(settings and metrics), not the gateway itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from broker._client import JobHandle
from broker._config import GatewaySettings
from broker._errors import BrokerUnavailable, DeadlineExceeded, RelayError, StreamReset
from broker._protocol import Chunk, Done, Error, Event, Notice
from gateway._apierror import ApiError, api_error, error_from_event
from gateway._dialect import Reply, Writer
from gateway._fold import ReplyFold
from gateway._metrics import GatewayMetrics
from gateway._responses import json_response

log = logging.getLogger("llmrelay.gateway")

# A stream still being written this long past its job's deadline is cut: the
# worker has stopped by then, so what is left is a client too slow to read its
# answer (one that reads nothing at all is cut sooner, by gateway.write_timeout_s).
SLOW_READER_GRACE_S = 1.0
# The ASGI scope extension, set by the gateway's server (gateway/_serve.py), that says
# whether the client has gone: a callable with no arguments.
DISCONNECTED = "llmrelay.disconnected"


@dataclass(frozen=True, slots=True)
class ExchangeContext:
    """What every exchange of one gateway shares."""

    settings: GatewaySettings
    metrics: GatewayMetrics


class Exchange:
    """One HTTP request and the job answering it; ``writer`` writes its answer."""

    def __init__(
        self,
        ctx: ExchangeContext,
        handle: JobHandle,
        writer: Writer,
        *,
        label: str,
        started: float,
    ) -> None:
        self.ctx = ctx
        self.handle = handle
        self.writer = writer
        self.label = label
        self.started = started
        self.answered = False  # the worker sent done/error: nothing to cancel
        self.headers = {"x-request-id": handle.id}

    async def events(self) -> AsyncIterator[Event]:
        """The job's events; a missed deadline or a lost connection ends with an ``Error``."""
        try:
            async for event in self.handle.events():
                self.answered = isinstance(event, Done | Error)
                yield event
        except (DeadlineExceeded, BrokerUnavailable) as exc:
            yield _broken(exc)

    async def next_event(self, wake_at: float) -> Event | None:
        """The job's next event, or None at ``wake_at`` (``time.monotonic()``) if none came;
        like ``events()``, a missed deadline or a lost connection is an ``Error``."""
        try:
            event = await self.handle.next_event(time.time() + wake_at - time.monotonic())
        except (DeadlineExceeded, BrokerUnavailable) as exc:
            return _broken(exc)
        if event is None and self.handle.finished:
            return Error(code="internal", message="the reply stream ended without an answer")
        self.answered = self.answered or isinstance(event, Done | Error)
        return event

    async def complete(self, receive: Receive) -> Response:
        """A non-streamed answer: held whole, so any reset is invisible."""
        fold = ReplyFold(math.inf)
        outcome: Done | Error | None = None
        try:
            with self.ctx.metrics.in_flight.track_inprogress():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                    outcome = await self._collect(fold)
                    tg.cancel_scope.cancel()
        finally:
            await self.finish(_outcome_label(outcome), stream=False)
        if isinstance(outcome, Done):
            headers = {**self.headers, "x-llmrelay-pool": outcome.pool}
            reply = Reply(fold.finish(), fold.reasoning_text, fold.tool_calls, fold.logprobs)
            try:
                body = self.writer.whole(self.handle.id, reply, outcome)
            except RelayError as exc:  # an answer this API cannot express (tool arguments)
                err = api_error(exc.code, exc.message, headers=self.headers)
                return self.writer.error_response(err)
            return json_response(body, headers=headers)
        if isinstance(outcome, Error):
            return self.writer.error_response(self.error(outcome))
        return Response(status_code=499)  # the client is gone; nobody reads this

    async def _collect(self, fold: ReplyFold) -> Done | Error:
        async for event in self.events():
            match event:
                case Chunk():
                    fold.chunk(event, 0.0)
                case Notice():
                    fold.notice(event)
                case Done() | Error():
                    fold.add(event)  # only the current attempt's ends the answer
            if fold.done is not None:
                return fold.done
            if fold.error is not None:
                return fold.error
        raise RelayError("the reply stream ended without done or error")  # pragma: no cover

    def error(self, event: Error) -> ApiError:
        err = error_from_event(event, retry_after_s=self.ctx.settings.retry_after_s)
        return msgspec.structs.replace(err, headers={**err.headers, **self.headers})

    async def finish(self, outcome: str, *, stream: bool) -> None:
        """Record the outcome; cancel the job if it is still running."""
        metrics = self.ctx.metrics
        if not self.answered:
            # Best effort: a job nobody cancels still ends at its deadline.
            with anyio.CancelScope(shield=True), contextlib.suppress(BrokerUnavailable):
                await self.handle.cancel()
            metrics.cancelled(self.label, outcome)
            log.info("request %s: %s; job cancelled", self.handle.id, outcome)
        metrics.finished(self.label, stream, outcome, time.monotonic() - self.started)


def _broken(exc: DeadlineExceeded | BrokerUnavailable) -> Error:
    """The error event of an answer that ended without one: its deadline passed, or the
    connection to NATS was lost."""
    if isinstance(exc, DeadlineExceeded):
        return Error(code="deadline_exceeded", message=exc.message)
    return Error(code="service_unavailable", message=f"lost the NATS connection: {exc.message}")


def _outcome_label(outcome: Done | Error | None) -> str:
    if outcome is None:
        return "disconnected"
    return "done" if isinstance(outcome, Done) else outcome.code


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the client disconnects (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class EventStreamResponse(Response):
    """A streamed answer in its writer's SSE, under the reset policy (see module docstring).

    Headers go out with the first text (or a keep-alive): an error before that is
    a plain HTTP error; after it, an SSE error event that ends the stream.
    """

    def __init__(self, exchange: Exchange) -> None:
        super().__init__(status_code=200)
        self.x = exchange
        self.metrics = exchange.ctx.metrics
        self.fold = ReplyFold(exchange.ctx.settings.stream_holdback_ms / 1000)
        self.sse = exchange.writer.stream(exchange.handle.id)
        self.outcome = "disconnected"
        self._scope: Scope = {"type": "http"}
        self._send: Send | None = None
        self._started = False
        self._disconnected = False
        self._gone: Callable[[], bool] = _never
        self._text_sent = False
        self._last_write = time.monotonic()
        # With nothing to send for this long, the stream sends its headers (if not
        # yet sent) and an SSE comment, so that proxies and clients do not time out.
        self._keepalive_s = exchange.ctx.settings.keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope, self._send = scope, send
        self._gone = scope.get("extensions", {}).get(DISCONNECTED, _never)
        # One cancel scope and one task per request: the scope ends the stream at its cut
        # time or when the watcher sees the client go (per-event scopes, a task group and a
        # memory stream cost a third of the gateway's CPU per request, bench/RESULTS.md).
        try:
            with (
                self.metrics.in_flight.track_inprogress(),
                anyio.move_on_after(self._cut_in_s()) as scope_,
            ):
                watcher = asyncio.ensure_future(self._watch_disconnect(receive, scope_))
                try:
                    self.outcome = await self._relay()
                finally:
                    watcher.cancel()
            if scope_.cancelled_caught and not self._disconnected:
                self.outcome = "deadline_exceeded"  # a reader too slow for the deadline
        finally:
            await self.x.handle.close()
            await self.x.finish(self.outcome, stream=True)

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        """Cancel ``scope`` when the client disconnects (the request body was already read)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self._disconnected = True
        scope.cancel()

    def _cut_in_s(self) -> float:
        """Seconds until a stream still being written is cut (see ``SLOW_READER_GRACE_S``)."""
        return self.x.handle.job.deadline_ms / 1000 - time.time() + SLOW_READER_GRACE_S

    async def _relay(self) -> str:
        """Relay events until the answer ends; return the outcome label."""
        try:
            while True:
                match await self._next():
                    case Chunk() as chunk:
                        await self._chunk(chunk)
                    case Notice() as notice:
                        self.fold.notice(notice)
                    case Done() as done if self.fold.accepts(done):
                        self.fold.add(done)  # a newer attempt's empty answer voids sent text
                        if self.fold.done is not None:
                            await self._done(done)
                            return "disconnected" if self._gone() else "done"
                    case Error() as error if self.fold.accepts(error):
                        await self._fail(self.x.error(error))
                        return error.code
                    case Done() | Error():
                        pass  # a superseded attempt's end: the answer goes on
                    case _:
                        await self._tick()
                if self._gone():
                    return "disconnected"
                # The fold's own verdict: a resume it cannot follow, a hole in the replies.
                if self.fold.error is not None:
                    await self._fail(self.x.error(self.fold.error))
                    return self.fold.error.code
        except StreamReset as exc:
            self.metrics.reset(self.x.label, "aborted")
            await self._fail(api_error(exc.code, exc.message))
            return exc.code

    async def _next(self) -> Event | None:
        """The next event, or None when held text is due or a keep-alive is."""
        wake_at = self._last_write + self._keepalive_s
        due = self.fold.due_at()
        if due is not None:
            wake_at = min(wake_at, due)
        return await self.x.next_event(wake_at)

    async def _chunk(self, chunk: Chunk) -> None:
        if chunk.model is not None and chunk.attempt >= self.fold.attempt:
            self.sse.model = chunk.model  # who answers, from its first chunk
        text = self.fold.chunk(chunk, time.monotonic())
        await self._reasoning(self.fold.take_reasoning())
        await self._text(text)

    async def _reasoning(self, text: str) -> None:
        data = self.sse.reasoning(text) if text else b""
        if data:
            self.fold.reasoning_sent = True
            await self._write(data)

    async def _tick(self) -> None:
        now = time.monotonic()
        text = self.fold.flush(now)
        if text:
            await self._text(text)
        elif now - self._last_write >= self._keepalive_s:
            await self._write(b": keep-alive\n\n")

    async def _text(self, text: str) -> None:
        if not text:
            return
        if not self._text_sent:
            self._text_sent = True
            self.metrics.first_text(self.x.label, time.monotonic() - self.x.started)
        await self._write(self.sse.text(text, self.fold.take_logprobs()))

    async def _done(self, done: Done) -> None:
        if self.fold.resets:
            self.metrics.reset(self.x.label, "hidden")
        text = self.fold.finish()
        head = self.sse.text(text, self.fold.take_logprobs()) if text else b""
        if self.fold.tool_fragments:  # held until now: a restart leaves no half call
            head += self.sse.tool_calls(self.fold.tool_calls)
        await self._write(head + self.sse.end(done), more=False)

    async def _fail(self, err: ApiError) -> None:
        if not self._started:
            # Nothing sent yet: a plain HTTP error with its status code.
            assert self._send is not None
            await self.x.writer.error_response(err)(self._scope, _no_receive, self._send)
            return
        await self._write(self.x.writer.error_event(err), more=False)

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


def _never() -> bool:
    return False


async def _no_receive() -> AsgiMessage:
    raise RuntimeError("a response does not read the request")  # pragma: no cover
