"""The operator's tools on deploy/nats-tenants.conf: a tenant's dead letters.

Each test starts its own nats-server with that file (as tests/test_tenants.py
does), real in-process workers and a fake provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS

from broker import RelayClient
from broker._dlq import DeadLetterEntry, find_dead_letter, replay
from broker._errors import DeadLetterNotFound, RelayError
from broker._protocol import Chunk, Done, Error, decode_events, encode
from broker._server import NatsServer
from broker._subjects import inbox_prefix
from devstack import MockProvider, expected_answer
from tests._harness import NatsUrls, start_stack, upstream
from tests.test_tenants import ACME, CHAT, CONF, GLOBEX, TIMEOUT_S, WORKER, _job


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(store_dir=tmp_path / "js", config_file=CONF) as srv:
        yield srv


async def _wait_dead_letter(nc: NATS, request_id: str) -> DeadLetterEntry:
    with anyio.fail_after(TIMEOUT_S):
        while True:
            try:
                return await find_dead_letter(nc, request_id)
            except DeadLetterNotFound:
                await anyio.sleep(0.05)


async def _answer(nc: NATS, subject: str, skip_seq: int) -> str:
    """The text of the first run on ``subject`` that is not job ``skip_seq``'s."""
    sub = await nc.subscribe(subject)
    parts: list[str] = []
    with anyio.fail_after(TIMEOUT_S):
        while True:  # (a done may carry the last chunk: Done.final)
            for event in decode_events((await sub.next_msg(timeout=TIMEOUT_S)).data):
                if event.job_seq == skip_seq:
                    continue
                if isinstance(event, Chunk):
                    parts.append(event.delta)
                elif isinstance(event, Done | Error):
                    assert isinstance(event, Done), event
                    return "".join(parts)


async def test_replay_of_a_tenants_dead_letter_answers_that_tenant(server: NatsServer) -> None:
    mock = MockProvider(name="p", tokens=4, fault="status=503")
    urls = NatsUrls(server.url_for(WORKER), server.url_for(ACME))
    pools = {"a": upstream(mock, max_retries=0)}
    async with (
        start_stack(urls, pools, CHAT, relay=None) as stack,
        RelayClient(server.url_for(ACME), tenant="acme", config=stack.config) as acme,
    ):
        handle = await acme.submit("hi", route="chat")
        events = [e async for e in handle.events()]
        assert isinstance(events[-1], Error) and events[-1].code == "all_providers_failed"
        mock.set_fault(None)  # the provider is back
        reader = await nats.connect(server.url_for(ACME), inbox_prefix=inbox_prefix("acme"))
        operator = await nats.connect(server.url_for(WORKER))
        try:
            entry = await find_dead_letter(operator, handle.id)
            answer = anyio.Event()
            texts: list[str] = []

            async def read() -> None:
                texts.append(await _answer(reader, handle.job.reply_to, handle.job_seq))
                answer.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await reader.flush()
                await anyio.sleep(0.1)
                done = await replay(operator, entry, stack.config)
                await answer.wait()
        finally:
            await reader.close()
            await operator.close()
    assert done.subject == "llm.jobs.chat.acme"
    assert texts == [expected_answer("p", 4)]


async def test_a_refused_job_naming_another_tenant_is_not_replayed(server: NatsServer) -> None:
    mock = MockProvider(name="p", tokens=4)
    urls = NatsUrls(server.url_for(WORKER), server.url_for(GLOBEX))
    async with start_stack(urls, {"a": upstream(mock)}, CHAT, relay=None) as stack:
        evil = await nats.connect(server.url_for(GLOBEX), inbox_prefix=inbox_prefix("globex"))
        await evil.jetstream().publish("llm.jobs.chat.globex", _job("i1", "llm.reply.acme.v"))
        await evil.close()
        operator = await nats.connect(server.url_for(WORKER))
        try:
            entry = await _wait_dead_letter(operator, "i1")
            with pytest.raises(RelayError, match="not replayed"):
                await replay(operator, entry, stack.config)
            still = await find_dead_letter(operator, "i1")
        finally:
            await operator.close()
    assert entry.letter is not None and entry.letter.code == "invalid_job"
    assert still.seq == entry.seq
    assert encode(still.letter) == encode(entry.letter)
