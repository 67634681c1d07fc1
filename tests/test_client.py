"""RelayClient against a real nats-server (no workers: the queue fills up)."""

from __future__ import annotations

import json
import time
import urllib.request

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeout

from broker import (
    Chunk,
    DeadlineExceeded,
    Done,
    Notice,
    PayloadTooLarge,
    QueueFull,
    RelayClient,
    Timings,
    UnknownRoute,
    Usage,
    ensure_topology,
)
from broker._fold import Answer
from broker._jsapi import consumer_info
from broker._nats import connect_nats
from broker._replay import next_message
from broker._server import NatsServer
from broker._subjects import reply_subject
from tests._builders import make_config

POOLS = {"p1": {}, "p2": {}}
ROUTES = {"chat": [("p1", "m")], "other": [("p2", "m")]}


async def test_full_queue_raises_queue_full_while_other_route_accepts(
    nc: NATS, client_url: str
) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES, streams={"queue_capacity": 3}))
    async with RelayClient(client_url) as relay:
        for i in range(3):
            await relay.submit(f"job {i}", route="chat")
        with pytest.raises(QueueFull, match=r"route chat queue is full \(3 jobs waiting\)"):
            await relay.submit("one too many", route="chat")
        handle = await relay.submit("still fine", route="other")
    assert (await consumer_info(nc, "LLM_JOBS", "route_chat"))["num_pending"] == 3
    assert (await consumer_info(nc, "LLM_JOBS", "route_other"))["num_pending"] == 1
    assert handle.job.route == "other"


async def test_duplicate_submit_creates_one_job(nc: NATS, client_url: str) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES))
    async with RelayClient(client_url) as relay:
        await relay.submit("hi", route="chat", request_id="same-id")
        await relay.submit("hi", route="chat", request_id="same-id", retry=True)
    assert (await consumer_info(nc, "LLM_JOBS", "route_chat"))["num_pending"] == 1


async def test_unknown_route_is_refused_before_publishing(nc: NATS, client_url: str) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES))
    async with RelayClient(client_url) as relay:
        with pytest.raises(UnknownRoute, match="nope"):
            await relay.submit("hi", route="nope")
        with pytest.raises(UnknownRoute, match="ghost"):
            await relay.submit("hi", route="chat", pool="ghost")
    info = await nc.jetstream().stream_info("LLM_JOBS")
    assert info.state.messages == 0


async def test_oversize_job_is_refused(nc: NATS, client_url: str) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES, streams={"max_job_bytes": 4096}))
    async with RelayClient(client_url) as relay:
        with pytest.raises(PayloadTooLarge):
            await relay.submit("x" * 10_000, route="chat")
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


async def test_no_worker_means_deadline_exceeded(nc: NATS, client_url: str) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES))
    async with RelayClient(client_url) as relay:
        handle = await relay.submit("hi", route="chat", timeout_s=0.3)
        with pytest.raises(DeadlineExceeded):
            await handle.text()


def test_answer_drops_text_of_an_abandoned_attempt() -> None:
    answer = Answer()
    answer.add(Chunk(seq=0, attempt=1, delta="partial "))
    answer.add(Notice(kind="failover", attempt=2, from_pool="a", to_pool="b", reset=True))
    answer.add(Chunk(seq=0, attempt=2, delta="clean "))
    answer.add(Chunk(seq=1, attempt=2, delta="answer"))
    answer.add(
        Done(attempt=2, finish_reason="stop", usage=Usage(), pool="b", model="m", timings=Timings())
    )
    assert answer.text == "clean answer"
    assert answer.resets == 1


def test_answer_resets_on_newer_attempt_even_without_notice() -> None:
    answer = Answer()
    answer.add(Chunk(seq=0, attempt=1, delta="lost worker's text"))
    answer.add(Chunk(seq=0, attempt=2, delta="redelivered"))
    assert answer.text == "redelivered"


def test_answer_ignores_a_stale_notice_that_arrives_after_the_backup_started() -> None:
    answer = Answer()
    answer.add(Chunk(seq=0, attempt=1, delta="partial"))
    answer.add(Chunk(seq=0, attempt=2, delta="backup "))  # the backup was quicker...
    answer.add(Notice(kind="failover", attempt=1, from_pool="a", to_pool="b", reset=True))
    answer.add(Chunk(seq=1, attempt=2, delta="answer"))
    answer.add(Chunk(seq=5, attempt=1, delta="late chunk of the dead attempt"))
    assert answer.text == "backup answer"


SERVER_FIRST_PING_S = 2.0


def server_subscriptions(server: NatsServer, connection: str) -> set[str]:
    """The subjects the server holds for the client connections named ``connection``."""
    url = f"http://{server.host}:{server.monitor_port}/connz?subs=1&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as resp:
        conns = json.load(resp)["connections"]
    return {
        s for c in conns if c.get("name") == connection for s in c.get("subscriptions_list", [])
    }


async def test_a_closed_handles_reply_subscription_leaves_the_server(
    nc: NATS, client_url: str, nats_server: NatsServer
) -> None:
    """A closed handle's UNSUB waits for the connection's next write (broker/_replay.py,
    ``unsubscribe_soon``), but it does reach the server, and an open handle keeps its own."""
    await ensure_topology(nc, make_config(POOLS, ROUTES))
    async with RelayClient(client_url) as relay:
        connected = time.monotonic()
        closed = [await relay.submit(f"job {i}", route="chat") for i in range(5)]
        for handle in closed:
            await handle.close()
        kept = await relay.submit("still open", route="chat")
        with anyio.fail_after(5):
            while (subs := server_subscriptions(nats_server, "llmrelay-client")) & {
                h.job.reply_to for h in closed
            }:
                await anyio.sleep(0.02)
        assert kept.job.reply_to in subs
        # Past nats-server's first PING to a new connection (2 s), whose PONG would
        # flush the UNSUB too: nothing else writes now, so only the flush timer can.
        await anyio.sleep(max(0.0, connected + SERVER_FIRST_PING_S + 0.5 - time.monotonic()))
        await kept.close()
        with anyio.fail_after(1):
            while kept.job.reply_to in server_subscriptions(nats_server, "llmrelay-client"):
                await anyio.sleep(0.02)


async def test_next_message_waits_times_out_and_loses_nothing_to_a_cancelled_wait(
    nc: NATS, client_url: str
) -> None:
    """``next_message`` (the reply reader's wait, without ``next_msg``'s tasks): what
    comes later arrives, a wait with nothing gets nats-py's TimeoutError, a message that
    arrives after a cancelled wait is still there, and a closed connection says so."""
    reader = await connect_nats(client_url, name="next-message-test")
    subject = reply_subject("next-message-test")  # what a client may read, a worker write
    sub = await reader.subscribe(subject)
    await reader.flush()
    with pytest.raises(NatsTimeout):
        await next_message(sub, 0.05)
    with anyio.move_on_after(0.05) as waited:
        await next_message(sub, 5.0)
    assert waited.cancelled_caught
    async with anyio.create_task_group() as tg:

        async def publish_soon() -> None:
            await nc.publish(subject, b"one")
            await nc.publish(subject, b"two")

        tg.start_soon(publish_soon)
        first = await next_message(sub, 5.0)
    second = await next_message(sub, 5.0)
    assert (first.data, second.data) == (b"one", b"two")
    assert sub.pending_msgs == 0 and sub.pending_bytes == 0
    await reader.close()
    with pytest.raises(ConnectionClosedError):
        await next_message(sub, 0.05)
