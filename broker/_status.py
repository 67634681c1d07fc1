"""The broker's state as an operator sees it, read from JetStream alone.

``collect_status`` is what `llmrelay status` prints and `llmrelay monitor`
exports. Everything comes from the server, nothing from a process's memory:

    queue depth       the route's (or pool's) durable consumer: num_pending
    in flight         the same consumer: num_ack_pending (delivered, not yet answered)
    redelivered       the same consumer: num_redelivered
    oldest job age    timestamp of the first job after the consumer's delivered
                      sequence on the subject (a stream message get)
    DLQ depth         LLM_DLQ subject counts (stream info with a subjects filter)
    workers           the heartbeats in KV ``llm_workers``: slots, busy, circuits, rate used,
                      spend per route (since each live worker started)
                      (``circuit``: the pool-level circuit; ``circuits``/``model_circuits``:
                      the upstream models whose own circuit is not closed)
    stray jobs        jobs on a ``llm.jobs.*``/``llm.pool.*`` subject that no consumer reads
    streams           each stream's replicas, leader and followers (``broker/_replication.py``)

The `client` NATS user may read all of this except job messages, so the
oldest-job age is ``None`` for it (one probe, then skipped; ``Status.oldest_age_known``).
Routes and pools are those of the config (if given) plus every consumer the
broker has, so `status` works without a config file.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import BadRequestError, NotFoundError

from broker._config import Config
from broker._errors import BrokerUnavailable, JetStreamApiError
from broker._jsapi import api_request
from broker._nats import nats_errors
from broker._protocol import Heartbeat, decode_heartbeat, now_ms
from broker._replication import StreamReplication, read_replication
from broker._subjects import (
    ALL_STREAMS,
    DLQ_PREFIX,
    DLQ_STREAM,
    JOBS_PREFIX,
    JOBS_STREAM,
    POOL_PREFIX,
    WORKERS_BUCKET,
    js_api,
    pool_consumer,
    pool_subject,
    route_consumer,
    route_subject,
    subject_matches,
)

# A denied request gets no answer (the server only tells the connection): keep it short.
PROBE_TIMEOUT_S = 1.0
# A whole snapshot; a healthy local server answers in milliseconds.
READ_TIMEOUT_S = 15.0
_ROUTE_CONSUMER_PREFIX = route_consumer("")
_POOL_CONSUMER_PREFIX = pool_consumer("")
_ERR_STREAM_NOT_FOUND = 10059
_ERR_NO_MESSAGE = 10037


class QueueStatus(msgspec.Struct, kw_only=True):
    """One job subject (``llm.jobs.<route>`` or ``llm.pool.<pool>``) and its consumer."""

    name: str
    subject: str
    configured: bool
    consumer: bool
    queue_depth: int = 0
    in_flight: int = 0
    redelivered: int = 0
    oldest_job_age_s: float | None = None
    capacity: int = 0


class RouteStatus(QueueStatus, kw_only=True):
    targets: list[str] = msgspec.field(default_factory=list)
    dlq_depth: int = 0
    # USD the live workers spent on the route since each of them started (their
    # heartbeats' ``cost_usd``); None: none of them has spent on it.
    spend_usd: float | None = None


class PoolStatus(QueueStatus, kw_only=True):
    live_workers: int = 0
    slots_total: int = 0
    slots_busy: int = 0
    circuit: dict[str, int] = msgspec.field(default_factory=dict)
    # Models whose circuit is not closed on some worker: model -> state -> workers.
    model_circuits: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    rpm_used: int = 0
    rpm_limit: int = 0
    tpm_used: int = 0
    tpm_limit: int = 0


class WorkerStatus(msgspec.Struct, kw_only=True):
    pool: str
    worker_id: str
    slots: int
    busy: int
    circuit: str
    version: str
    last_seen_s: float
    rpm_used: int = 0
    tpm_used: int = 0
    metrics_port: int | None = None
    # The worker's model circuits that are not closed: model -> state.
    circuits: dict[str, str] = msgspec.field(default_factory=dict)


class StrayQueue(msgspec.Struct, kw_only=True):
    """Jobs on a subject that no consumer reads (published to an unknown route)."""

    subject: str
    jobs: int


class Status(msgspec.Struct, kw_only=True):
    at_ms: int
    routes: list[RouteStatus]
    pools: list[PoolStatus]
    workers: list[WorkerStatus]
    dlq_depth: int
    dlq_by_route: dict[str, int]
    stray: list[StrayQueue]
    oldest_age_known: bool = True
    streams: list[StreamReplication] = msgspec.field(default_factory=list)

    def route(self, name: str) -> RouteStatus:
        return next(r for r in self.routes if r.name == name)

    def pool(self, name: str) -> PoolStatus:
        return next(p for p in self.pools if p.name == name)


async def collect_status(nc: NATS, config: Config | None = None) -> Status:
    """One snapshot of queues, DLQ and workers (see the module docstring)."""
    return await StatusReader(nc, config).collect()


class StatusReader:
    """Collects ``Status`` snapshots; remembers whether job messages are readable."""

    def __init__(self, nc: NATS, config: Config | None = None) -> None:
        self.nc = nc
        self.config = config
        self.can_read_jobs: bool | None = None  # None: not probed yet

    async def collect(self) -> Status:
        """One snapshot; NATS trouble is raised as a ``JetStreamApiError`` (one line)."""
        try:
            with anyio.fail_after(READ_TIMEOUT_S), nats_errors("reading the broker's state"):
                return await self._collect()
        except (BrokerUnavailable, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise JetStreamApiError(f"could not read the broker's state: {why}") from exc

    async def _collect(self) -> Status:
        jobs_info = await stream_info(self.nc, JOBS_STREAM, subjects_filter=">")
        consumers = await list_consumers(self.nc, JOBS_STREAM)
        dlq = await subject_counts(self.nc, DLQ_STREAM, f"{DLQ_PREFIX}.>")
        heartbeats = await read_heartbeats(self.nc)
        streams = await read_replication(self.nc, ALL_STREAMS)
        capacity = int(jobs_info["config"].get("max_msgs_per_subject", 0))
        routes = [self._route(n, consumers, capacity, dlq) for n in self._route_names(consumers)]
        for r in routes:
            r.spend_usd = _spend(heartbeats, r.name)
        pools = [
            self._pool(n, consumers, capacity, heartbeats) for n in self._pool_names(consumers)
        ]
        await self._fill_oldest_ages([*routes, *pools], consumers)
        by_route = {s.removeprefix(f"{DLQ_PREFIX}."): n for s, n in sorted(dlq.items())}
        return Status(
            at_ms=now_ms(),
            routes=routes,
            pools=pools,
            workers=[_worker_status(hb) for hb in heartbeats],
            dlq_depth=sum(dlq.values()),
            dlq_by_route=by_route,
            stray=_stray(jobs_info["state"].get("subjects") or {}, consumers),
            oldest_age_known=self.can_read_jobs is not False,
            streams=streams,
        )

    # --- names ---------------------------------------------------------------------

    def _route_names(self, consumers: dict[str, dict[str, Any]]) -> list[str]:
        names = list(self.config.routes) if self.config else []
        extra = [c.removeprefix(_ROUTE_CONSUMER_PREFIX) for c in consumers if _is(c, "route")]
        return names + sorted(n for n in extra if n not in names)

    def _pool_names(self, consumers: dict[str, dict[str, Any]]) -> list[str]:
        names = list(self.config.pools) if self.config else []
        extra = [c.removeprefix(_POOL_CONSUMER_PREFIX) for c in consumers if _is(c, "pool")]
        return names + sorted(n for n in extra if n not in names)

    # --- per queue -----------------------------------------------------------------

    def _route(
        self, name: str, consumers: dict[str, dict[str, Any]], capacity: int, dlq: dict[str, int]
    ) -> RouteStatus:
        route = self.config.routes.get(name) if self.config else None
        info = consumers.get(route_consumer(name))
        return RouteStatus(
            name=name,
            subject=route_subject(name),
            configured=route is not None,
            targets=[f"{t.pool}/{t.model}" for _, t in route.ranks()] if route else [],
            dlq_depth=dlq.get(f"{DLQ_PREFIX}.{name}", 0),
            capacity=capacity,
            **_consumer_counts(info),
        )

    def _pool(
        self,
        name: str,
        consumers: dict[str, dict[str, Any]],
        capacity: int,
        heartbeats: list[Heartbeat],
    ) -> PoolStatus:
        pool = self.config.pools.get(name) if self.config else None
        mine = [hb for hb in heartbeats if hb.pool == name]
        circuit: dict[str, int] = {}
        for hb in mine:
            circuit[hb.circuit] = circuit.get(hb.circuit, 0) + 1
        return PoolStatus(
            name=name,
            subject=pool_subject(name),
            configured=pool is not None,
            capacity=capacity,
            live_workers=len(mine),
            slots_total=sum(hb.slots for hb in mine),
            slots_busy=sum(hb.busy for hb in mine),
            circuit=circuit,
            model_circuits=_model_circuits(mine),
            rpm_used=sum(hb.rpm_used for hb in mine),
            rpm_limit=pool.rpm if pool else 0,
            tpm_used=sum(hb.tpm_used for hb in mine),
            tpm_limit=pool.tpm if pool else 0,
            **_consumer_counts(consumers.get(pool_consumer(name))),
        )

    # --- oldest job ----------------------------------------------------------------

    async def _fill_oldest_ages(
        self, queues: Sequence[QueueStatus], consumers: dict[str, dict[str, Any]]
    ) -> None:
        now_s = time.time()
        for q in queues:
            if q.queue_depth == 0 or not q.consumer or self.can_read_jobs is False:
                continue
            name = route_consumer(q.name) if isinstance(q, RouteStatus) else pool_consumer(q.name)
            after = int(consumers[name]["delivered"]["stream_seq"])
            stamp = await self._first_job_time(q.subject, after + 1)
            if stamp is not None:
                q.oldest_job_age_s = round(max(0.0, now_s - stamp), 3)

    async def _first_job_time(self, subject: str, from_seq: int) -> float | None:
        body = {"seq": from_seq, "next_by_subj": subject}
        timeout_s = PROBE_TIMEOUT_S if self.can_read_jobs is None else 5.0
        try:
            reply = await api_request(
                self.nc, js_api("STREAM", "MSG", "GET", JOBS_STREAM), body, timeout_s
            )
        except JetStreamApiError as exc:
            if exc.status == 0:  # no answer: this user may not read jobs
                self.can_read_jobs = False
            return None
        self.can_read_jobs = True
        return parse_time(reply["message"]["time"])


# --- reading JetStream -------------------------------------------------------------


async def stream_info(
    nc: NATS, stream: str, *, subjects_filter: str | None = None
) -> dict[str, Any]:
    """Raw stream info; a missing stream raises a ``JetStreamApiError`` that says what to do."""
    body = {"subjects_filter": subjects_filter} if subjects_filter else {}
    try:
        return await api_request(nc, js_api("STREAM", "INFO", stream), body)
    except JetStreamApiError as exc:
        if exc.err_code == _ERR_STREAM_NOT_FOUND:
            raise JetStreamApiError(
                f"no {stream} stream on this server: start `llmrelay up --config FILE` "
                "or a worker, which create the streams",
                status=404,
                err_code=exc.err_code,
            ) from exc
        raise


async def subject_counts(nc: NATS, stream: str, subjects_filter: str) -> dict[str, int]:
    """Messages per subject of ``stream`` matching the filter."""
    info = await stream_info(nc, stream, subjects_filter=subjects_filter)
    subjects: dict[str, int] = info["state"].get("subjects") or {}
    return subjects


async def list_consumers(nc: NATS, stream: str) -> dict[str, dict[str, Any]]:
    """Every consumer of ``stream`` with its state, by name (paged by the server)."""
    out: dict[str, dict[str, Any]] = {}
    while True:
        reply = await api_request(nc, js_api("CONSUMER", "LIST", stream), {"offset": len(out)})
        page = reply.get("consumers") or []
        out.update({c["name"]: c for c in page})
        if not page or len(out) >= int(reply.get("total", 0)):
            return out


async def read_heartbeats(nc: NATS) -> list[Heartbeat]:
    """The live workers' latest heartbeats (expired ones are gone from the bucket)."""
    js = nc.jetstream()
    try:
        kv = await js.key_value(WORKERS_BUCKET)
    except (NotFoundError, BadRequestError):
        return []
    watcher = await kv.watchall(ignore_deletes=True)
    beats: list[Heartbeat] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            if entry.value:
                try:
                    beats.append(decode_heartbeat(entry.value))
                except (msgspec.ValidationError, msgspec.DecodeError):
                    continue
    finally:
        with contextlib.suppress(BrokerUnavailable), nats_errors("stopping the heartbeat watch"):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return sorted(beats, key=lambda hb: (hb.pool, hb.worker_id))


def parse_time(stamp: str) -> float:
    """JetStream's RFC 3339 time (nanoseconds, ``Z``) as Unix seconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float(f"0.{frac}") if frac else 0.0)


def _is(consumer: str, kind: str) -> bool:
    prefix = _ROUTE_CONSUMER_PREFIX if kind == "route" else _POOL_CONSUMER_PREFIX
    return consumer.startswith(prefix)


def _consumer_counts(info: dict[str, Any] | None) -> dict[str, Any]:
    if info is None:
        return {"consumer": False}
    return {
        "consumer": True,
        "queue_depth": int(info.get("num_pending", 0)),
        "in_flight": int(info.get("num_ack_pending", 0)),
        "redelivered": int(info.get("num_redelivered", 0)),
    }


def _stray(subjects: dict[str, int], consumers: dict[str, dict[str, Any]]) -> list[StrayQueue]:
    """Job subjects with messages but no consumer that would ever read them."""
    read: set[str] = set()
    for consumer in consumers.values():
        config = consumer.get("config", {})
        read.update(config.get("filter_subjects") or [config.get("filter_subject") or ""])
    return [
        StrayQueue(subject=subject, jobs=count)
        for subject, count in sorted(subjects.items())
        if count
        and not any(subject_matches(f, subject) for f in read if f)  # tenants': wildcards
        and subject.startswith((JOBS_PREFIX, POOL_PREFIX))
    ]


def _worker_status(hb: Heartbeat) -> WorkerStatus:
    return WorkerStatus(
        pool=hb.pool,
        worker_id=hb.worker_id,
        slots=hb.slots,
        busy=hb.busy,
        circuit=hb.circuit,
        version=hb.version,
        last_seen_s=round(max(0.0, (now_ms() - hb.at_ms) / 1000), 3) if hb.at_ms else 0.0,
        rpm_used=hb.rpm_used,
        tpm_used=hb.tpm_used,
        metrics_port=hb.metrics_port,
        circuits=dict(sorted(hb.circuits.items())),
    )


def _spend(heartbeats: list[Heartbeat], route: str) -> float | None:
    spent = [hb.cost_usd[route] for hb in heartbeats if route in hb.cost_usd]
    return math.fsum(spent) if spent else None


def _model_circuits(heartbeats: list[Heartbeat]) -> dict[str, dict[str, int]]:
    """Per model whose circuit is not closed somewhere: how many workers see each state."""
    out: dict[str, dict[str, int]] = {}
    for hb in heartbeats:
        for model, state in hb.circuits.items():
            states = out.setdefault(model, {})
            states[state] = states.get(state, 0) + 1
    return dict(sorted(out.items()))
