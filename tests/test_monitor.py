"""`llmrelay monitor`: queue metrics read from JetStream, served over HTTP; the janitor."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import anyio
import httpx
import nats
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from broker import Job, Message, RelayClient, ensure_topology
from broker._dlq import iter_dead_letters
from broker._monitor import Monitor
from broker._protocol import decode_event, encode, now_ms
from devstack import MockProvider
from tests._harness import CLIENT_INBOX, mock_pool, relay_config, running_workers
from tests.test_cli_submit import CLI_TIMEOUT_S, LLMRELAY, write_config

ROUTES = {"chat": [("a", "gpt")]}


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels), via the Prometheus parser."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(url)).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def route(name: str) -> tuple[tuple[str, str], ...]:
    return (("kind", "route"), ("queue", name))


def raw_job(rid: str, route_name: str) -> Job:
    return Job(
        id=rid,
        route=route_name,
        messages=[Message(role="user", content="hi")],
        reply_to=f"llm.reply.{rid}",
        deadline_ms=now_ms() + 30_000,
    )


async def test_monitor_serves_queue_state_from_jetstream(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="mock-a", tokens=2) as mock:
        cfg = relay_config({"a": mock_pool(mock.url)}, ROUTES, streams={"queue_capacity": 50})
        await ensure_topology(nc, cfg)
        await nc.jetstream().publish("llm.dlq.chat", encode({"code": "internal"}))
        mon = Monitor(nc, cfg)
        url = f"http://127.0.0.1:{mon.serve(0)}/metrics"
        try:
            async with RelayClient(client_url) as relay:
                handles = [await relay.submit(f"q{i}", route="chat") for i in range(3)]
                await mon.tick()  # no worker yet: three jobs wait
                backlog = await scrape(url)
                async with running_workers(cfg, ["a"], worker_url):
                    for h in handles:
                        await h.text()
                    with anyio.fail_after(10):  # until the worker's heartbeat is written
                        while not (await mon.tick()).pools[0].live_workers:  # type: ignore[union-attr]
                            await anyio.sleep(0.05)
                    served = await scrape(url)
        finally:
            mon.close()
    assert backlog["llmrelay_queue_depth", route("chat")] == 3
    assert 0 < backlog["llmrelay_queue_oldest_job_age_seconds", route("chat")] < 10
    assert backlog["llmrelay_queue_ack_pending", route("chat")] == 0
    assert backlog["llmrelay_queue_capacity", route("chat")] == 50
    assert backlog["llmrelay_queue_depth", (("kind", "pool"), ("queue", "a"))] == 0
    assert backlog["llmrelay_dlq_depth", (("route", "chat"),)] == 1
    assert backlog["llmrelay_workers_live", (("pool", "a"),)] == 0
    assert backlog["llmrelay_monitor_up", ()] == 1
    assert served["llmrelay_queue_depth", route("chat")] == 0
    assert served["llmrelay_queue_oldest_job_age_seconds", route("chat")] == 0
    assert served["llmrelay_workers_live", (("pool", "a"),)] == 1
    assert served["llmrelay_pool_slots", (("pool", "a"),)] == 16
    assert served["llmrelay_pool_circuit_workers", (("pool", "a"), ("state", "closed"))] == 1


async def strand(nc: NATS) -> None:
    """The operator removes route ``ghost`` and pool ``nopool`` while jobs wait on them.

    The stream stops taking their subjects (a new publish fails at once), and once
    their consumers are deleted nothing would ever read the jobs left behind.
    """
    await ensure_topology(nc, relay_config({"a": mock_pool("http://127.0.0.1:9")}, ROUTES))
    for consumer in ("route_ghost", "pool_nopool"):
        await nc.jetstream().delete_consumer("LLM_JOBS", consumer)


BEFORE = relay_config(
    {"a": mock_pool("http://127.0.0.1:9"), "nopool": mock_pool("http://127.0.0.1:9")},
    {**ROUTES, "ghost": [("a", "gpt")]},
)


async def test_janitor_answers_and_dead_letters_jobs_for_unknown_routes(
    nc: NATS, client_url: str
) -> None:
    await ensure_topology(nc, BEFORE)
    client = await nats.connect(client_url, inbox_prefix=CLIENT_INBOX)
    replies = await client.subscribe("llm.reply.>")
    cjs = client.jetstream()  # a raw NATS client, not the library
    await cjs.publish("llm.jobs.ghost", encode(raw_job("r1", "ghost")))
    await cjs.publish("llm.jobs.ghost", b"not a job")
    await cjs.publish("llm.pool.nopool", encode(raw_job("r2", "chat")))
    await cjs.publish("llm.jobs.chat", encode(raw_job("r3", "chat")))  # a real route: kept
    await strand(nc)
    mon = Monitor(nc, grace_s=0)
    first = await mon.tick()
    answers = [await replies.next_msg(timeout=5) for _ in range(2)]
    second = await mon.tick()
    letters = [e async for e in iter_dead_letters(nc)]
    jobs = await nc.jetstream().stream_info("LLM_JOBS", subjects_filter=">")
    await client.close()
    assert first is not None and second is not None
    assert [(s.subject, s.jobs) for s in first.stray] == [
        ("llm.jobs.ghost", 2),
        ("llm.pool.nopool", 1),
    ]
    assert second.stray == []
    by_subject = {m.subject: decode_event(m.data) for m in answers}
    assert by_subject["llm.reply.r1"].code == "unknown_route"  # type: ignore[union-attr]
    assert by_subject["llm.reply.r1"].message == (  # type: ignore[union-attr]
        "no route named 'ghost' is configured on this broker"
    )
    assert by_subject["llm.reply.r2"].message == (  # type: ignore[union-attr]
        "no pool named 'nopool' is configured on this broker"
    )
    summary = [
        (e.route, e.letter.code, e.letter.job.id if e.letter.job else e.letter.raw)
        for e in letters
        if e.letter is not None
    ]
    assert summary == [
        ("ghost", "unknown_route", "r1"),
        ("ghost", "unknown_route", "not a job"),
        ("chat", "unknown_route", "r2"),
    ]
    assert jobs.state.subjects == {"llm.jobs.chat": 1}
    assert _sample(mon, "llmrelay_janitor_jobs_total") == 3


async def test_janitor_leaves_young_jobs_alone(nc: NATS) -> None:
    await ensure_topology(nc, BEFORE)
    await nc.jetstream().publish("llm.jobs.ghost", encode(raw_job("r1", "ghost")))
    await strand(nc)
    mon = Monitor(nc, grace_s=60)
    status = await mon.tick()
    assert status is not None and [s.jobs for s in status.stray] == [1]
    assert (await nc.jetstream().stream_info("LLM_DLQ")).state.messages == 0
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 1


async def test_monitor_command_serves_metrics_until_ctrl_c(worker_url: str, tmp_path: Any) -> None:
    cfg_file = write_config(tmp_path, {"a": mock_pool("http://127.0.0.1:9")}, ROUTES)
    proc = await asyncio.create_subprocess_exec(
        str(LLMRELAY), "monitor", "--port", "0", "--interval", "0.2", "-c", str(cfg_file),
        "--nats-url", worker_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(CLI_TIMEOUT_S):
        line = (await proc.stdout.readline()).decode()
        url = line.split(" metrics on ")[1].split()[0]
        samples = await scrape(url)
        proc.send_signal(signal.SIGINT)
        await proc.wait()
    assert line.startswith("llmrelay monitor: metrics on http://127.0.0.1:")
    # The monitor created the topology from the config: route chat is there, empty.
    assert samples["llmrelay_queue_depth", route("chat")] == 0
    assert samples["llmrelay_monitor_up", ()] == 1
    assert proc.returncode == 0


def _sample(mon: Monitor, name: str) -> float:
    for family in mon.metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"no sample {name}")
