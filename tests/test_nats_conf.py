"""nats.conf's `client` user, against the real server and the real topology.

A client may submit (JetStream publish + PubAck), cancel, read and replay
replies, and read state; it may not take, ack, move or destroy jobs. A denied
publish makes the server send ``-ERR 'Permissions Violation ...'`` to the
connection, which nats-py hands to ``error_cb``: the tests await that error,
then check with a worker connection that the job queue is untouched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from broker._config import Config, parse_config
from broker._jsapi import consumer_info, next_subject, pull_request_body
from broker._subjects import PRIORITY_GROUP
from broker._topology import ensure_topology
from tests._harness import CLIENT_INBOX

TIMEOUT_S = 5.0

CONFIG_YAML = """
pools:
  p1: {kind: openai, base_url: "http://127.0.0.1:9/v1", models: [m]}
routes:
  x: {targets: [{pool: p1, model: m}]}
"""


@dataclass
class Denials:
    """The permission errors the server reported to one connection."""

    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def error_cb(self, exc: Exception) -> None:
        await self.queue.put(str(exc))

    async def expect(self, subject: str) -> str:
        """Wait for the server to refuse a publish to ``subject``."""
        # nats-py lower-cases the server's message.
        wanted = f'permissions violation for publish to "{subject}"'.lower()
        while True:
            text = await asyncio.wait_for(self.queue.get(), TIMEOUT_S)
            if wanted in text.lower():
                return text

    def none_so_far(self) -> bool:
        return self.queue.empty()


@dataclass
class ClientConn:
    nc: NATS
    denials: Denials


@pytest.fixture
def config() -> Config:
    return parse_config(CONFIG_YAML)


@pytest.fixture
async def topology(nc: NATS, config: Config) -> NATS:
    """The real streams, consumers and bucket (route `x`, pool `p1`); the worker connection."""
    await ensure_topology(nc, config)
    return nc


@pytest.fixture
async def client(client_url: str) -> AsyncIterator[ClientConn]:
    denials = Denials()
    conn = await nats.connect(
        client_url, inbox_prefix=CLIENT_INBOX, error_cb=denials.error_cb, allow_reconnect=False
    )
    yield ClientConn(conn, denials)
    await conn.close()


async def _publish_job(client: ClientConn, subject: str = "llm.jobs.x") -> int:
    ack = await client.nc.jetstream().publish(subject, b'{"job": 1}', timeout=TIMEOUT_S)
    assert ack.stream == "LLM_JOBS"
    return int(ack.seq)


async def _denied(client: ClientConn, subject: str, body: bytes = b"") -> None:
    """Send a request the server must refuse; return once it has refused it."""
    inbox = client.nc.new_inbox()
    sub = await client.nc.subscribe(inbox)
    await client.nc.publish(subject, body, reply=inbox)
    await client.denials.expect(subject)
    await client.nc.flush()
    assert sub.pending_msgs == 0, "the refused request was answered"
    await sub.unsubscribe()


async def _worker_pull(worker: NATS) -> Msg:
    """Take the job as a worker does (priority-group pull); it is then ack-pending."""
    inbox = worker.new_inbox()
    sub = await worker.subscribe(inbox, max_msgs=1)
    body = pull_request_body(group=PRIORITY_GROUP, expires_s=TIMEOUT_S)
    await worker.publish(next_subject("LLM_JOBS", "route_x"), body, reply=inbox)
    msg = await sub.next_msg(timeout=TIMEOUT_S)
    assert msg.reply.startswith("$JS.ACK.LLM_JOBS.route_x.")
    return msg


async def _queue_state(worker: NATS) -> tuple[int, dict[str, int]]:
    """Jobs in LLM_JOBS and the route consumer's counters."""
    info = await worker.jetstream().stream_info("LLM_JOBS")
    cons = await consumer_info(worker, "LLM_JOBS", "route_x")
    counters = {
        "delivered": cons["delivered"]["stream_seq"],
        "ack_pending": cons["num_ack_pending"],
        "waiting": cons["num_waiting"],
        "pending": cons["num_pending"],
    }
    return info.state.messages, counters


UNTOUCHED = {"delivered": 0, "ack_pending": 0, "waiting": 0, "pending": 1}


async def test_client_submits_a_job_and_gets_its_puback(topology: NATS, client: ClientConn) -> None:
    first = await _publish_job(client)
    second = await _publish_job(client, "llm.pool.p1")
    assert first >= 1
    assert second == first + 1
    assert (await topology.jetstream().stream_info("LLM_JOBS")).state.messages == 2
    assert client.denials.none_so_far()


async def test_client_cannot_pull_a_job(topology: NATS, client: ClientConn) -> None:
    await _publish_job(client)
    body = pull_request_body(group=PRIORITY_GROUP, expires_s=TIMEOUT_S)
    await _denied(client, next_subject("LLM_JOBS", "route_x"), body)
    # Not delivered, not even a waiting pull: the job is still there for a worker.
    assert await _queue_state(topology) == (1, UNTOUCHED)


async def test_client_cannot_ack_a_job_a_worker_holds(topology: NATS, client: ClientConn) -> None:
    await _publish_job(client)
    job = await _worker_pull(topology)
    await _denied(client, job.reply, b"+ACK")
    messages, counters = await _queue_state(topology)
    assert (messages, counters["ack_pending"]) == (1, 1)


# conftest adds the anyio marker after collection, too late for parametrize.
@pytest.mark.anyio
@pytest.mark.parametrize(
    "subject",
    [
        "$JS.API.STREAM.DELETE.LLM_JOBS",
        "$JS.API.STREAM.PURGE.LLM_JOBS",
        "$JS.API.STREAM.PURGE.LLM_REPLIES",
        "$JS.API.STREAM.PURGE.LLM_DLQ",
        "$JS.API.STREAM.UPDATE.LLM_JOBS",
        "$JS.API.STREAM.CREATE.LLM_EVIL",
        "$JS.API.STREAM.MSG.DELETE.LLM_JOBS",
        "$JS.API.STREAM.MSG.GET.LLM_JOBS",
        "$JS.API.DIRECT.GET.LLM_JOBS",
        "$JS.API.CONSUMER.CREATE.LLM_JOBS",
        "$JS.API.CONSUMER.CREATE.LLM_JOBS.evil",
        "$JS.API.CONSUMER.CREATE.LLM_JOBS.route_x",
        "$JS.API.CONSUMER.DURABLE.CREATE.LLM_JOBS.evil",
        "$JS.API.CONSUMER.DELETE.LLM_JOBS.route_x",
        "$JS.API.CONSUMER.PAUSE.LLM_JOBS.route_x",
        "$JS.API.CONSUMER.DELETE.LLM_REPLIES.any",
    ],
)
async def test_client_cannot_change_or_destroy_the_queue(
    topology: NATS, client: ClientConn, subject: str
) -> None:
    await _publish_job(client)
    body = json.dumps({"stream_name": "LLM_JOBS", "config": {"durable_name": "evil"}}).encode()
    await _denied(client, subject, body)
    assert await _queue_state(topology) == (1, UNTOUCHED)
    names = await topology.jetstream().streams_info()
    assert {s.config.name for s in names} >= {"LLM_JOBS", "LLM_REPLIES", "LLM_DLQ"}


async def test_client_cannot_create_a_jobs_consumer_through_the_replies_subject(
    topology: NATS, client: ClientConn
) -> None:
    request = {
        "stream_name": "LLM_JOBS",
        "config": {"durable_name": "evil", "ack_policy": "explicit"},
    }
    reply = await client.nc.request(
        "$JS.API.CONSUMER.CREATE.LLM_REPLIES", json.dumps(request).encode(), timeout=TIMEOUT_S
    )
    assert json.loads(reply.data)["error"]["err_code"] == 10056  # stream name mismatch
    consumers = await topology.jetstream().consumers_info("LLM_JOBS")
    assert sorted(c.name for c in consumers) == ["pool_p1", "route_x"]


@pytest.mark.usefixtures("topology")
async def test_client_cannot_forge_replies_or_events(client: ClientConn) -> None:
    for subject in ("llm.reply.r1", "llm.events.done", "llm.dlq.x", "$KV.llm_workers.w1"):
        await client.nc.publish(subject, b"forged")
        await client.denials.expect(subject)


async def test_client_replays_replies_with_an_ordered_consumer(
    topology: NATS, client: ClientConn
) -> None:
    wjs = topology.jetstream()
    sent = [f'{{"type": "chunk", "seq": {i}}}'.encode() for i in range(3)]
    for event in sent:
        await wjs.publish("llm.reply.r1", event)  # PubAck: stored before the replay starts
    sub = await client.nc.jetstream().subscribe(
        "llm.reply.r1", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    replayed = [(await sub.next_msg(timeout=TIMEOUT_S)).data for _ in sent]
    assert replayed == sent
    # Then it goes live: a new event arrives on the same subscription.
    await topology.publish("llm.reply.r1", b'{"type": "done"}')
    assert (await sub.next_msg(timeout=TIMEOUT_S)).data == b'{"type": "done"}'
    await sub.unsubscribe()
    assert client.denials.none_so_far()


async def test_client_follows_replies_and_cancels(topology: NATS, client: ClientConn) -> None:
    replies = await client.nc.subscribe("llm.reply.>")
    cancels = await topology.subscribe("llm.cancel.>")
    await client.nc.flush()
    await topology.flush()
    await topology.publish("llm.reply.r2", b"chunk")
    await client.nc.publish("llm.cancel.r2", b"")
    assert (await replies.next_msg(timeout=TIMEOUT_S)).data == b"chunk"
    assert (await cancels.next_msg(timeout=TIMEOUT_S)).subject == "llm.cancel.r2"
    assert client.denials.none_so_far()


async def test_client_reads_queue_state_and_heartbeats(topology: NATS, client: ClientConn) -> None:
    await _publish_job(client)
    await (await topology.jetstream().key_value("llm_workers")).put("p1.w1", b"alive")
    cjs = client.nc.jetstream()
    assert (await cjs.account_info()).streams >= 4
    assert (await cjs.stream_info("LLM_JOBS")).state.messages == 1
    assert (await cjs.consumer_info("LLM_JOBS", "route_x")).num_pending == 1
    kv = await cjs.key_value("llm_workers")
    assert (await kv.get("p1.w1")).value == b"alive"
    assert await kv.keys() == ["p1.w1"]
    assert client.denials.none_so_far()
