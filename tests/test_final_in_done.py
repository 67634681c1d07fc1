"""An answer's last text inside its ``done`` (issue 16: fewer messages per job).

When the provider sends the last text together with the finish (one read), a
worker sends that text inside ``done`` (``Done.final``), so a short answer costs
one reply message instead of two. Only a job whose client says it reads that
field (``final_in_done``, set by llmrelay's own clients) gets it: a raw NATS
client gets every text as a chunk. Text never waits for a later read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from broker import Chunk, Done
from broker._errors import UpstreamRejected
from broker._protocol import Event, Timings, Usage, decode_event, decode_events, encode, now_ms
from broker._subjects import REPLIES_STREAM
from devstack import MockProvider, expected_answer
from tests._harness import CLIENT_INBOX, StartStack, upstream
from workers.providers._base import Finish, StreamItem, TextDelta
from workers.providers._http import UpstreamBody, answer_items
from workers.providers._sse import SSEEvent, SSEParser


async def stored(nc: NATS, reply_to: str) -> list[bytes]:
    """Every message ``LLM_REPLIES`` holds on ``reply_to``, as published."""
    sub = await nc.jetstream().subscribe(
        reply_to, stream=REPLIES_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    out: list[bytes] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            out.append(msg.data)
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()


async def test_an_answer_sent_at_once_is_one_reply_message_and_arrives_whole(
    relay_stack: StartStack, nc: NATS
) -> None:
    """The fake provider writes the 8 tokens and the finish at once: the client gets
    the whole text as chunk 0 and then done, from one message on the wire."""
    mock = MockProvider(name="p", tokens=8)
    async with relay_stack({"a": upstream(mock)}, {"chat": [("a", "m")]}) as s:
        handle = await s.relay.submit("hi", route="chat", timeout_s=10)
        with anyio.fail_after(10):
            seen = [event async for event in handle.events()]
        messages = await stored(nc, handle.job.reply_to)
    chunks = [e for e in seen if isinstance(e, Chunk)]
    assert "".join(c.delta for c in chunks) == expected_answer("p", 8)
    assert [c.seq for c in chunks] == [0] and (chunks[0].pool, chunks[0].model) == ("a", "m")
    assert isinstance(seen[-1], Done) and seen[-1].chunks == 1
    assert len(messages) == 1, "chunk and done went out as two messages"
    done = decode_event(messages[0])
    assert isinstance(done, Done) and isinstance(done.final, Chunk)
    assert done.final.delta == expected_answer("p", 8) and done.final.job_seq == done.job_seq


async def test_a_raw_client_that_does_not_ask_for_it_gets_every_text_as_a_chunk(
    relay_stack: StartStack, client_url: str
) -> None:
    """A client of the wire format from before (no ``final_in_done``) loses nothing:
    its done carries no text, and the chunks hold the whole answer."""
    mock = MockProvider(name="p", tokens=8)
    job = {"id": "raw1", "route": "chat", "messages": [{"role": "user", "content": "hi"}],
           "reply_to": "llm.reply.raw1", "deadline_ms": now_ms() + 10_000}  # fmt: skip
    async with relay_stack({"a": upstream(mock)}, {"chat": [("a", "m")]}, relay=None):
        conn = await nats.connect(client_url, inbox_prefix=CLIENT_INBOX)
        try:
            sub = await conn.subscribe("llm.reply.raw1")
            await conn.jetstream().publish("llm.jobs.chat", msgspec.json.encode(job))
            events: list[Event] = []
            raw: list[bytes] = []
            with anyio.fail_after(10):
                while not events or not isinstance(events[-1], Done):
                    raw.append((await sub.next_msg(timeout=10)).data)
                    events.append(decode_event(raw[-1]))
        finally:
            await conn.close()
    done = events[-1]
    assert isinstance(done, Done) and done.final is msgspec.UNSET
    assert b'"final"' not in raw[-1]  # on the wire, not only as decoded
    text = "".join(e.delta for e in events if isinstance(e, Chunk))
    assert text == expected_answer("p", 8)


def test_a_done_with_its_final_chunk_reads_as_the_chunk_then_the_done() -> None:
    chunk = Chunk(seq=3, attempt=7, delta="end.", job_seq=12)
    done = Done(attempt=7, finish_reason="stop", usage=Usage(), pool="a", model="m",
                timings=Timings(queued_ms=0, total_ms=1), job_seq=12, chunks=4,
                final=chunk)  # fmt: skip
    first, second = decode_events(encode(done))
    assert first == chunk
    assert isinstance(second, Done) and second.final is msgspec.UNSET and second.chunks == 4
    assert decode_events(encode(chunk)) == (chunk,)


def _sse(*datas: str) -> bytes:
    return b"".join(b"data: %s\n\n" % d.encode() for d in datas)


async def _items(reads: list[bytes]) -> list[StreamItem]:
    """The items of a body that arrives in ``reads``, one event per ``data:`` line
    (``end`` is the finish)."""

    async def body() -> AsyncIterator[bytes]:
        for read in reads:
            yield read

    def to_items(event: SSEEvent) -> list[StreamItem]:
        return [Finish("stop")] if event.data == "end" else [TextDelta(event.data)]

    upstream_body = UpstreamBody(httpx.Response(200, content=body()))
    return [item async for item in answer_items(upstream_body, SSEParser(), to_items)]


async def test_only_text_that_came_with_the_finish_is_marked_last() -> None:
    """Text read before the finish's read goes out at once (not marked): nothing
    ever waits for a later read to be sent."""
    assert await _items([_sse("a", "b", "end")]) == [
        TextDelta("ab", tokens=2, last=True), Finish("stop")]  # fmt: skip
    assert await _items([_sse("a"), _sse("b"), _sse("end")]) == [
        TextDelta("a"), TextDelta("b"), Finish("stop")]  # fmt: skip
    assert await _items([_sse("a"), _sse("b", "end")]) == [
        TextDelta("a"), TextDelta("b", last=True), Finish("stop")]  # fmt: skip


async def test_text_read_together_with_a_provider_error_is_sent_before_the_error() -> None:
    """A provider's error event in the same read as text: the text still goes out
    first (the caller keeps it, and a failover continues after it). Before, the read's
    text was dropped with the error, and the failure looked like one before any text."""

    async def body() -> AsyncIterator[bytes]:
        yield _sse("a", "b", "boom")

    def to_items(event: SSEEvent) -> list[StreamItem]:
        if event.data == "boom":
            raise UpstreamRejected("the provider said no")
        return [TextDelta(event.data)]

    got: list[StreamItem] = []
    upstream_body = UpstreamBody(httpx.Response(200, content=body()))
    with pytest.raises(UpstreamRejected):
        async for item in answer_items(upstream_body, SSEParser(), to_items):
            got.append(item)
    assert got == [TextDelta("ab", tokens=2)]
