"""Chaos on a real 3-node JetStream cluster, under a load that counts every job.

The load is open-loop and bounded (``JOBS`` jobs at ``RATE_PER_S``, then it
stops by itself): a client and two workers that were given every node's URL,
a fake provider that streams each answer over ~200 ms, so jobs are in flight
when the fault hits. An observer connected to a node that is not harmed counts
every final event (``done``/``error``) published on ``llm.reply.>`` per job.
A test fails if one job is lost (no final, or a caller without the whole
answer, other than one told to retry because replies died with the node) or
answered twice by one attempt (a redelivery after a lost ack and done answers
again under a newer attempt: the caller's fold keeps the first final).

Each test prints what it measured (``pytest -s`` shows it): the time to a new
leader, and the callers who waited longer than usual.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker import (
    BrokerUnavailable,
    Done,
    Error,
    Job,
    RelayClient,
    RelayError,
    UnknownRoute,
    ensure_topology,
)
from broker._cluster import NatsCluster
from broker._errors import JetStreamApiError
from broker._jsapi import api_request, consumer_info
from broker._nats import connect_nats
from broker._protocol import decode_event
from broker._server import CLIENT_USER, WORKER_USER
from devstack import MockProvider, expected_answer
from tests._cluster import (
    R3,
    connect_worker,
    connected_port,
    lead_elsewhere,
    leaders_seen,
    local_cluster,
    node_serving,
    paused,
    stream_leader,
    wait_for_new_leader,
    wait_until_current,
    wipe,
)
from tests._harness import NatsUrls, running_workers, start_stack, upstream
from workers._worker import Worker

JOBS = 200
RATE_PER_S = 50.0
KILL_AT_JOB = 50
TOKENS = 10
TOKEN_DELAY_MS = 20.0
JOB_TIMEOUT_S = 30.0
# A caller "waited longer than usual" past this (an answer takes ~0.2 s).
SLOW_S = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with local_cluster(tmp_path_factory) as running:
        yield running


@pytest.fixture
async def nc(cluster: NatsCluster) -> AsyncIterator[NATS]:
    conn = await connect_worker(cluster)
    await wipe(conn, cluster)
    yield conn
    await conn.close()


async def test_a_connection_moves_to_another_node_when_its_node_dies(
    cluster: NatsCluster, nc: NATS
) -> None:
    """Given one node's URL only, a connection learns the others from the server and
    authenticates there (the URL's credentials are not lost on the way)."""
    reconnected = anyio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    first = cluster.node("n1")
    conn = await connect_nats(
        first.url_for(WORKER_USER), name="chaos-reconnect", reconnected=on_reconnect
    )
    try:
        assert connected_port(conn) == first.port
        await anyio.to_thread.run_sync(cluster.kill, "n1")
        with anyio.fail_after(15):
            await reconnected.wait()
        assert connected_port(conn) in {cluster.node(n).port for n in ("n2", "n3")}
        sub = await conn.subscribe("chaos.echo")  # authenticated there, and served
        await conn.publish("chaos.echo", b"still here")
        assert (await sub.next_msg(timeout=5)).data == b"still here"
    finally:
        await conn.close()
        await anyio.to_thread.run_sync(cluster.restart, "n1")


# --- SIGKILL of the jobs stream's leader ------------------------------------------


@dataclass
class FinalCounter:
    """Counts the final events (done/error) each job's reply subject carries."""

    finals: Counter[str] = field(default_factory=Counter)
    seen: dict[str, list[str]] = field(default_factory=dict)
    # Each job's distinct finals: (attempt, bytes). A final sent again because its
    # PubAck was lost in an election is the same bytes, and counts once.
    final_attempts: dict[str, set[tuple[int, bytes]]] = field(default_factory=dict)

    async def on_reply(self, msg: Msg) -> None:
        rid = msg.subject.rpartition(".")[2]
        event = decode_event(msg.data)
        if isinstance(event, Done | Error):
            self.finals[rid] += 1
            self.final_attempts.setdefault(rid, set()).add((event.attempt, msg.data))
        step = getattr(event, "seq", getattr(event, "kind", ""))
        self.seen.setdefault(rid, []).append(f"{type(event).__name__}{step}@{event.attempt}")


@dataclass
class Outcome:
    text: str = ""
    error: str = ""
    waited_s: float = 0.0
    submits: int = 0
    accepted: bool = False  # its publish was acknowledged


@dataclass
class Load:
    """The open-loop load: one caller per job, each recording what it got."""

    relay: RelayClient
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    async def run(self, jobs: int, rate_per_s: float, at_kill: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            start = anyio.current_time()
            for i in range(jobs):
                await anyio.sleep_until(start + i / rate_per_s)
                job = self.relay.build_job(f"q{i}", route="chat", timeout_s=JOB_TIMEOUT_S)
                self.outcomes[job.id] = Outcome()
                tg.start_soon(self.call, job)
                if i == KILL_AT_JOB:
                    at_kill.set()

    async def call(self, job: Job) -> None:
        outcome = self.outcomes[job.id]
        start = time.monotonic()
        try:
            handle = await self.submit(job, outcome)
            outcome.accepted = True
            outcome.text = await handle.text()
        except RelayError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.waited_s = time.monotonic() - start

    async def submit(self, job: Job, outcome: Outcome) -> object:
        """Submit; when NATS could not take it now, submit the same job again (its
        Nats-Msg-Id makes a second job impossible) as any caller should."""
        while True:
            outcome.submits += 1
            try:
                return await self.relay.submit_job(job, retry=outcome.submits > 1)
            except (BrokerUnavailable, UnknownRoute):
                # UnknownRoute: "no responders" while the stream has no leader.
                if time.time() * 1000 > job.deadline_ms:
                    raise
                await anyio.sleep(0.1)


@dataclass
class Failover:
    killed: str = ""
    new_leader: str = ""
    leader_after_s: float = 0.0
    fault: str = "SIGKILL"
    role: str = "LLM_JOBS leader"  # what the harmed node was, for the report
    in_flight: int = 0  # jobs the worker was running when its node was killed
    moved_to: str = ""  # the node the worker reconnected to
    reconnect_s: float = 0.0


Fault = Callable[[NatsCluster, NATS, anyio.Event, Failover], Awaitable[None]]


async def _kill_leader_then_restart(
    cluster: NatsCluster, observer: NATS, at_kill: anyio.Event, failover: Failover
) -> None:
    await at_kill.wait()
    await anyio.to_thread.run_sync(cluster.kill, failover.killed)
    failover.new_leader, failover.leader_after_s = await wait_for_new_leader(
        observer, "LLM_JOBS", failover.killed
    )
    await anyio.to_thread.run_sync(cluster.restart, failover.killed)


async def _pause_leader_until_replaced(
    cluster: NatsCluster, observer: NATS, at_kill: anyio.Event, failover: Failover
) -> None:
    """SIGSTOP the leader's node until the others elected a new leader (past every
    Raft timeout, its clients' sockets still open), then SIGCONT it."""
    await at_kill.wait()
    with paused(cluster, failover.killed):
        failover.new_leader, failover.leader_after_s = await wait_for_new_leader(
            observer, "LLM_JOBS", failover.killed
        )


async def _settled(
    observer: NATS, workers: Sequence[Worker], counter: FinalCounter, jobs: int = JOBS
) -> None:
    """Until no job is queued or in flight (so no further final can come), then until
    the observer has seen what was sent before."""
    with anyio.fail_after(30):
        while True:
            info = await consumer_info(observer, "LLM_JOBS", "route_chat")
            pool = await consumer_info(observer, "LLM_JOBS", "pool_a")
            busy = [c[k] for c in (info, pool) for k in ("num_pending", "num_ack_pending")]
            if not any(busy):
                break
            await anyio.sleep(0.05)
        for worker in workers:
            await worker.nc.flush()
        await observer.flush()
        while sum(counter.finals.values()) < jobs:
            await anyio.sleep(0.05)


@dataclass
class Run:
    """What one load under a fault left: the fault's timings, the callers, the wire."""

    failover: Failover
    load: Load
    counter: FinalCounter


async def _load_under_fault(cluster: NatsCluster, nc: NATS, fault: Fault, name: str) -> Run:
    """The load of two workers, ``fault`` striking the LLM_JOBS leader's node."""
    mock = MockProvider(name="p", tokens=TOKENS, token_delay_ms=TOKEN_DELAY_MS)
    pools = {"a": upstream(mock, concurrency=8, ack_wait_s=2.0)}
    urls = NatsUrls(cluster.urls_for(WORKER_USER), cluster.urls_for(CLIENT_USER))
    async with start_stack(urls, pools, {"chat": [("a", "gpt")]}, workers=["a", "a"],
                           streams=R3) as stack:  # fmt: skip
        await wait_until_current(nc)
        failover = Failover(killed=await stream_leader(nc, "LLM_JOBS"), fault=name)
        return await _counted_load(cluster, stack.relay, stack.workers, fault, failover)


async def _counted_load(
    cluster: NatsCluster,
    relay: RelayClient,
    workers: list[Worker],
    fault: Fault,
    failover: Failover,
) -> Run:
    """The load through ``relay``, ``fault`` striking ``failover.killed`` at job KILL_AT_JOB,
    counted by an observer on another node until every job has settled."""
    survivor = next(n.server_name for n in cluster.nodes if n.server_name != failover.killed)
    observer = await connect_worker(cluster, survivor)
    counter = FinalCounter()
    await observer.subscribe("llm.reply.>", cb=counter.on_reply, pending_msgs_limit=-1)
    load, at_kill = Load(relay), anyio.Event()
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fault, cluster, observer, at_kill, failover)
                await load.run(JOBS, RATE_PER_S, at_kill)
            await _settled(observer, workers, counter)
    finally:
        await observer.close()
    _report(failover, load)
    return Run(failover, load, counter)


def _check_each_job_answered_once(run: Run) -> None:
    """No job without a final, never two finals of one attempt, and every caller with
    the whole answer or told to retry."""
    counter, load = run.counter, run.load
    # A job whose ack and done were both lost with the node is answered again by its
    # redelivery, under a newer attempt id: on the wire two finals, to a caller one (a
    # fold keeps the first final; RELIABILITY.md). Never two of one attempt.
    finals = counter.final_attempts
    twice = {rid: counter.seen[rid] for rid, distinct in finals.items()
             if len(distinct) > len({attempt for attempt, _ in distinct})}  # fmt: skip
    assert not twice, f"jobs answered twice by one attempt: {twice}"
    again = sum(1 for distinct in finals.values() if len({a for a, _ in distinct}) > 1)
    print(f"chaos: {again} jobs answered again by a redelivery (one final to each caller)")
    unanswered = set(load.outcomes) - set(counter.finals)
    assert not unanswered, f"jobs without a final event: {unanswered}"
    expected = expected_answer("p", TOKENS)
    # A chunk published into the dying node's socket, and not stored (LLM_REPLIES was
    # electing its leader), is gone: that caller is told to retry (stream_interrupted,
    # retryable), never handed an answer with a hole.
    told_to_retry = [o for o in load.outcomes.values() if "stream_interrupted" in o.error]
    failed = {
        rid: (o.error or o.text, o.submits, counter.seen.get(rid))
        for rid, o in load.outcomes.items()
        if o.text != expected and "stream_interrupted" not in o.error
    }
    assert not failed, f"{len(failed)} callers without their answer: {list(failed.items())[:5]}"
    print(f"chaos: {len(told_to_retry)} callers told to retry (replies lost with the node)")


@pytest.mark.slow
async def test_sigkill_of_the_jobs_leader_loses_no_job_and_answers_each_once(
    cluster: NatsCluster, nc: NATS
) -> None:
    run = await _load_under_fault(cluster, nc, _kill_leader_then_restart, "SIGKILL")
    assert run.failover.new_leader and run.failover.new_leader != run.failover.killed
    _check_each_job_answered_once(run)


# --- a partitioned node: the leader's node SIGSTOPped, not killed --------------------


@pytest.mark.slow
async def test_a_paused_leader_node_makes_no_split_brain_and_rejoins_as_a_follower(
    cluster: NatsCluster, nc: NATS
) -> None:
    """The stopped leader's node keeps its sockets and, on SIGCONT, still believes it
    leads: nothing it does then may answer a job twice or lose one."""
    run = await _load_under_fault(cluster, nc, _pause_leader_until_replaced, "SIGSTOP")
    paused_node, new_leader = run.failover.killed, run.failover.new_leader
    assert new_leader and new_leader != paused_node
    _check_each_job_answered_once(run)
    await wait_until_current(nc, ["LLM_JOBS"])
    info = await nc.jetstream().stream_info("LLM_JOBS")
    assert info.cluster is not None
    followers = {peer.name for peer in info.cluster.replicas or []}
    assert info.cluster.leader != paused_node and paused_node in followers, info.cluster
    # Every node, the resumed one too, names that one leader.
    with anyio.fail_after(10):
        while set((await anyio.to_thread.run_sync(leaders_seen, cluster, "LLM_JOBS")).values()) != {
            info.cluster.leader
        }:
            await anyio.sleep(0.05)


# --- SIGKILL of the node a worker is connected to, its jobs in flight ------------------


async def _kill_workers_node_then_restart(
    worker: Worker, cluster: NatsCluster, observer: NATS, at_kill: anyio.Event, f: Failover
) -> None:
    """SIGKILL the worker's node mid-answers; once the worker is connected to another
    node (polled under a deadline), start the killed node again."""
    await at_kill.wait()
    f.in_flight = len(worker.running)
    await anyio.to_thread.run_sync(cluster.kill, f.killed)
    start, killed_port = time.monotonic(), cluster.node(f.killed).port
    with anyio.fail_after(15):
        while not worker.nc.is_connected or connected_port(worker.nc) == killed_port:
            await anyio.sleep(0.005)
    f.reconnect_s = time.monotonic() - start
    f.moved_to = next(n.server_name or "" for n in cluster.nodes
                      if n.port == connected_port(worker.nc))  # fmt: skip
    await anyio.to_thread.run_sync(cluster.restart, f.killed)


@pytest.mark.slow
async def test_sigkill_of_a_workers_node_with_jobs_in_flight_loses_none_and_mixes_no_attempts(
    cluster: NatsCluster, nc: NATS
) -> None:
    """The node killed is the one the (only) worker is connected to, found by its
    connection's name in /connz, and it leads nothing: every llmrelay stream and
    LLM_JOBS consumer it led was handed to another node first. So this is the
    worker's connection dying with its jobs in flight, not an election (that is the
    leader-kill test). The worker was given every node's URL; the client and the
    observer are on the other nodes. Each job in flight then is finished by the
    worker (what it wrote while cut off is sent once it is connected again) or,
    its lease lapsed, redelivered; each caller gets the provider's whole answer or
    is told to retry, never a mix of two attempts."""
    mock = MockProvider(name="p", tokens=TOKENS, token_delay_ms=TOKEN_DELAY_MS)
    pools = {"a": upstream(mock, concurrency=32, ack_wait_s=2.0)}
    urls = NatsUrls(cluster.urls_for(WORKER_USER), cluster.urls_for(CLIENT_USER))
    async with start_stack(urls, pools, {"chat": [("a", "gpt")]}, workers=["a"],
                           streams=R3, relay=None) as stack:  # fmt: skip
        await wait_until_current(nc)
        (worker,) = stack.workers
        node = await anyio.to_thread.run_sync(node_serving, cluster, "llmrelay-worker-a")
        assert cluster.node(node).port == connected_port(worker.nc)
        others = [n.server_name or "" for n in cluster.nodes if n.server_name != node]
        moved = await lead_elsewhere(nc, node, others[0])
        print(f"\nchaos: the worker is on {node}; leaders moved from it to {others[0]}: {moved}")
        client_urls = ",".join(cluster.node(n).url_for(CLIENT_USER) for n in others)
        failover = Failover(killed=node, role="the worker's node, leading nothing")
        fault = partial(_kill_workers_node_then_restart, worker)
        async with RelayClient(client_urls, config=stack.config) as relay:
            run = await _counted_load(cluster, relay, stack.workers, fault, failover)
    assert failover.in_flight > 0, "no job was in flight when the worker's node died"
    assert failover.moved_to in others
    _check_each_job_answered_once(run)


@pytest.mark.slow
async def test_a_consumer_leader_change_hands_the_new_leader_every_pull_of_the_worker(
    cluster: NatsCluster, nc: NATS
) -> None:
    """The old leader ends the pulls waiting there with one 409 per reply subject, and
    a worker's pulls on one consumer share an inbox: that one 409 ends them all, and
    the worker pulls again at the new leader for every free slot. (It used to count
    the rest as waiting until they were written off, expiry + 2 s = 12 s later,
    serving the route with one pull meanwhile.)"""
    mock = MockProvider(name="p", tokens=TOKENS, token_delay_ms=TOKEN_DELAY_MS)
    pools = {"a": upstream(mock, concurrency=8)}
    urls = NatsUrls(cluster.urls_for(WORKER_USER), cluster.urls_for(CLIENT_USER))
    route_pulls = 7  # every slot but the one pulling the pool's own subject
    async with start_stack(urls, pools, {"chat": [("a", "gpt")]}, streams=R3) as stack:
        await wait_until_current(nc)
        leader = await _waiting_pulls(nc, route_pulls)
        other = next(n.server_name or "" for n in cluster.nodes if n.server_name != leader)
        assert "LLM_JOBS/route_chat" in await lead_elsewhere(nc, leader, other)
        assert await _waiting_pulls(nc, route_pulls, timeout_s=8.0) == other
        handles = [await stack.relay.submit(f"q{i}", route="chat") for i in range(route_pulls)]
        texts = [await h.text() for h in handles]
    assert texts == [expected_answer("p", TOKENS)] * route_pulls


async def _waiting_pulls(nc: NATS, pulls: int, *, timeout_s: float = 10.0) -> str:
    """Until route_chat has ``pulls`` pulls waiting at its leader; that leader."""
    subject = "$JS.API.CONSUMER.INFO.LLM_JOBS.route_chat"
    with anyio.fail_after(timeout_s):
        while True:
            try:  # a consumer without a leader does not answer: ask again
                info = await api_request(nc, subject, {}, timeout_s=0.25)
            except JetStreamApiError:
                info = {}
            if info.get("num_waiting") == pulls:
                return str(info["cluster"]["leader"])
            await anyio.sleep(0.05)


# --- a full queue under a burst -------------------------------------------------------

CAPACITY = 20
BURST = 60


@pytest.mark.slow
async def test_a_burst_into_a_full_queue_is_refused_with_queue_full_and_the_rest_answered(
    cluster: NatsCluster, nc: NATS
) -> None:
    """No worker pulls while the burst lands, so exactly CAPACITY jobs fit; workers
    start once every publish has its answer (PubAck or refusal)."""
    mock = MockProvider(name="p", tokens=TOKENS, token_delay_ms=TOKEN_DELAY_MS)
    pools = {"a": upstream(mock, concurrency=8, ack_wait_s=2.0)}
    urls = NatsUrls(cluster.urls_for(WORKER_USER), cluster.urls_for(CLIENT_USER))
    streams = {**R3, "queue_capacity": CAPACITY}
    async with start_stack(urls, pools, {"chat": [("a", "gpt")]}, workers=[],
                           streams=streams) as stack:  # fmt: skip
        await ensure_topology(nc, stack.config)
        await wait_until_current(nc)
        counter = FinalCounter()
        await nc.subscribe("llm.reply.>", cb=counter.on_reply, pending_msgs_limit=-1)
        load = Load(stack.relay)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(load.run, BURST, math.inf, anyio.Event())
                while len(load.outcomes) < BURST or not all(
                    o.accepted or o.error for o in load.outcomes.values()
                ):
                    await anyio.sleep(0.01)
                burst_s = anyio.current_time()
                async with running_workers(stack.config, ["a", "a"], urls.worker) as workers:
                    await _settled(nc, workers, counter, jobs=CAPACITY)
    outcomes = load.outcomes.values()
    accepted = [o for o in outcomes if o.accepted]
    refused = [o for o in outcomes if not o.accepted]
    print(
        f"\nchaos: burst of {BURST} into a queue of {CAPACITY}: {len(accepted)} accepted, "
        f"{len(refused)} refused; last answer {anyio.current_time() - burst_s:.2f} s after"
    )
    assert len(accepted) + len(refused) == BURST
    assert all(o.error.startswith("QueueFull:") and o.submits == 1 for o in refused), {
        o.error for o in refused
    }
    assert len(accepted) == CAPACITY
    expected = expected_answer("p", TOKENS)
    assert all(o.text == expected and not o.error for o in accepted)
    answered = {rid for rid, o in load.outcomes.items() if o.accepted}
    assert set(counter.finals) == answered, "a final for a refused job, or none for a job"
    twice = {rid: counter.seen[rid] for rid, n in counter.finals.items() if n != 1}
    assert not twice, f"jobs answered more than once: {twice}"


def _report(failover: Failover, load: Load) -> None:
    waits = sorted(o.waited_s for o in load.outcomes.values())
    slow = [w for w in waits if w > SLOW_S]
    resubmitted = sum(1 for o in load.outcomes.values() if o.submits > 1)
    if failover.new_leader:
        after = f"new leader {failover.new_leader} after {failover.leader_after_s:.2f} s"
    else:
        after = (
            f"{failover.in_flight} jobs in flight; the worker reconnected to "
            f"{failover.moved_to} after {failover.reconnect_s:.3f} s"
        )
    print(
        f"\nchaos: {failover.fault} of {failover.killed} ({failover.role}) at job {KILL_AT_JOB} of "
        f"{JOBS} ({RATE_PER_S:g}/s): {after}; callers: p50 {statistics.median(waits):.3f} s, "
        f"max {waits[-1]:.2f} s, {len(slow)} waited > {SLOW_S:g} s, "
        f"{resubmitted} submitted again"
    )
