"""Replies are core NATS: a client that loses some (a reconnect, a slow consumer)
resumes from ``LLM_REPLIES`` and still gets its exact answer, once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from nats.aio.client import Client as NATS

from broker import Chunk, Config, Done, Notice, RelayClient, Timings, Usage, ensure_topology
from broker._protocol import encode
from broker._replay import queued_message
from broker._server import free_port
from devstack import MockProvider, expected_answer
from tests._builders import make_config
from tests._harness import StartStack, upstream


class CuttableProxy:
    """A TCP proxy in front of the nats-server whose connections a test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    def url(self, url: str) -> str:
        """``url`` (a nats-server URL with credentials) through this proxy."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def cut(self) -> None:
        """Drop every connection now (what a broken network or a killed socket does)."""
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_w}
        try:
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        finally:
            for w in (writer, up_w):
                w.transport.abort()
                self._writers.discard(w)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@contextlib.asynccontextmanager
async def proxied_client(
    client_url: str, cfg: Config
) -> AsyncIterator[tuple[RelayClient, CuttableProxy]]:
    proxy = CuttableProxy(urlsplit(client_url).port or 4222)
    async with proxy, RelayClient(proxy.url(client_url), config=cfg) as relay:
        yield relay, proxy


async def test_a_client_cut_off_mid_answer_resumes_from_llm_replies(
    relay_stack: StartStack, client_url: str
) -> None:
    """Attack: the client's connection drops while the answer streams and stays down
    until the answer (``done`` included) has been published. Before the fix the
    client missed those events and waited for its deadline (``DeadlineExceeded``)."""
    mock = MockProvider(name="p", tokens=20, token_delay_ms=40)
    stack = relay_stack({"a": upstream(mock)}, {"chat": [("a", "m")]}, relay=None)
    async with stack as s, proxied_client(client_url, s.config) as (relay, proxy):
        handle = await relay.submit("story", route="chat", timeout_s=15)
        seen: list[object] = []
        with anyio.fail_after(12):
            async for event in handle.events():
                seen.append(event)
                if len(seen) == 3:  # mid-answer: cut, and stay down past its end
                    proxy.open = False
                    proxy.cut()
                    await anyio.sleep(1.5)
                    proxy.open = True
    chunks = [e for e in seen if isinstance(e, Chunk)]
    assert "".join(c.delta for c in chunks) == expected_answer("p", 20)
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # each once, in order
    assert isinstance(seen[-1], Done)
    assert sum(isinstance(e, Done) for e in seen) == 1
    assert mock.stats()["requests"] == 1


@pytest.mark.parametrize("limit", [1, 3])
async def test_a_slow_consumer_client_resumes_from_llm_replies(
    relay_stack: StartStack, client_url: str, limit: int
) -> None:
    """Attack: the client reads slower than the answer streams and its reply
    subscription holds only ``limit`` messages, so nats-py drops the rest (slow
    consumer). Before the fix the text had gaps, or ``done`` was lost."""
    # Tokens 2 ms apart: each its own read, so its own reply message (tokens sent
    # together would be one message, and nothing would overflow).
    mock = MockProvider(name="p", tokens=40, token_delay_ms=2)
    async with (
        relay_stack({"a": upstream(mock)}, {"chat": [("a", "m")]}, relay=None) as s,
        RelayClient(client_url, config=s.config, reply_buffer_msgs=limit) as relay,
    ):
        handle = await relay.submit("story", route="chat", timeout_s=15)
        seen: list[object] = []
        with anyio.fail_after(12):
            async for event in handle.events():
                seen.append(event)
                await anyio.sleep(0.02)  # a slow reader
        text = "".join(e.delta for e in seen if isinstance(e, Chunk))
    assert text == expected_answer("p", 40)
    assert handle.resumes >= 1, "the attack must have dropped replies"
    seqs = [e.seq for e in seen if isinstance(e, Chunk)]
    assert seqs == list(range(len(seqs)))  # each once, in order
    assert isinstance(seen[-1], Done) and sum(isinstance(e, Done) for e in seen) == 1


async def test_text_after_a_slow_consumer_is_exact(
    relay_stack: StartStack, client_url: str
) -> None:
    mock = MockProvider(name="p", tokens=30)
    async with (
        relay_stack({"a": upstream(mock)}, {"chat": [("a", "m")]}, relay=None) as s,
        RelayClient(client_url, config=s.config, reply_buffer_msgs=1) as relay,
    ):
        handle = await relay.submit("story", route="chat", timeout_s=15)
        await anyio.sleep(0.5)  # the whole answer arrives while nobody reads
        with anyio.fail_after(12):
            text = await handle.text()
    assert text == expected_answer("p", 30)
    assert handle.done is not None


async def test_queued_messages_are_taken_at_once_in_order_and_counted(nc: NATS) -> None:
    """The reply reader's shortcut past nats-py's per-message task (``queued_message``):
    what the subscription holds comes out in order, its pending counts go back to zero,
    and an empty one says so rather than waiting."""
    sub = await nc.subscribe("llm.reply.queued-test")
    assert queued_message(sub) is None
    for i in range(3):
        await nc.publish("llm.reply.queued-test", b"m%d" % i)
    await nc.flush()
    with anyio.fail_after(5):
        while sub.pending_msgs < 3:
            await anyio.sleep(0.01)
    taken = [queued_message(sub) for _ in range(4)]
    assert [m.data if m else None for m in taken] == [b"m0", b"m1", b"m2", None]
    assert (sub.pending_msgs, sub.pending_bytes) == (0, 0)
    await sub.unsubscribe()


async def test_a_continuation_of_text_the_client_never_got_live_is_read_from_llm_replies(
    nc: NATS, client_url: str
) -> None:
    """The first attempt's chunks reached ``LLM_REPLIES`` but not the caller (they went
    with a NATS node, here: they were sent before it subscribed); the continuing attempt
    says it continues after them, so the caller reads them from the stream first and
    gets the whole answer, not ``cannot_continue`` and never only the end."""
    cfg = make_config({"a": {}}, {"chat": [("a", "m")]})
    await ensure_topology(nc, cfg)
    async with RelayClient(client_url, config=cfg) as relay:
        job = relay.build_job("hi", route="chat")
        for seq, delta in enumerate(["Hello ", "wor"]):
            await nc.publish(job.reply_to, encode(Chunk(seq=seq, attempt=1, delta=delta)))
        await nc.flush()
        handle = await relay.submit_job(job)
        later = [
            Notice(kind="redelivered", attempt=2, resume=True, offset=9),
            Chunk(seq=0, attempt=2, delta="ld.", offset=9),
            Done(attempt=2, finish_reason="stop", usage=Usage(), pool="a", model="m",
                 timings=Timings(), chunks=1),
        ]  # fmt: skip
        for event in later:
            await nc.publish(job.reply_to, encode(event))
        assert await handle.text() == "Hello world."
        assert handle.resumes == 1
