"""Two tenants, `acme` and `globex`, on deploy/nats-tenants.conf (issue 11, item 3).

Each test starts its own nats-server with that file (a temp store, free ports),
real in-process workers and a fake provider. `globex` attacks `acme` the ways
a client of one NATS user could attack another's before tenants existed (read
its answers, cancel its job, aim a worker at its reply subject, publish into its
queue), and each attack is refused: by the server (a permissions violation,
which nats-py hands to ``error_cb``) or, for what a worker publishes, by the
worker's check of ``reply_to`` against the tenant of the arrival subject.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker import Job, Message, RelayClient, ensure_topology
from broker._client import JobOptions, cancel_payload
from broker._errors import QueueFull
from broker._fold import Answer
from broker._protocol import encode, now_ms
from broker._server import NatsServer
from broker._subjects import inbox_prefix
from devstack import MockProvider, expected_answer
from tests._harness import NatsUrls, RelayStack, start_stack, upstream

CONF = Path(__file__).resolve().parent.parent / "deploy" / "nats-tenants.conf"
WORKER = ("worker", "worker-secret")
ACME = ("acme", "acme-secret")
GLOBEX = ("globex", "globex-secret")
CHAT = {"chat": [("a", "gpt")]}
TIMEOUT_S = 10.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(store_dir=tmp_path / "js", config_file=CONF) as srv:
        yield srv


class Raw:
    """A raw NATS connection as a tenant: what it reads, and what the server refused."""

    def __init__(self) -> None:
        self.seen: list[Msg] = []
        self.refused: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, server: NatsServer, user: tuple[str, str]) -> NATS:
        async def on_error(exc: Exception) -> None:
            self.refused.append(str(exc).lower())

        self.nc = await nats.connect(
            server.url_for(user),
            inbox_prefix=inbox_prefix(user[0]),
            error_cb=on_error,
            allow_reconnect=False,
        )
        return self.nc

    async def record(self, msg: Msg) -> None:
        self.seen.append(msg)

    async def expect_refused(self, what: str, subject: str) -> None:
        """Wait for the server to refuse ``what`` ("publish", "subscription") to ``subject``."""
        wanted = f'permissions violation for {what} to "{subject}"'.lower()  # as nats-py
        with anyio.fail_after(TIMEOUT_S):
            while not any(wanted in text for text in self.refused):
                await anyio.sleep(0.02)


@asynccontextmanager
async def tenants_stack(
    server: NatsServer, mock: MockProvider, **options: object
) -> AsyncIterator[tuple[RelayStack, RelayClient, RelayClient]]:
    """Workers and the fake provider; acme's client with a config, globex's without."""
    urls = NatsUrls(server.url_for(WORKER), server.url_for(ACME))
    async with start_stack(urls, {"a": upstream(mock)}, CHAT, relay=None, **options) as stack:
        acme = RelayClient(server.url_for(ACME), tenant="acme", config=stack.config)
        globex = RelayClient(server.url_for(GLOBEX), tenant="globex")
        async with acme, globex:
            yield stack, acme, globex


async def test_each_tenant_gets_its_own_answer(server: NatsServer) -> None:
    mock = MockProvider(name="p", tokens=20)
    async with tenants_stack(server, mock) as (_, acme, globex):
        mine = await acme.submit("hi", route="chat", options=JobOptions(max_tokens=5))
        theirs = await globex.submit("hi", route="chat", options=JobOptions(max_tokens=9))
        assert mine.job.reply_to == f"llm.reply.acme.{mine.id}"
        assert theirs.job.reply_to == f"llm.reply.globex.{theirs.id}"
        texts = [await mine.text(), await theirs.text()]
    assert texts == [expected_answer("p", 5), expected_answer("p", 9)]


async def test_a_tenant_cannot_read_another_tenants_answers_or_inboxes(
    server: NatsServer,
) -> None:
    mock = MockProvider(name="p", tokens=8)
    spy = Raw()
    async with tenants_stack(server, mock) as (_, acme, _globex):
        nc = await spy.connect(server, GLOBEX)
        subjects = ("llm.reply.acme.>", "llm.reply.>", "_INBOX_acme.>")
        for subject in subjects:
            await nc.subscribe(subject, cb=spy.record)
        for subject in subjects:
            await spy.expect_refused("subscription", subject)
        text = await (await acme.submit("secret", route="chat")).text()
        await nc.flush()
        await nc.close()
    assert text == expected_answer("p", 8)
    assert spy.seen == []


async def test_a_tenant_cannot_cancel_another_tenants_job(server: NatsServer) -> None:
    mock = MockProvider(name="p", tokens=30, token_delay_ms=30)
    evil = Raw()
    async with tenants_stack(server, mock) as (_, acme, _globex):
        nc = await evil.connect(server, GLOBEX)
        handle = await acme.submit("victim", route="chat")
        key = cancel_payload(handle.job)  # the worst case: globex knows id and key
        answer = Answer(handle.job_seq)
        attacked = False
        async for event in handle.events():
            answer.add(event)
            if not attacked:
                attacked = True
                for subject in (f"llm.cancel.acme.{handle.id}", f"llm.cancel.{handle.id}"):
                    await nc.publish(subject, key)
                    await evil.expect_refused("publish", subject)
                # Its own cancel subject is allowed; the worker cancels only globex's jobs.
                await nc.publish(f"llm.cancel.globex.{handle.id}", key)
                await nc.flush()
        await nc.close()
    assert attacked and answer.error is None
    assert answer.text == expected_answer("p", 30)


def _job(rid: str, reply_to: str) -> bytes:
    return encode(
        Job(
            id=rid,
            route="chat",
            messages=[Message(role="user", content="inject")],
            reply_to=reply_to,
            deadline_ms=now_ms() + 60_000,
        )
    )


async def _dead_letters(worker: NATS, count: int) -> list[dict[str, object]]:
    js = worker.jetstream()
    with anyio.fail_after(TIMEOUT_S):
        while (await js.stream_info("LLM_DLQ")).state.messages < count:
            await anyio.sleep(0.05)
    return [json.loads((await js.get_msg("LLM_DLQ", seq)).data or b"") for seq in (1, 2)]


async def test_a_tenant_cannot_inject_into_another_tenants_answers(server: NatsServer) -> None:
    mock = MockProvider(name="p", tokens=4)
    evil = Raw()
    async with tenants_stack(server, mock) as (_, _acme, _globex):
        worker = await nats.connect(server.url_for(WORKER))
        replies = await worker.subscribe("llm.reply.>")
        nc = await evil.connect(server, GLOBEX)
        js = nc.jetstream()
        # On its own queue, aimed at acme's reply subject and at the default space.
        await js.publish("llm.jobs.chat.globex", _job("i1", "llm.reply.acme.victim1"))
        await js.publish("llm.jobs.chat.globex", _job("i2", "llm.reply.victim2"))
        letters = await _dead_letters(worker, 2)
        # Into acme's queue: refused by the server, nothing stored.
        await nc.publish("llm.jobs.chat.acme", _job("i3", "llm.reply.acme.i3"))
        await evil.expect_refused("publish", "llm.jobs.chat.acme")
        await nc.close()
        await anyio.sleep(0.3)
        stored = await worker.jetstream().stream_info("LLM_JOBS", subjects_filter=">")
        await worker.close()
    assert [(d["code"], d["message"]) for d in letters] == [
        ("invalid_job", "reply_to: must be llm.reply.globex.<id>"),
        ("invalid_job", "reply_to: must be llm.reply.globex.<id>"),
    ]
    assert replies.pending_msgs == 0  # the worker answered neither
    assert not (stored.state.subjects or {}).get("llm.jobs.chat.acme")


async def test_one_tenants_full_queue_leaves_the_others_open(server: NatsServer) -> None:
    mock = MockProvider(name="p")
    streams = {"queue_capacity": 2}
    async with tenants_stack(server, mock, workers=[], streams=streams) as (stack, acme, globex):
        worker = await nats.connect(server.url_for(WORKER))
        await ensure_topology(worker, stack.config)
        await worker.close()
        for _ in range(2):
            await acme.submit("flood", route="chat")
        with pytest.raises(QueueFull):
            await acme.submit("one more", route="chat")
        handle = await globex.submit("mine", route="chat")
        assert handle.job_seq == 3
