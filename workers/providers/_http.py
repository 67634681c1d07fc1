"""The streamed POST every adapter makes, with httpx errors translated at the edge.

``open_stream`` sends the request and hands back an ``UpstreamBody`` once the
response headers are in; an error status is read (it is small) and raised as a
``ProviderError`` before the adapter sees anything. ``UpstreamBody`` yields
parsed items (SSE events or NDJSON lines) as bytes arrive, never buffering the
whole answer, and turns a broken connection into ``StreamInterrupted``.

When the adapter has its final item it stops reading at once; on the way out
the rest of the body (normally just a ``[DONE]`` or the chunked terminator,
already in the socket buffer) is drained for a moment so the connection goes
back to the pool for reuse instead of being torn down.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol, TypeVar

import anyio
import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import RelayError, StreamInterrupted, UpstreamRejected
from broker._protocol import Job
from workers._transport import LeanClient, LeanResponse
from workers.providers._base import Finish, ReasoningDelta, StreamItem, TextDelta
from workers.providers._errors_map import error_for_status, error_for_transport

T = TypeVar("T")

Response = httpx.Response | LeanResponse

# Bounds on the post-finish drain: long enough for bytes already on the way,
# short enough that a server which never ends its body costs almost nothing.
DRAIN_S = 0.05
_DRAIN_MAX_BYTES = 65_536
_ERROR_BODY_MAX_BYTES = 65_536


class Parser(Protocol[T]):
    def feed(self, chunk: bytes) -> list[T]: ...

    def close(self) -> list[T]: ...


class UpstreamBody:
    """A streamed response body, read chunk by chunk from one byte iterator.

    The adapter sets ``complete`` just before it yields its ``Finish``: from then
    on, however the caller stops iterating, the rest of the body is drained for
    reuse. Without it (an abandoned or failed answer) the connection is closed,
    which is also how an upstream generation is cancelled.
    """

    def __init__(self, response: Response) -> None:
        self.response = response
        self.complete = False
        # A lean response's body is read by its own method, not through two async
        # generators (each layer is CPU per chunk: bench/chunk_path.py).
        self._next = response.next_bytes if isinstance(response, LeanResponse) else None
        self._chunks = response.aiter_bytes() if self._next is None else None

    async def next_chunk(self) -> bytes | None:
        """The next bytes, or None at the end of the body."""
        try:
            if self._next is not None:
                return await self._next()
            assert self._chunks is not None
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except httpx.RequestError as exc:  # transport errors, and a body that fails to decode
            raise error_for_transport(exc, headers_received=True) from exc

    async def drain(self) -> None:
        """Read what is left (briefly, boundedly) so the connection can be reused.

        Shielded: it also runs when the caller was cancelled after the answer was
        complete, and then must not be cut short by that cancellation.
        """
        seen = 0
        with anyio.move_on_after(DRAIN_S, shield=True), suppress(StreamInterrupted):
            while seen <= _DRAIN_MAX_BYTES:
                chunk = await self.next_chunk()
                if chunk is None:
                    return
                seen += len(chunk)


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, url: str, *, headers: Mapping[str, str], body: bytes
) -> AsyncIterator[UpstreamBody]:
    """POST ``body`` and yield the streamed body of a successful answer (past httpx's
    client layer when the client is a worker's ``LeanClient``)."""
    response = await _send(client, url, headers, body)
    try:
        if not response.is_success:  # a redirect means a wrong base_url: not an answer
            raise error_for_status(
                response.status_code, response.headers, await _small_body(response)
            )
        upstream = UpstreamBody(response)
        try:
            yield upstream
        finally:
            if upstream.complete:
                await upstream.drain()
    finally:
        await response.aclose()


async def _send(
    client: httpx.AsyncClient, url: str, headers: Mapping[str, str], body: bytes
) -> Response:
    try:
        if isinstance(client, LeanClient):
            return await client.post_stream(url, headers, body)
        request = client.build_request("POST", url, headers=headers, content=body)
        return await client.send(request, stream=True)
    except httpx.TransportError as exc:
        raise error_for_transport(exc, headers_received=False) from exc


async def _small_body(response: Response) -> bytes:
    """Up to 64 KiB of an error answer; a broken error body is just shorter."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size >= _ERROR_BODY_MAX_BYTES:
                break
    except httpx.TransportError:
        pass
    return b"".join(parts)[:_ERROR_BODY_MAX_BYTES]


def join_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def static_headers(pool: PoolConfig, auth: Mapping[str, str]) -> dict[str, str]:
    """Headers every request of a pool carries; the pool's own headers win."""
    own = {name: value.reveal() for name, value in pool.headers.items()}
    return {"content-type": "application/json", **auth, **own}


def job_headers(static: Mapping[str, str], job: Job) -> dict[str, str]:
    """The pool's headers plus the job's trace context, passed through to the provider."""
    if job.traceparent:
        return {**static, "traceparent": job.traceparent}
    return dict(static)


def job_params(job: Job, names: Mapping[str, str]) -> dict[str, Any]:
    """Sampling parameters set on the job, renamed to the provider's keys (unset ones omitted)."""
    values = {name: getattr(job, name) for name in names}
    return {wire: values[name] for name, wire in names.items() if values[name] is not None}


def with_provider_options(body: dict[str, Any], job: Job, kind: str) -> dict[str, Any]:
    """``body`` plus the job's ``provider_options[kind]``; a key llmrelay sets itself is
    refused (``UpstreamRejected``), never overridden."""
    extra = job.provider_options.get(kind)
    if not extra:
        return body
    taken = sorted(set(extra) & set(body))
    if taken:
        raise UpstreamRejected(
            f"provider_options.{kind}.{taken[0]}: llmrelay sets this field itself; "
            "use the job's own field"
        )
    return {**body, **extra}


async def answer_items(
    body: UpstreamBody, parser: Parser[T], to_items: Callable[[T], Iterable[StreamItem]]
) -> AsyncGenerator[StreamItem, None]:
    """The stream items of ``body`` up to its ``Finish``: each parsed event (an SSE event,
    an NDJSON line, an event-stream frame) becomes ``to_items(event)``. At the ``Finish``
    the body is marked complete (drained for reuse on the way out) and reading stops;
    a body that ends first is the adapter's to judge (``body.complete`` is False).

    The text of the events that arrived in one read is one ``TextDelta`` (and their
    reasoning one ``ReasoningDelta``): a provider that sends many tokens at once costs
    one reply message, not one per token, and no text ever waits for a later read. A
    text directly before the ``Finish`` of the same read is marked ``last``. An event
    that fails (a provider's error event) fails after the items before it in its read."""
    while True:
        chunk = await body.next_chunk()
        events = parser.close() if chunk is None else parser.feed(chunk)
        items, failure = _items_of(events, to_items)
        for item in with_last(coalesced(items)):
            body.complete = isinstance(item, Finish)
            yield item
            if body.complete:
                return
        if failure is not None:
            raise failure
        if chunk is None:
            return


def _items_of(
    events: list[T], to_items: Callable[[T], Iterable[StreamItem]]
) -> tuple[list[StreamItem], RelayError | None]:
    """The items of one read's events, up to the first event that fails (and its error)."""
    items: list[StreamItem] = []
    for raw in events:
        try:
            items.extend(to_items(raw))
        except RelayError as exc:
            return items, exc
    return items, None


def coalesced(items: list[StreamItem]) -> list[StreamItem]:
    """``items`` with each run of text deltas (without logprobs) joined into one (its
    ``tokens`` the run's), and each run of reasoning deltas; the order of everything
    else is kept. (Joined once per run: a read may hold thousands of events.)"""
    if len(items) < 2:
        return items
    out: list[StreamItem] = []
    run: list[TextDelta | ReasoningDelta] = []
    for item in items:
        if run and not _joins(run[-1], item):
            out.append(_joined(run))
            run = []
        if _joinable(item):
            run.append(item)  # type: ignore[arg-type]
        else:
            out.append(item)
    if run:
        out.append(_joined(run))
    return out


def with_last(items: list[StreamItem]) -> list[StreamItem]:
    """``items`` (of one read) with the text delta right before a ``Finish`` marked ``last``."""
    if len(items) < 2:  # one token per read, mostly: no text before a finish
        return items
    for i, item in enumerate(items):
        if type(item) is Finish:
            before = items[i - 1] if i else None
            if type(before) is TextDelta:
                items[i - 1] = msgspec.structs.replace(before, last=True)
            break  # nothing after the finish is read
    return items


def _joinable(item: StreamItem) -> bool:
    return type(item) is ReasoningDelta or (type(item) is TextDelta and not item.logprobs)


def _joins(last: StreamItem, item: StreamItem) -> bool:
    return _joinable(item) and type(item) is type(last)


def _joined(run: list[TextDelta | ReasoningDelta]) -> StreamItem:
    if len(run) == 1:
        return run[0]
    text = "".join(item.text for item in run)
    if type(run[0]) is ReasoningDelta:
        return ReasoningDelta(text)
    return TextDelta(text, tokens=sum(item.tokens for item in run if type(item) is TextDelta))


def arguments_object(text: str) -> dict[str, Any]:
    """A tool call's arguments (OpenAI's JSON text) as the object that Anthropic's
    ``tool_use.input``, Bedrock's ``toolUse.input``, Gemini's ``args`` and Ollama's
    ``arguments`` are; a value that is not an object is wrapped as ``{"value": ...}``."""
    try:
        value = msgspec.json.decode(text) if text else {}
    except msgspec.DecodeError as exc:
        raise UpstreamRejected(f"tool call arguments are not JSON: {text[:80]!r}") from exc
    return value if isinstance(value, dict) else {"value": value}


def optional(item: StreamItem | None) -> tuple[StreamItem, ...]:
    """An event handler's one item, or none, as ``answer_items`` takes them."""
    return () if item is None else (item,)
