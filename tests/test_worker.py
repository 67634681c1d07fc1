"""Worker pools end to end: real nats-server, real workers, real HTTP to fake providers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import yaml
from nats.aio.client import Client as NATS

from broker import Chunk, Done, Error, Notice, RelayClient
from broker._protocol import decode_dead_letter
from devstack import MockProvider, expected_answer
from tests._harness import StartStack, folded, running_workers, upstream

CHAT = {"chat": [("a", "m")]}


async def collect(handle: Any) -> list[Any]:
    return [event async for event in handle.events()]


async def wait_until(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll a condition that has no event to await (an external process's state)."""
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.01)


async def test_200_concurrent_streams_arrive_complete_and_in_order(
    relay_stack: StartStack,
) -> None:
    mock = MockProvider(name="mock-a", tokens=12, token_delay_ms=1)
    async with relay_stack({"a": upstream(mock, concurrency=16)}, CHAT) as s:
        handles = [await s.relay.submit(f"question {i}", route="chat") for i in range(200)]
        results = await _collect_all(handles)
    expected = expected_answer("mock-a", 12)
    assert len(results) == 200
    for events in results.values():
        chunks = [e for e in events if isinstance(e, Chunk)]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert "".join(c.delta for c in chunks) == expected
        assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens == 12
    assert mock.stats()["peak_concurrency"] <= 16


async def _collect_all(handles: list[Any]) -> dict[str, list[Any]]:
    """Every handle's events, read concurrently, by request id."""
    results: dict[str, list[Any]] = {}

    async def run(h: Any) -> None:
        results[h.id] = await collect(h)

    async with anyio.create_task_group() as tg:
        for h in handles:
            tg.start_soon(run, h)
    return results


async def test_provider_never_sees_more_concurrency_than_slots(relay_stack: StartStack) -> None:
    mock = MockProvider(name="p", tokens=5, token_delay_ms=10)
    async with relay_stack({"a": upstream(mock, concurrency=4)}, CHAT) as s:
        handles = [await s.relay.submit(f"q{i}", route="chat") for i in range(40)]
        texts = [await h.text() for h in handles]
    assert texts == [expected_answer("p", 5)] * 40
    stats = mock.stats()
    assert stats["requests"] == 40
    # Saturated, never more than the slots. One slot always listens on the pool's
    # own subject (failovers), so route traffic alone fills the other three.
    assert stats["peak_concurrency"] == 3


@pytest.mark.slow
async def test_connection_reuse_over_1000_requests(relay_stack: StartStack) -> None:
    mock = MockProvider(name="p", tokens=3)
    async with relay_stack({"a": upstream(mock, concurrency=16)}, CHAT) as s:
        done = await _ask_many(s.relay, 1000, at_once=64)
    stats = mock.stats()
    assert len(done) == 1000 and stats["requests"] == 1000
    reuse = 1 - stats["connections"] / stats["requests"]
    assert reuse >= 0.98, stats["connections"]


async def _ask_many(relay: RelayClient, n: int, *, at_once: int) -> list[str]:
    """``n`` answers to route `chat`, at most ``at_once`` requests in flight."""
    sem = anyio.Semaphore(at_once)
    done: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            h = await relay.submit(f"q{i}", route="chat")
            done.append(await h.text())

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return done


async def test_requests_per_minute_limit_holds(relay_stack: StartStack) -> None:
    rpm = 1200  # 20 requests/s
    mock = MockProvider(name="p", tokens=2)
    async with relay_stack({"a": upstream(mock, concurrency=16, rpm=rpm)}, CHAT) as s:
        handles = [await s.relay.submit(f"q{i}", route="chat") for i in range(50)]
        for h in handles:
            await h.text()
    times = sorted(entry["t"] for entry in mock.stats()["log"])
    assert len(times) == 50
    per_s = rpm / 60
    for i, start in enumerate(times):  # no window of any length exceeds rate * length + burst
        for j in range(i + 1, len(times)):
            assert j - i + 1 <= per_s * (times[j] - start) + 2, (i, j, times[j] - start)
    assert times[-1] - times[0] >= (50 - 2) / per_s * 0.9


async def test_two_workers_of_one_pool_share_load_and_limit(relay_stack: StartStack) -> None:
    mock = MockProvider(name="p", tokens=3, token_delay_ms=5)
    async with relay_stack({"a": upstream(mock, concurrency=2)}, CHAT, workers=["a", "a"]) as s:
        await wait_until(lambda: all(len(w.peers) == 2 for w in s.workers), what="peers")
        handles = [await s.relay.submit(f"q{i}", route="chat") for i in range(30)]
        for h in handles:
            await h.text()
        assert [w.budget.share for w in s.workers] == [2, 2]
        served = [_samples(w, "llmrelay_requests_total") for w in s.workers]
    assert sum(served) == 30
    assert min(served) >= 5, served
    assert mock.stats()["peak_concurrency"] <= 4


def _samples(worker: Any, name: str) -> float:
    total = 0.0
    for metric in worker.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


async def test_cancel_stops_the_upstream_stream(relay_stack: StartStack) -> None:
    mock = MockProvider(name="p", tokens=200, token_delay_ms=50)
    async with relay_stack({"a": upstream(mock)}, CHAT) as s:
        handle = await s.relay.submit("long story", route="chat")
        events = handle.events()
        first = await anext(events)
        assert isinstance(first, Chunk)
        assert mock.stats()["active"] == 1
        await handle.cancel()
        rest = [e async for e in events]
        await wait_until(lambda: mock.stats()["active"] == 0, timeout_s=2.0)
    assert isinstance(rest[-1], Error) and rest[-1].code == "cancelled"
    assert sum(isinstance(e, Chunk) for e in rest) < 50


@pytest.mark.parametrize("provider_kind", ["openai", "anthropic", "ollama"])
async def test_each_adapter_through_the_broker(provider_kind: str, relay_stack: StartStack) -> None:
    kind = provider_kind
    mock = MockProvider(name=f"{kind}-fake", tokens=6)
    async with relay_stack({"p": upstream(mock, kind)}, {"chat": [("p", "some-model")]}) as s:
        handle = await s.relay.submit("hi", route="chat", system="be brief")
        text = await handle.text()
    assert text == expected_answer(f"{kind}-fake", 6)
    assert handle.done is not None
    assert (handle.done.pool, handle.done.model) == ("p", "some-model")
    assert handle.done.usage.completion_tokens == 6
    assert mock.stats()["by_model"] == {"some-model": 1}


async def test_malformed_job_is_answered_and_dead_lettered(
    nc: NATS, relay_stack: StartStack
) -> None:
    mock = MockProvider(name="p", tokens=2)
    async with relay_stack({"a": upstream(mock)}, CHAT) as s:
        sub = await nc.subscribe("llm.reply.bad-1")
        bad = {
            "id": "bad-1",
            "route": "chat",
            "reply_to": "llm.reply.bad-1",
            "messages": "oops",
        }
        await nc.jetstream().publish("llm.jobs.chat", json.dumps(bad).encode())
        reply = msgspec.json.decode((await sub.next_msg(timeout=5)).data)
        await nc.jetstream().publish("llm.jobs.chat", b"\x00 not json at all")
        # The worker survives both and still serves.
        assert await (await s.relay.submit("fine", route="chat")).text() == expected_answer("p", 2)
    assert (
        reply["type"] == "error"
        and reply["code"] == "invalid_job"
        and "messages" in reply["message"]
    )
    dlq = await nc.jetstream().stream_info("LLM_DLQ", subjects_filter=">")
    assert dlq.state.subjects == {"llm.dlq.chat": 1, "llm.dlq._invalid": 1}
    first = await nc.jetstream().get_last_msg("LLM_DLQ", "llm.dlq.chat")
    assert decode_dead_letter(first.data or b"").code == "invalid_job"
    assert mock.stats()["requests"] == 1


async def test_expired_job_is_answered_without_calling_upstream(
    nc: NATS, relay_stack: StartStack
) -> None:
    mock = MockProvider(name="p", tokens=2)
    async with relay_stack({"a": upstream(mock)}, CHAT) as s:
        job = msgspec.structs.replace(s.relay.build_job("too late", route="chat"), deadline_ms=1)
        sub = await nc.subscribe(job.reply_to)
        await nc.jetstream().publish("llm.jobs.chat", msgspec.json.encode(job))
        reply = msgspec.json.decode((await sub.next_msg(timeout=5)).data)
    assert reply["type"] == "error" and reply["code"] == "deadline_exceeded"
    assert mock.stats()["requests"] == 0


def _write_config(path: Path, cfg_doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg_doc))
    return path


async def test_sigkill_mid_stream_redelivers_and_the_answer_is_continued(
    relay_stack: StartStack, worker_url: str, tmp_path: Path
) -> None:
    mock = MockProvider(name="p", tokens=30, token_delay_ms=30)
    async with relay_stack({"a": upstream(mock, ack_wait_s=1.0)}, CHAT, workers=[]) as s:
        routes = {"chat": {"targets": [{"pool": "a", "model": "m"}]}}
        cfg_path = _write_config(tmp_path / "relay.yaml", {"pools": s.pools, "routes": routes})
        proc = _spawn_worker(cfg_path, "a", worker_url)
        try:
            handle = await s.relay.submit("story", route="chat", timeout_s=30)
            events = handle.events()
            first = await anext(events)
            assert isinstance(first, Chunk) and first.attempt == 1
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            async with running_workers(s.config, ["a"], worker_url):
                rest = [e async for e in events]
        finally:
            if proc.poll() is None:
                proc.kill()
    # The redelivery read back what the killed worker had sent (LLM_REPLIES) and
    # continued from there: one answer, nothing repeated.
    notices = [e for e in rest if isinstance(e, Notice)]
    assert notices and notices[0].kind == "redelivered" and notices[0].resume
    assert not any(n.reset for n in notices)
    assert folded([first, *rest]).text == expected_answer("p", 30)
    assert isinstance(rest[-1], Done)
    assert mock.stats()["requests"] == 2 and mock.stats()["prefills"] == 1


def _spawn_worker(cfg_path: Path, pool: str, nats_url: str) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "llmrelay"
    proc = subprocess.Popen(
        [str(exe), "worker", "--pool", pool, "--config", str(cfg_path), "--nats-url", nats_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()  # "... worker <id> serving pool a with N slots"
    assert "serving pool" in line, line
    return proc


async def test_a_client_cannot_read_jobs_pulled_by_workers(
    relay_stack: StartStack, client_url: str
) -> None:
    import nats

    snoop = await nats.connect(client_url)  # clients may subscribe to _INBOX.> (PubAcks)
    seen: list[bytes] = []

    async def record(msg: Any) -> None:
        seen.append(msg.data)

    await snoop.subscribe("_INBOX.>", cb=record)
    await snoop.flush()
    async with relay_stack({"a": upstream(MockProvider(name="p", tokens=2))}, CHAT) as s:
        text = await (await s.relay.submit("TOP-SECRET prompt", route="chat")).text()
    await snoop.flush()
    await snoop.close()
    assert text == expected_answer("p", 2)
    assert not any(b"TOP-SECRET" in data for data in seen)


async def test_long_stream_outlives_ack_wait_without_redelivery(relay_stack: StartStack) -> None:
    mock = MockProvider(name="p", tokens=25, token_delay_ms=100)  # ~2.5 s stream
    async with relay_stack({"a": upstream(mock, ack_wait_s=1.0)}, CHAT, workers=["a", "a"]) as s:
        handle = await s.relay.submit("long", route="chat")
        events = await collect(handle)
    assert not any(isinstance(e, Notice) for e in events)  # never redelivered
    assert isinstance(events[-1], Done) and events[-1].attempt == 1
    assert mock.stats()["requests"] == 1


async def test_no_route_starves_when_slots_are_fewer_than_routes(relay_stack: StartStack) -> None:
    mock = MockProvider(name="p", tokens=2)
    routes = {"first": [("a", "m1")], "second": [("a", "m2")], "third": [("a", "m3")]}
    async with relay_stack({"a": upstream(mock, concurrency=2)}, routes) as s:
        texts = []
        for route in ("third", "second", "first", "third"):
            handle = await s.relay.submit("hi", route=route, timeout_s=15)
            texts.append(await handle.text())
    assert texts == [expected_answer("p", 2)] * 4
    assert mock.stats()["by_model"] == {"m1": 1, "m2": 1, "m3": 2}
