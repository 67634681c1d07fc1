"""Routing state belongs to the workers, and every attempt has an identity (issue 11).

Each test is an attack by the ``client`` user of nats.conf against a real
nats-server, real workers and real fake providers, and asserts what the victim
sees: its own answer, exactly, once; or, for the operator, a job that is
answered or dead-lettered, never acked into nothing.

- defect 3: a forged job aimed at another client's reply subject (with forged
  ``attempts``) cannot inject its answer; the subject decides the route;
- defect 4: a worker stopped past ``ack_wait`` (SIGSTOP of a real worker
  process) never mixes its late text or ``done`` into the answer;
- defect 5: a duplicate re-queue, replay or submit is never acked into nothing;
- defect 15: a publish to an unconfigured route fails at once;
- every stream has a byte limit.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from broker import Chunk, Done, Error, Notice, RelayClient
from broker._config import Config
from broker._dlq import find_dead_letter, replay
from broker._errors import AllProvidersFailed, DuplicateRequest, StreamReset
from broker._fold import Answer, attempt_id, requeue_base
from broker._jsapi import next_subject, pull_request_body
from broker._protocol import Job, Message, Timings, Usage, decode_event, decode_events
from broker._subjects import PRIORITY_GROUP
from broker._topology import ensure_topology, stream_configs
from devstack import MockProvider, expected_answer
from gateway import ReplyFold
from tests._harness import (
    CLIENT_INBOX,
    mock_pool,
    process_primary,
    relay_config,
    running_workers,
)
from workers._delivery import Delivery

TIMEOUT_S = 10.0
FAST_RETRY: dict[str, Any] = {"max_retries": 0, "backoff_base_s": 0.05, "backoff_max_s": 0.1}


def _config(pools: dict[str, dict[str, Any]], routes: dict[str, Any]) -> Config:
    return relay_config(pools, routes)


def _raw_job(rid: str, route: str, reply_to: str, **fields: Any) -> bytes:
    job = {
        "id": rid,
        "route": route,
        "messages": [{"role": "user", "content": "hi"}],
        "reply_to": reply_to,
        "deadline_ms": 9_999_999_999_999,
        **fields,
    }
    return msgspec.json.encode(job)


@asynccontextmanager
async def attacker(client_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(client_url, inbox_prefix=CLIENT_INBOX, allow_reconnect=False)
    try:
        yield conn
    finally:
        await conn.close()


async def _first_subject(sub: Any, kind: type) -> str:
    """The reply subject of the first event of ``kind`` seen on ``llm.reply.>``."""
    while True:
        msg = await sub.next_msg(timeout=TIMEOUT_S)
        if isinstance(decode_event(msg.data), kind):
            return str(msg.subject)


def _done(attempt: int, pool: str = "b") -> Done:
    return Done(
        attempt=attempt, finish_reason="stop", usage=Usage(), pool=pool, model="m",
        timings=Timings(),
    )  # fmt: skip


# --- defect 3: answer injection -------------------------------------------------------------


async def test_a_forged_job_cannot_inject_its_answer_into_another_clients_reply(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="mock-a", tokens=12, token_delay_ms=60) as mock:
        cfg = _config({"a": mock_pool(mock.url, concurrency=4)}, {"chat": {"targets": [
            {"pool": "a", "model": "gpt"}]}})  # fmt: skip
        async with (
            running_workers(cfg, ["a"], worker_url),
            RelayClient(client_url, config=cfg) as victim,
            attacker(client_url) as evil,
        ):
            spy = await evil.subscribe("llm.reply.>")
            handle = await victim.submit("tell me a story", route="chat")

            async def inject() -> None:
                subject = await _first_subject(spy, Chunk)
                forged = _raw_job(
                    "evil-1", "chat", subject, max_tokens=3, rank=7,
                    attempts=[{"pool": "a", "model": "gpt", "code": "x", "message": "x",
                               "deliveries": 100}],
                )  # fmt: skip
                await evil.jetstream().publish("llm.jobs.chat", forged)

            async with anyio.create_task_group() as tg:
                tg.start_soon(inject)
                with anyio.fail_after(TIMEOUT_S):
                    text = await handle.text()
    assert text == expected_answer("mock-a", 12)
    assert handle.done is not None and handle.done.usage.completion_tokens == 12


async def test_the_subject_a_job_arrived_on_decides_its_route(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="mock-a", tokens=3) as mock:
        routes = {"small": [("a", "gpt-small")], "large": [("a", "gpt-large")]}
        cfg = _config({"a": mock_pool(mock.url)}, dict(routes))
        async with running_workers(cfg, ["a"], worker_url), attacker(client_url) as evil:
            replies = await evil.subscribe("llm.reply.r1")
            job = _raw_job("r1", "large", "llm.reply.r1")
            await evil.jetstream().publish("llm.jobs.small", job)
            events = [decode_event((await replies.next_msg(timeout=TIMEOUT_S)).data)]
            while not isinstance(events[-1], Done | Error):
                events.append(decode_event((await replies.next_msg(timeout=TIMEOUT_S)).data))
    done = events[-1]
    assert isinstance(done, Done), done
    assert done.model == "gpt-small"
    assert [r["model"] for r in mock.stats()["log"]] == ["gpt-small"]


async def test_a_client_cannot_forge_routing_headers_on_its_own_subjects(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="mock-a", tokens=2) as mock:
        cfg = _config({"a": mock_pool(mock.url, models=["gpt"])}, {"chat": [("a", "gpt")]})
        async with running_workers(cfg, ["a"], worker_url), attacker(client_url) as evil:
            replies = await evil.subscribe("llm.reply.p1")
            forged = {"Llmrelay-Job-Seq": "1", "Llmrelay-Attempt-Base": str(1 << 40)}
            tried = {"pool": "b", "model": "x", "code": "x", "message": "x", "deliveries": 9}
            job = _raw_job("p1", "gpt", "llm.reply.p1", attempts=[tried])
            ack = await evil.jetstream().publish("llm.pool.a", job, headers=forged)
            events = [decode_event((await replies.next_msg(timeout=TIMEOUT_S)).data)]
            while not isinstance(events[-1], Done | Error):
                events.append(decode_event((await replies.next_msg(timeout=TIMEOUT_S)).data))
    done = events[-1]
    assert isinstance(done, Done), done
    assert (done.attempt, done.job_seq, done.attempts) == (1, ack.seq, [])


def test_attempt_ids_are_unique_and_grow() -> None:
    first, again = attempt_id(0, 1), attempt_id(0, 2)
    moved_by_first, moved_by_again = requeue_base(first), requeue_base(again)
    ids = [first, again, attempt_id(moved_by_first, 1), attempt_id(moved_by_again, 1)]
    ids += [attempt_id(moved_by_again, 2), attempt_id(requeue_base(ids[-1]), 1)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert attempt_id(moved_by_first, 1) > attempt_id(0, 1023)  # above every redelivery


async def test_a_client_cannot_publish_a_requeue(nc: NATS, client_url: str) -> None:
    cfg = _config({"a": mock_pool("http://127.0.0.1:9")}, {"chat": [("a", "m")]})
    await ensure_topology(nc, cfg)
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    conn = await nats.connect(
        client_url, inbox_prefix=CLIENT_INBOX, error_cb=on_error, allow_reconnect=False
    )
    try:
        with pytest.raises((nats.errors.TimeoutError, NoRespondersError)):
            await conn.request("llm.requeue.a", _raw_job("r", "chat", "llm.reply.r"), timeout=1)
    finally:
        await conn.close()
    assert any('publish to "llm.requeue.a"' in e for e in errors), errors
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


# --- defect 4: a stopped worker's late events ------------------------------------------------


def test_a_late_done_of_a_superseded_attempt_does_not_finish_the_answer() -> None:
    """The issue's sequence: chunk from 1, reset to 2, chunk 'The fu' from 2, done from 1."""
    for fold in (Answer(), ReplyFold(float("inf"))):
        fold.add(Chunk(seq=0, attempt=1, delta="Hello from a."))
        fold.add(Notice(kind="redelivered", attempt=2, reset=True))
        fold.add(Chunk(seq=0, attempt=2, delta="The fu"))
        fold.add(_done(1, pool="a"))
        fold.add(Error(code="internal", message="late", attempt=1))
        assert not fold.finished and fold.done is None and fold.error is None
        fold.add(Chunk(seq=1, attempt=2, delta="ll answer"))
        fold.add(_done(2))
        assert fold.finished and fold.done is not None and fold.done.attempt == 2
    assert isinstance(fold, ReplyFold) and fold.finish() == "The full answer"


def test_events_of_another_job_on_the_same_subject_never_count() -> None:
    answer = Answer(job_seq=7)
    answer.add(Chunk(seq=0, attempt=1, delta="mine", job_seq=7))
    answer.add(Chunk(seq=0, attempt=99, delta="forged", job_seq=8))
    answer.add(msgspec.structs.replace(_done(99), job_seq=8))
    assert answer.text == "mine" and not answer.finished
    answer.add(msgspec.structs.replace(_done(1), job_seq=7))
    assert answer.finished and answer.text == "mine"


def test_the_gateway_fold_refuses_an_attempt_older_than_the_one_it_sent() -> None:
    fold = ReplyFold(0.0)
    assert fold.chunk(Chunk(seq=0, attempt=2, delta="new"), now=0.0) == "new"
    assert fold.chunk(Chunk(seq=3, attempt=1, delta="old"), now=0.0) == ""
    fold.add(_done(1))
    assert not fold.finished
    with pytest.raises(StreamReset):
        fold.add(Chunk(seq=0, attempt=3, delta="newer"))


async def test_a_worker_stopped_past_ack_wait_never_mixes_into_the_answer(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    """SIGSTOP the primary after its first chunk; SIGCONT it once the backup streams."""
    async with (
        MockProvider(name="mock-a", tokens=20, token_delay_ms=100) as ma,
        MockProvider(name="mock-b", tokens=20, token_delay_ms=60) as mb,
    ):
        lease = {"ack_wait_s": 1.0, "concurrency": 2}
        async with process_primary(nc, worker_url, tmp_path, ma, mb, **lease) as (cfg, primary):
            try:
                async with (
                    running_workers(cfg, ["b"], worker_url),
                    RelayClient(client_url, config=cfg) as relay,
                ):
                    await anyio.sleep(0.3)  # the primary's route pull is in place
                    raw = await nc.subscribe("llm.reply.>")
                    handle = await relay.submit("story", route="chat", timeout_s=30)
                    late: list[Any] = []

                    async def stop_and_resume() -> None:
                        await _until_chunk_from(raw, "a")
                        primary.proc.send_signal(signal.SIGSTOP)
                        await _until_chunk_from(raw, "b")  # the redelivery, after ack_wait
                        primary.proc.send_signal(signal.SIGCONT)
                        with anyio.move_on_after(2.5):  # the primary's stream had all arrived
                            while True:
                                late.append(decode_event((await raw.next_msg(timeout=5)).data))

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(stop_and_resume)
                        with anyio.fail_after(30):
                            text = await handle.text()
            finally:
                primary.proc.send_signal(signal.SIGCONT)
    # The redelivery read back what the stopped primary had sent (LLM_REPLIES) and
    # continued it: mock-a's text, finished by mock-b, nothing of the woken primary.
    assert text == expected_answer("mock-a", 20)
    assert handle.done is not None and handle.done.pool == "b"
    assert not [e for e in late if isinstance(e, Done) and e.pool == "a"], late


async def _until_chunk_from(sub: Any, pool: str) -> None:
    while True:
        event = decode_event((await sub.next_msg(timeout=TIMEOUT_S)).data)
        if isinstance(event, Chunk) and event.pool == pool:
            return


# --- defect 5: acked but never answered ----------------------------------------------------------


@asynccontextmanager
async def failing_pair(
    worker_url: str, client_url: str, a_model: str, b_model: str, a: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Config, RelayClient, MockProvider]]:
    async with (
        MockProvider(name="mock-a", tokens=4) as ma,
        MockProvider(name="mock-b", tokens=4) as mb,
    ):
        pools = {
            "a": mock_pool(ma.url, **{**FAST_RETRY, **(a or {})}),
            "b": mock_pool(mb.url, **FAST_RETRY),
        }
        cfg = _config(pools, {"chat": {"targets": [{"pool": "a", "model": a_model},
                                                   {"pool": "b", "model": b_model}]}})  # fmt: skip
        async with (
            running_workers(cfg, ["a", "b"], worker_url),
            RelayClient(client_url, config=cfg) as relay,
        ):
            yield cfg, relay, mb


async def test_a_forged_msg_id_cannot_swallow_a_failover(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    slow_retry = {"max_retries": 1, "backoff_base_s": 0.6, "backoff_max_s": 0.6}
    async with (
        failing_pair(worker_url, client_url, "gpt+status=503", "gpt", a=slow_retry) as (_, r, _b),
        attacker(client_url) as evil,
    ):
        spy = await evil.subscribe("llm.reply.>")
        handle = await r.submit("hi", route="chat", timeout_s=8)
        subject = await _first_subject(spy, Notice)  # the retry notice names the request
        rid = subject.removeprefix("llm.reply.")
        for n in range(1, 4):
            headers = {"Nats-Msg-Id": f"{rid}.{n}"}
            await evil.jetstream().publish("llm.jobs.chat", b'{"junk": 1}', headers=headers)
        text = await handle.text()
    assert text == expected_answer("mock-b", 4)


async def test_a_replay_soon_after_a_failover_is_answered(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with failing_pair(
        worker_url, client_url, "gpt+status=503", "gpt+status=503+fail_first=1"
    ) as (cfg, relay, _):
        handle = await relay.submit("hi", route="chat", timeout_s=8)
        with pytest.raises(AllProvidersFailed):
            await handle.text()
        entry = await find_dead_letter(nc, handle.id)
        replies = await nc.subscribe(f"llm.reply.{handle.id}")
        await replay(nc, entry, cfg)
        answer = Answer()
        with anyio.fail_after(TIMEOUT_S):
            while not answer.finished:
                for event in decode_events((await replies.next_msg(timeout=TIMEOUT_S)).data):
                    answer.add(event)  # (a done may carry the last chunk: Done.final)
    assert answer.done is not None and answer.done.pool == "b"
    assert answer.text == expected_answer("mock-b", 4)


async def test_a_reused_request_id_is_refused_unless_it_is_a_retry(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with failing_pair(worker_url, client_url, "gpt", "gpt") as (_, relay, _b):
        first = await (await relay.submit("hi", route="chat", request_id="same")).text()
        with pytest.raises(DuplicateRequest, match="same"):
            await relay.submit("something else", route="chat", request_id="same")
        again = await relay.submit("hi", route="chat", request_id="same", retry=True)
        with anyio.fail_after(TIMEOUT_S):
            replayed = await again.text()
    assert first == replayed == expected_answer("mock-a", 4)


# --- defect 15 and byte limits ----------------------------------------------------------------


async def test_a_publish_to_an_unknown_route_fails_at_once(nc: NATS, client_url: str) -> None:
    cfg = _config({"a": mock_pool("http://127.0.0.1:9")}, {"chat": [("a", "m")]})
    await ensure_topology(nc, cfg)
    async with attacker(client_url) as client:
        js = client.jetstream()
        # (`llm.jobs.chat.<tenant>` is a tenant's queue: nats.conf's client may not
        # publish there at all, tests/test_tenants.py.)
        for subject in ("llm.jobs.ghost", "llm.pool.ghost"):
            with pytest.raises(NoStreamResponseError):
                await js.publish(subject, _raw_job("g", "ghost", "llm.reply.g"), timeout=2)
        await js.publish("llm.jobs.chat", _raw_job("c", "chat", "llm.reply.c"))
        await js.publish("llm.pool.a", _raw_job("p", "m", "llm.reply.p"))
        # A route added to the config is taken once a process ensures the topology again.
        more = _config({"a": mock_pool("http://127.0.0.1:9")}, {"chat": [("a", "m")],
                                                                "new": [("a", "m")]})  # fmt: skip
        await ensure_topology(nc, more)
        await js.publish("llm.jobs.new", _raw_job("n", "new", "llm.reply.n"))
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 3


def test_every_stream_has_a_byte_limit() -> None:
    cfg = _config({"a": mock_pool("http://127.0.0.1:9")}, {"chat": [("a", "m")]})
    limits = {s.name: s.max_bytes for s in stream_configs(cfg)}
    assert set(limits) == {"LLM_JOBS", "LLM_REPLIES", "LLM_EVENTS", "LLM_DLQ"}
    assert all(isinstance(v, int) and v > 0 for v in limits.values()), limits
    # Every stream fits the file store of nats.conf (10GB) together, so all can be created.
    file_streams = ("LLM_JOBS", "LLM_EVENTS", "LLM_DLQ")
    assert sum(limits[s] or 0 for s in file_streams) <= 10 * 1000**3


class _PubAckLostOnce:
    """A JetStream context whose first publish is stored but whose PubAck is lost,
    as when the server answers after the client's timeout (the store happens, the
    reply does not arrive). Only the network is faked; the store is the real server."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.calls = 0

    async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> Any:
        self.calls += 1
        ack = await self.js.publish(subject, payload, **kwargs)
        if self.calls == 1:
            raise nats.errors.TimeoutError()
        return ack


async def test_a_requeue_whose_puback_is_lost_is_stored_once_and_not_handed_back(
    nc: NATS,
) -> None:
    """Suspected in the issue: "a re-queue whose PubAck times out is nak'ed and also
    runs on the backup". Ruled out: the re-queue is sent again under the same
    Nats-Msg-Id, the server answers duplicate (stored), and the original is settled
    by the caller's ack, not handed back (``Delivery.requeue`` returns normally)."""
    cfg = _config({"a": mock_pool("http://127.0.0.1:9"), "b": mock_pool("http://127.0.0.1:9")},
                  {"chat": [("a", "gpt"), ("b", "gpt")]})  # fmt: skip
    await ensure_topology(nc, cfg)
    await nc.jetstream().publish("llm.jobs.chat", _raw_job("rq1", "chat", "llm.reply.rq1"))
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    body = pull_request_body(group=PRIORITY_GROUP, expires_s=TIMEOUT_S)
    await nc.publish(next_subject("LLM_JOBS", "route_chat"), body, reply=inbox)
    delivered = await sub.next_msg(timeout=TIMEOUT_S)
    delivery = Delivery(delivered, ack_wait_s=30.0)
    job = Job(id="rq1", route="chat", messages=[Message(role="user", content="hi")],
              reply_to="llm.reply.rq1", deadline_ms=9_999_999_999_999)  # fmt: skip
    lossy = _PubAckLostOnce(nc.jetstream())
    await delivery.requeue(lossy, "b", job, remaining_s=10.0)  # type: ignore[arg-type]
    await delivery.ack()
    subjects: dict[str, int] = {}
    with anyio.fail_after(TIMEOUT_S):  # the server applies the ack on its own time
        while subjects != {"llm.requeue.b": 1}:
            info = await nc.jetstream().stream_info("LLM_JOBS", subjects_filter=">")
            subjects = dict(info.state.subjects or {})
            await anyio.sleep(0.02)
    assert lossy.calls == 2  # sent again after the lost PubAck: stored once, original acked
