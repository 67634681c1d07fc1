"""Create or update every stream, consumer and bucket llmrelay uses.

``ensure_topology`` is called by every process on start (`up`, `worker`,
`monitor`, the client's first submit is not one of them: clients need no write
rights). It is idempotent: a second run with the same config changes nothing,
and a changed limit in config updates the stream in place.

    LLM_JOBS     llm.jobs.<route>[.<tenant>],        WorkQueue, file, bounded per subject
                 llm.pool.<pool>[.<tenant>],         (so per tenant) and in bytes
                 llm.requeue.<pool>
    LLM_REPLIES  llm.reply.[<tenant>.]<id>           memory, short max_age (replay, tail)
    LLM_EVENTS   llm.events.<kind>                   file, max_age (lifecycle)
    LLM_DLQ      llm.dlq.<route>                     file, long max_age (dead letters)
    KV llm_workers                                   heartbeats with TTL + limit markers

``LLM_JOBS`` takes the subjects of the configured routes and pools only, so a
job for anything else fails at publish (no responders) instead of waiting for
nobody; a changed route list updates the stream. Each route subject has one
durable priority-group consumer (the route's spill policy picks its priority
policy), and so has each pool, reading both its own subject (pinned jobs) and
its re-queue subject (``llm.requeue.<pool>``, which only workers may publish to).
A route's or pool's consumer also reads its tenants' subjects (``llm.jobs.<route>.*``,
the tenant last: disjoint from every other route's); ``max_msgs_per_subject``
then bounds each tenant's queue on its own (the byte limit is the stream's).

``streams.replicas`` (1, or 3 on a cluster) applies to every stream, the
bucket and every consumer, whose replicas are given explicitly: a consumer's
default (the stream's, when it is created) does not follow a later change, and
a WorkQueue stream's consumers must have as many replicas as the stream.
Raising it scales everything in place; the consumers once the stream has.

Every stream has a byte limit. They are derived, not configured (yet): the
jobs stream holds ``queue_capacity`` jobs of ``max_job_bytes``, capped so that
all file streams together fit the 10GB file store of nats.conf (JetStream
reserves each stream's ``max_bytes`` when it is created).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServerError

from broker._config import Config, RouteConfig
from broker._errors import JetStreamApiError
from broker._jsapi import create_or_update_consumer, priority_consumer_config
from broker._subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    JOBS_STREAM,
    PRIORITY_GROUP,
    REPLIES_STREAM,
    REPLY_PREFIX,
    WORKERS_BUCKET,
    WORKERS_STREAM,
    pool_consumer,
    pool_subject,
    requeue_subject,
    route_consumer,
    route_subject,
    tenant_subjects,
)

_ERR_CREATING_STORE = 10049
_ERR_INSUFFICIENT_RESOURCES = 10005
_RETRIED_ON_CREATE = (_ERR_CREATING_STORE, _ERR_INSUFFICIENT_RESOURCES)
_ERR_REPLICAS_EXCEED_STREAM = 10126
SCALE_TIMEOUT_S = 30.0
# Outstanding pulls a consumer accepts: one per free slot of every worker.
MAX_WAITING_PULLS = 8192
_GIB = 1024**3
REPLIES_MAX_BYTES = 512 * 1024 * 1024
JOBS_MAX_BYTES_CAP = 4 * _GIB
EVENTS_MAX_BYTES = 1 * _GIB
DLQ_MAX_BYTES = 1 * _GIB
WORKERS_MAX_BYTES = 64 * 1024 * 1024


def route_filters(route: str) -> list[str]:
    """What a route's consumer reads: the default subject and every tenant's."""
    return [route_subject(route), tenant_subjects(route_subject(route))]


def pool_filters(pool: str) -> list[str]:
    """What a pool's consumer reads: pinned jobs (default, tenants) and re-queues."""
    return [pool_subject(pool), tenant_subjects(pool_subject(pool)), requeue_subject(pool)]


def job_subjects(config: Config) -> list[str]:
    """Every subject LLM_JOBS takes: configured routes, pools (and their tenants'
    subjects) and the pools' re-queues."""
    routes = [s for name in sorted(config.routes) for s in route_filters(name)]
    return routes + [s for name in sorted(config.pools) for s in pool_filters(name)]


def jobs_max_bytes(config: Config) -> int:
    s = config.streams
    return min(s.queue_capacity * s.max_job_bytes, JOBS_MAX_BYTES_CAP)


def stream_configs(config: Config) -> list[StreamConfig]:
    s = config.streams
    return [
        StreamConfig(
            name=JOBS_STREAM,
            subjects=job_subjects(config),
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=s.queue_capacity,
            max_msg_size=s.max_job_bytes,
            max_bytes=jobs_max_bytes(config),
            duplicate_window=s.duplicate_window_s,
            allow_msg_ttl=True,
            num_replicas=s.replicas,
        ),
        StreamConfig(
            name=REPLIES_STREAM,
            subjects=[f"{REPLY_PREFIX}.>"],
            storage=StorageType.MEMORY,
            max_age=s.replies_max_age_s,
            max_bytes=REPLIES_MAX_BYTES,
            discard=DiscardPolicy.OLD,
            num_replicas=s.replicas,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[f"{EVENTS_PREFIX}.>"],
            storage=StorageType.FILE,
            max_age=s.events_max_age_s,
            max_bytes=EVENTS_MAX_BYTES,
            discard=DiscardPolicy.OLD,
            num_replicas=s.replicas,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[f"{DLQ_PREFIX}.>"],
            storage=StorageType.FILE,
            max_age=s.dlq_max_age_s,
            max_bytes=DLQ_MAX_BYTES,
            num_replicas=s.replicas,
        ),
    ]


def _differs(wanted: StreamConfig, current: StreamConfig) -> bool:
    """True if any field we set differs from what the server holds."""
    for field in dataclasses.fields(wanted):
        value = getattr(wanted, field.name)
        if value is None or field.name == "name":
            continue
        if getattr(current, field.name) != value:
            return True
    return False


async def _ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await _add_stream(js, wanted)
        return
    if _differs(wanted, info.config):
        await _placed(lambda: js.update_stream(wanted))


async def _add_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    await _placed(lambda: js.add_stream(wanted))


async def _placed(request: Callable[[], Awaitable[object]]) -> None:
    """Create or update a stream; retry what the server answers for a moment after
    streams were deleted: "error creating store" (10049) for one of the same name,
    and, on a cluster, "insufficient storage" (10005) for new replicas while the meta
    leader still counts the space the deleted ones had reserved (~1.5 s on loopback)."""
    for delay_s in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 0):
        try:
            await request()
            return
        except (ServerError, BadRequestError) as exc:
            if exc.err_code not in _RETRIED_ON_CREATE or not delay_s:
                raise
            await anyio.sleep(delay_s)


async def _ensure_workers_bucket(js: JetStreamContext, config: Config) -> None:
    ttl = config.streams.heartbeat_ttl_s
    try:
        await js.key_value(WORKERS_BUCKET)
    except (NotFoundError, BadRequestError):
        pass
    else:
        await _ensure_bucket_replicas(js, config.streams.replicas)
        return
    bucket = KeyValueConfig(
        bucket=WORKERS_BUCKET,
        history=1,
        ttl=ttl,
        limit_marker_ttl=max(ttl, 1.0),
        max_bytes=WORKERS_MAX_BYTES,
        storage=StorageType.MEMORY,
        replicas=config.streams.replicas,
    )
    await _placed(lambda: js.create_key_value(bucket))


async def _ensure_bucket_replicas(js: JetStreamContext, replicas: int) -> None:
    """A changed ``streams.replicas`` scales the heartbeat bucket as it does the streams."""
    info = await js.stream_info(WORKERS_STREAM)
    if info.config.num_replicas != replicas:
        scaled = dataclasses.replace(info.config, num_replicas=replicas)
        await _placed(lambda: js.update_stream(scaled))


def _route_policy(route: RouteConfig) -> str:
    return "overflow" if route.spill == "backlog" else "prioritized"


def consumer_configs(config: Config) -> list[dict[str, Any]]:
    """The durable consumer of every route and every pool subject."""
    max_deliver = config.streams.max_deliver
    out: list[dict[str, Any]] = []
    for name, route in config.routes.items():
        pools = [config.pools[t.pool] for t in route.targets]
        out.append(
            priority_consumer_config(
                name=route_consumer(name),
                filter_subjects=route_filters(name),
                group=PRIORITY_GROUP,
                policy=_route_policy(route),
                ack_wait_s=max(p.ack_wait_s for p in pools),
                max_deliver=max_deliver,
                max_ack_pending=max(1000, 4 * sum(p.concurrency for p in pools)),
                max_waiting=MAX_WAITING_PULLS,
                replicas=config.streams.replicas,
            )
        )
    for name, pool in config.pools.items():
        out.append(
            priority_consumer_config(
                name=pool_consumer(name),
                filter_subjects=pool_filters(name),
                group=PRIORITY_GROUP,
                policy="prioritized",
                ack_wait_s=pool.ack_wait_s,
                max_deliver=max_deliver,
                max_ack_pending=max(1000, 4 * pool.concurrency),
                max_waiting=MAX_WAITING_PULLS,
                replicas=config.streams.replicas,
            )
        )
    return out


async def ensure_topology(nc: NATS, config: Config) -> None:
    """Create or update all streams, the heartbeat bucket and all consumers."""
    js = nc.jetstream()
    for wanted in stream_configs(config):
        await _ensure_stream(js, wanted)
    await _ensure_workers_bucket(js, config)
    for consumer in consumer_configs(config):
        await _ensure_consumer(nc, consumer)


async def _ensure_consumer(nc: NATS, consumer: dict[str, Any]) -> None:
    """Create or update a consumer. Right after a stream's replicas were raised the
    server refuses consumers with as many (10126) until the stream has scaled (about
    10 s on loopback): poll until it accepts, within ``SCALE_TIMEOUT_S``."""
    deadline = anyio.current_time() + SCALE_TIMEOUT_S
    while True:
        try:
            await create_or_update_consumer(nc, JOBS_STREAM, consumer)
            return
        except JetStreamApiError as exc:
            if exc.err_code != _ERR_REPLICAS_EXCEED_STREAM or anyio.current_time() > deadline:
                raise
        await anyio.sleep(0.2)
