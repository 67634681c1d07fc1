"""`llmrelay monitor`: queue metrics from JetStream state, and a janitor.

Every ``interval_s`` the monitor takes one ``collect_status`` snapshot and
serves it on ``/metrics`` (its own registry; names in docs/operations.md):
queue depth, oldest job age, ack pending, redeliveries and capacity per route
and pool subject, DLQ depth per route, live workers, slots and circuit states
per pool (and per upstream model whose own circuit is not closed on some
worker), and each stream's replicas, leader and follower lag. A scrape reads
the latest snapshot; it never waits for NATS.

**Janitor.** A raw NATS client can publish a job to ``llm.jobs.<route>`` for a
route that does not exist (the client library refuses to). No consumer reads
that subject, so the job would sit there until its TTL and its client would wait
for nothing. The janitor answers every such job with ``error{unknown_route}`` on
its ``reply_to`` (only a plain ``llm.reply.`` subject), parks it in the DLQ and
deletes it from the job stream. Jobs younger than ``grace_s`` are left alone: a
route being created right now gets its consumer first. Any payload is survived
(``broker/_validate.decode_untrusted``: a job nested too deep for the decoder is
just not a job), and a payload that is not a job is parked as a bounded preview.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import Any

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker._config import Config
from broker._errors import InvalidJob, JetStreamApiError, RelayError
from broker._jsapi import api_request
from broker._nats import nats_errors
from broker._protocol import (
    DeadLetter,
    Error,
    Job,
    LifecycleEvent,
    encode,
    now_ms,
)
from broker._status import QueueStatus, Status, StatusReader, parse_time
from broker._subjects import (
    JOBS_PREFIX,
    JOBS_STREAM,
    POOL_PREFIX,
    dlq_subject,
    events_subject,
    is_valid_name,
    js_api,
)
from broker._validate import decode_untrusted, preview, reply_allowed

log = logging.getLogger("llmrelay.monitor")

INVALID_ROUTE = "_invalid"
# Jobs the janitor handles per sweep, so one flood cannot stall the metrics.
SWEEP_LIMIT = 1000
_ERR_NO_MESSAGE = 10037
_CIRCUIT_STATES = ("closed", "half_open", "open")


class StatusCollector(Collector):
    """Prometheus families built from the latest ``Status`` snapshot."""

    def __init__(self) -> None:
        self.status: Status | None = None

    def collect(self) -> Iterator[Metric]:
        status = self.status
        if status is None:
            return
        yield from _queue_families([*status.routes, *status.pools], status)
        yield from _pool_families(status)
        yield from _stream_families(status)
        dlq = GaugeMetricFamily(
            "llmrelay_dlq_depth", "Dead letters waiting in LLM_DLQ, by route", labels=["route"]
        )
        for route, count in status.dlq_by_route.items():
            dlq.add_metric([route], count)
        for r in status.routes:
            if r.name not in status.dlq_by_route:
                dlq.add_metric([r.name], 0)
        yield dlq
        stray = GaugeMetricFamily(
            "llmrelay_stray_jobs",
            "Jobs on subjects no consumer reads (unknown route or pool; the janitor clears them)",
        )
        stray.add_metric([], sum(s.jobs for s in status.stray))
        yield stray


def _queue_families(queues: list[QueueStatus], status: Status) -> Iterator[Metric]:
    labels = ["kind", "queue"]
    depth = GaugeMetricFamily(
        "llmrelay_queue_depth", "Jobs waiting, not yet delivered to a worker", labels=labels
    )
    pending = GaugeMetricFamily(
        "llmrelay_queue_ack_pending",
        "Jobs delivered to a worker and not yet answered (in flight)",
        labels=labels,
    )
    redelivered = GaugeMetricFamily(
        "llmrelay_queue_redelivered",
        "Jobs in flight that were delivered more than once",
        labels=labels,
    )
    capacity = GaugeMetricFamily(
        "llmrelay_queue_capacity",
        "Jobs a subject holds before publishes fail with queue_full",
        labels=labels,
    )
    oldest = GaugeMetricFamily(
        "llmrelay_queue_oldest_job_age_seconds",
        "Age of the oldest waiting job (0 when none waits)",
        labels=labels,
    )
    for q in queues:
        if not q.consumer:
            continue
        key = ["route" if q.subject.startswith(JOBS_PREFIX) else "pool", q.name]
        depth.add_metric(key, q.queue_depth)
        pending.add_metric(key, q.in_flight)
        redelivered.add_metric(key, q.redelivered)
        capacity.add_metric(key, q.capacity)
        if status.oldest_age_known:
            oldest.add_metric(key, q.oldest_job_age_s or 0.0)
    yield from (depth, pending, redelivered, capacity, oldest)


def _pool_families(status: Status) -> Iterator[Metric]:
    live = GaugeMetricFamily(
        "llmrelay_workers_live", "Workers with a live heartbeat", labels=["pool"]
    )
    slots = GaugeMetricFamily(
        "llmrelay_pool_slots", "Slots of the pool's live workers", labels=["pool"]
    )
    busy = GaugeMetricFamily(
        "llmrelay_pool_slots_busy", "Slots running a job (from heartbeats)", labels=["pool"]
    )
    circuit = GaugeMetricFamily(
        "llmrelay_pool_circuit_workers",
        "Live workers of the pool by circuit-breaker state",
        labels=["pool", "state"],
    )
    models = GaugeMetricFamily(
        "llmrelay_pool_model_circuit_workers",
        "Live workers of the pool whose circuit for one upstream model is half_open or open"
        " (only models not closed everywhere)",
        labels=["pool", "model", "state"],
    )
    for p in status.pools:
        live.add_metric([p.name], p.live_workers)
        slots.add_metric([p.name], p.slots_total)
        busy.add_metric([p.name], p.slots_busy)
        for state in _CIRCUIT_STATES:
            circuit.add_metric([p.name, state], p.circuit.get(state, 0))
        for model, states in p.model_circuits.items():
            for state in _CIRCUIT_STATES[1:]:
                models.add_metric([p.name, model, state], states.get(state, 0))
    yield from (live, slots, busy, circuit, models)


def _stream_families(status: Status) -> Iterator[Metric]:
    """Per stream: replicas configured and current, its leader, each follower's lag."""
    labels = ["stream"]
    replicas = GaugeMetricFamily(
        "llmrelay_stream_replicas", "Replicas the stream is configured with", labels=labels
    )
    current = GaugeMetricFamily(
        "llmrelay_stream_replicas_current",
        "Replicas holding everything: the leader and its current followers (0: no leader)",
        labels=labels,
    )
    has_leader = GaugeMetricFamily(
        "llmrelay_stream_has_leader", "1 if the stream has a leader now, else 0", labels=labels
    )
    leader = GaugeMetricFamily(
        "llmrelay_stream_leader_info",
        "1 for the server that leads the stream",
        labels=["stream", "server"],
    )
    lag = GaugeMetricFamily(
        "llmrelay_stream_replica_lag",
        "Operations a follower is behind the stream's leader",
        labels=["stream", "server"],
    )
    for s in status.streams:
        replicas.add_metric([s.name], s.replicas)
        current.add_metric([s.name], s.current_replicas)
        has_leader.add_metric([s.name], 1 if s.leader else 0)
        if s.leader:
            leader.add_metric([s.name, s.leader], 1)
        for f in s.followers:
            lag.add_metric([s.name, f.name], f.lag)
    yield from (replicas, current, has_leader, leader, lag)


class MonitorMetrics:
    """The monitor's registry: snapshot families plus the janitor's and its own health."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.snapshot = StatusCollector()
        self.registry.register(self.snapshot)
        self.janitor_jobs = Counter(
            "llmrelay_janitor_jobs",
            "Jobs for an unknown route or pool answered with unknown_route and dead-lettered",
            registry=self.registry,
        )
        self.up = Gauge(
            "llmrelay_monitor_up",
            "1 if the last JetStream snapshot succeeded, else 0",
            registry=self.registry,
        )
        self.errors = Counter(
            "llmrelay_monitor_errors", "Snapshots that failed", registry=self.registry
        )
        self.last_success = Gauge(
            "llmrelay_monitor_last_success_timestamp_seconds",
            "Unix time of the last successful snapshot",
            registry=self.registry,
        )


class Monitor:
    """Snapshot, export and sweep every ``interval_s``; serve /metrics with ``serve``."""

    def __init__(
        self,
        nc: NATS,
        config: Config | None = None,
        *,
        interval_s: float = 5.0,
        janitor: bool = True,
        grace_s: float = 10.0,
    ) -> None:
        self.nc = nc
        self.reader = StatusReader(nc, config)
        self.interval_s = interval_s
        self.janitor = janitor
        self.grace_s = grace_s
        self.metrics = MonitorMetrics()
        self.status: Status | None = None
        self._http: Any = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics in a thread; return the bound port (``port=0`` picks one)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.metrics.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Tick until cancelled; ``started`` after the first snapshot (even a failed one)."""
        await self.tick()
        task_status.started()
        while True:
            await anyio.sleep(self.interval_s)
            await self.tick()

    async def tick(self) -> Status | None:
        """One snapshot (exported) and one janitor sweep; never raises for NATS trouble."""
        try:
            status = await self.reader.collect()
        except RelayError as exc:
            self.metrics.up.set(0)
            self.metrics.errors.inc()
            log.warning("snapshot failed: %s", exc)
            return None
        self.status = self.metrics.snapshot.status = status
        self.metrics.up.set(1)
        self.metrics.last_success.set(status.at_ms / 1000)
        if self.janitor and status.stray:
            await self.sweep(status)
        return status

    async def sweep(self, status: Status) -> int:
        """Answer and dead-letter old enough jobs on unread subjects; return how many."""
        handled = 0
        for stray in status.stray:
            try:
                with nats_errors(f"janitor on {stray.subject}"):
                    handled += await Janitor(self.nc, self.grace_s).clear(stray.subject)
            except RelayError as exc:
                log.warning("janitor: %s: %s", stray.subject, exc)
        self.metrics.janitor_jobs.inc(handled)
        return handled


class Janitor:
    """Clears one subject that no consumer reads."""

    def __init__(self, nc: NATS, grace_s: float) -> None:
        self.nc = nc
        self.grace_s = grace_s

    async def clear(self, subject: str) -> int:
        handled = 0
        seq = 1
        while handled < SWEEP_LIMIT:
            message = await self._next(subject, seq)
            if message is None:
                break
            seq = int(message["seq"]) + 1
            if now_ms() / 1000 - parse_time(message["time"]) < self.grace_s:
                break  # this and later jobs are too young
            await self._dispose(subject, message)
            handled += 1
        return handled

    async def _next(self, subject: str, seq: int) -> dict[str, Any] | None:
        try:
            reply = await api_request(
                self.nc,
                js_api("STREAM", "MSG", "GET", JOBS_STREAM),
                {"seq": seq, "next_by_subj": subject},
            )
        except JetStreamApiError as exc:
            if exc.err_code == _ERR_NO_MESSAGE:
                return None
            raise
        message: dict[str, Any] = reply["message"]
        return message

    async def _dispose(self, subject: str, message: dict[str, Any]) -> None:
        data = base64.b64decode(message.get("data") or "")
        job = _decode(data)
        what, name = _target_of(subject)
        text = f"no {what} named {name!r} is configured on this broker"
        route = name if what == "route" and is_valid_name(name) else _route_of(job)
        # The subject's tenant decides where it may be answered, as in a worker;
        # job_seq names this job, so no other job on that reply subject ends early.
        answered = job is not None and reply_allowed(subject, job.reply_to)
        if job is not None and answered:
            error = Error(code="unknown_route", message=text, job_seq=int(message["seq"]))
            await self.nc.publish(job.reply_to, encode(error))
        letter = DeadLetter(
            code="unknown_route",
            message=text,
            at_ms=now_ms(),
            route=route,
            job=job,
            raw=None if job else preview(data),
            raw_bytes=0 if job else len(data),
        )
        await self.nc.jetstream().publish(dlq_subject(route), encode(letter), timeout=5.0)
        await api_request(
            self.nc, js_api("STREAM", "MSG", "DELETE", JOBS_STREAM), {"seq": int(message["seq"])}
        )
        await self._announce(letter, job)
        log.info(
            "janitor: %s on %s (%s): %s; dead-lettered to route %s",
            job.id if job else "undecodable job",
            subject,
            text,
            "answered unknown_route" if answered else "no reply subject to answer",
            route,
            extra={"request_id": job.id if job else "", "route": route},
        )

    async def _announce(self, letter: DeadLetter, job: Job | None) -> None:
        event = LifecycleEvent(
            kind="dead",
            request_id=job.id if job else "",
            route=letter.route,
            at_ms=letter.at_ms,
            detail=f"{letter.code}: {letter.message}",
        )
        await self.nc.publish(events_subject("dead"), encode(event))


def _target_of(subject: str) -> tuple[str, str]:
    """("route", name) for llm.jobs.<name>, ("pool", name) for llm.pool.<name>."""
    if subject.startswith(f"{JOBS_PREFIX}."):
        return "route", subject.removeprefix(f"{JOBS_PREFIX}.")
    return "pool", subject.removeprefix(f"{POOL_PREFIX}.")


def _decode(data: bytes) -> Job | None:
    try:
        return decode_untrusted(data)
    except InvalidJob:
        return None


def _route_of(job: Job | None) -> str:
    if job is not None and is_valid_name(job.route):
        return job.route
    return INVALID_ROUTE
