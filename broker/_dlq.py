"""The dead-letter queue: list, show, replay and purge what no pool could serve.

``LLM_DLQ`` holds one ``DeadLetter`` (JSON) per message on ``llm.dlq.<route>``
(route ``_invalid`` for jobs that could not be decoded). An entry is named by
its stream sequence number (``#12``) or by its job's request id.

Replay puts the job back where a client would have put it: ``llm.jobs.<route>``,
or ``llm.pool.<pool>`` when it was pinned; a tenant's job (its ``reply_to`` is
``llm.reply.<tenant>.<id>``) on ``llm.jobs.<route>.<tenant>`` or
``llm.pool.<pool>.<tenant>``, the only subjects where a worker answers it there.
A tenant's job refused as ``invalid_job`` is not replayed: its reply subject may
be another tenant's (the refusal says so), and replay would make it fit.

The attempts are cleared, the deadline starts afresh from the route's
``deadline_s``, and the request id stays the same (the original client's reply
subject still works if it waits; the replay is a new job, with its own
``job_seq``, so a client folding the first run's events needs to start over:
``tail`` does). The ``Nats-Msg-Id`` is
``<id>.replay.<seq>.<random>``, so that neither the jobs stream's duplicate
window nor a client that guessed the id can swallow it; the PubAck must say it
was stored (not a duplicate), and only then is the dead letter deleted, so a
failed replay loses nothing.

These calls need the operator's (``worker``) NATS user: the ``client`` user may
not read the DLQ, and the server answers a denied request with silence, which
shows up here as ``DlqAccessError``.
"""

from __future__ import annotations

import base64
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from broker._config import Config
from broker._errors import (
    DeadLetterNotFound,
    DlqAccessError,
    InvalidJob,
    JetStreamApiError,
    QueueFull,
    RelayError,
    UnknownRoute,
)
from broker._jsapi import api_request, consumer_info
from broker._nats import nats_errors
from broker._protocol import DeadLetter, Job, decode_dead_letter, encode, now_ms
from broker._status import parse_time, subject_counts
from broker._subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    JOBS_STREAM,
    dlq_subject,
    is_valid_name,
    js_api,
    pool_consumer,
    pool_subject,
    reply_tenant,
    route_consumer,
    route_subject,
)

DEFAULT_DEADLINE_S = 120.0
# A denied request is never answered; a local JetStream answers in milliseconds.
REQUEST_TIMEOUT_S = 2.0
_ERR_NO_MESSAGE = 10037


class DeadLetterEntry(msgspec.Struct, kw_only=True):
    """One DLQ message: where it is, when it came, and what it holds."""

    seq: int
    route: str
    at_ms: int
    letter: DeadLetter | None = None
    undecodable: str | None = None  # the raw message when it is not a DeadLetter

    @property
    def request_id(self) -> str:
        job = self.letter.job if self.letter else None
        return job.id if job else ""


class Replayed(msgspec.Struct, kw_only=True):
    seq: int
    request_id: str
    subject: str
    deadline_ms: int


async def dlq_counts(nc: NATS) -> dict[str, int]:
    """Dead letters per route."""
    counts = await subject_counts(nc, DLQ_STREAM, f"{DLQ_PREFIX}.>")
    return {s.removeprefix(f"{DLQ_PREFIX}."): n for s, n in sorted(counts.items())}


async def iter_dead_letters(nc: NATS, route: str | None = None) -> AsyncIterator[DeadLetterEntry]:
    """Every dead letter (of one route, or all), oldest first."""
    subject = dlq_subject(route) if route else f"{DLQ_PREFIX}.>"
    seq = 1
    while True:
        entry = await _get(nc, {"seq": seq, "next_by_subj": subject})
        if entry is None:
            return
        yield entry
        seq = entry.seq + 1


async def find_dead_letter(nc: NATS, ident: str) -> DeadLetterEntry:
    """The entry with stream sequence ``ident`` (``12`` or ``#12``), else with that request id."""
    number = ident.removeprefix("#")
    if number.isdigit():
        entry = await _get(nc, {"seq": int(number)})
        if entry is not None:
            return entry
    async for entry in iter_dead_letters(nc):
        if entry.request_id == ident:
            return entry
    raise DeadLetterNotFound(f"no dead letter {ident!r} (see `llmrelay dlq list`)")


async def replay(nc: NATS, entry: DeadLetterEntry, config: Config | None) -> Replayed:
    """Re-publish the entry's job with a fresh deadline, then delete the dead letter."""
    job = entry.letter.job if entry.letter else None
    if job is None:
        raise RelayError(
            f"dead letter #{entry.seq} holds no decodable job (route {entry.route}); "
            "it cannot be replayed: `llmrelay dlq show` prints its raw bytes"
        )
    tenant = _tenant(entry, job)
    await _check_target(nc, job)
    fresh = _fresh_job(job, config)
    subject = pool_subject(job.pool, tenant) if job.pool else route_subject(job.route, tenant)
    msg_id = f"{job.id}.replay.{entry.seq}.{uuid.uuid4().hex[:16]}"
    await _publish(nc, subject, fresh, msg_id=msg_id)
    await delete_dead_letter(nc, entry.seq)
    return Replayed(
        seq=entry.seq, request_id=job.id, subject=subject, deadline_ms=fresh.deadline_ms
    )


async def delete_dead_letter(nc: NATS, seq: int) -> None:
    await _request(nc, js_api("STREAM", "MSG", "DELETE", DLQ_STREAM), {"seq": seq})


async def purge(nc: NATS, route: str | None = None) -> int:
    """Delete every dead letter (of one route, or all); return how many."""
    body = {"filter": dlq_subject(route)} if route else {}
    reply = await _request(nc, js_api("STREAM", "PURGE", DLQ_STREAM), body)
    return int(reply.get("purged", 0))


# --- helpers ------------------------------------------------------------------------


def _tenant(entry: DeadLetterEntry, job: Job) -> str | None:
    """The tenant whose subject the job goes back to: that of its reply subject.

    A dead letter does not say which subject its job arrived on; a job the
    workers refused as ``invalid_job`` may name any tenant's reply subject (that
    is one reason for the refusal), so it is not replayed into that tenant's space.
    """
    tenant = reply_tenant(job.reply_to)
    if tenant is None:
        return None
    refused = entry.letter is not None and entry.letter.code == InvalidJob.code
    if refused or not is_valid_name(tenant):
        raise RelayError(
            f"dead letter #{entry.seq} names reply subject {job.reply_to!r}, which may not "
            f"be its own (code {entry.letter.code if entry.letter else '?'}); "
            f"request {job.id} not replayed"
        )
    return tenant


def _fresh_job(job: Job, config: Config | None) -> Job:
    now = now_ms()
    route = config.routes.get(job.route) if config else None
    if route is not None:
        deadline_s = route.deadline_s
    elif job.deadline_ms > job.created_ms > 0:
        deadline_s = (job.deadline_ms - job.created_ms) / 1000
    else:
        deadline_s = DEFAULT_DEADLINE_S
    return msgspec.structs.replace(
        job, attempts=[], rank=0, created_ms=now, deadline_ms=now + int(deadline_s * 1000)
    )


async def _check_target(nc: NATS, job: Job) -> None:
    consumer = pool_consumer(job.pool) if job.pool else route_consumer(job.route)
    try:
        await consumer_info(nc, JOBS_STREAM, consumer)
    except JetStreamApiError as exc:
        if exc.status == 404:
            what = f"pool {job.pool!r}" if job.pool else f"route {job.route!r}"
            raise UnknownRoute(
                f"{what} is not configured on this broker; request {job.id} not replayed"
            ) from exc
        raise _access(exc) from exc


async def _publish(nc: NATS, subject: str, job: Job, *, msg_id: str) -> None:
    ttl_s = max(1, math.ceil(job.deadline_ms / 1000 - time.time()) + 1)
    headers = {"Nats-Msg-Id": msg_id, "Nats-TTL": f"{ttl_s}s"}
    try:
        with nats_errors(f"publish to {subject}"):
            ack = await nc.jetstream().publish(subject, encode(job), headers=headers, timeout=5.0)
    except QueueFull as exc:
        raise QueueFull(f"{subject} is full; request {job.id} stays in the DLQ") from exc
    except RelayError as exc:
        raise type(exc)(f"{exc.message}; {job.id} stays in the DLQ") from exc
    if ack.duplicate:  # stored before under this id: this publish stored nothing
        raise RelayError(
            f"{subject} reported message id {msg_id} as a duplicate; {job.id} stays in the DLQ"
        )


async def _get(nc: NATS, body: dict[str, Any]) -> DeadLetterEntry | None:
    try:
        reply = await _request(nc, js_api("STREAM", "MSG", "GET", DLQ_STREAM), body)
    except JetStreamApiError as exc:
        if exc.err_code == _ERR_NO_MESSAGE or exc.status == 404:
            return None
        raise
    return _entry(reply["message"])


def _entry(message: dict[str, Any]) -> DeadLetterEntry:
    subject = str(message.get("subject", ""))
    data = base64.b64decode(message.get("data") or "")
    seq = int(message["seq"])
    at_ms = int(parse_time(message["time"]) * 1000)
    route = subject.removeprefix(f"{DLQ_PREFIX}.")
    try:
        return DeadLetterEntry(seq=seq, route=route, at_ms=at_ms, letter=decode_dead_letter(data))
    except (msgspec.ValidationError, msgspec.DecodeError):
        text = data.decode(errors="replace")
        return DeadLetterEntry(seq=seq, route=route, at_ms=at_ms, undecodable=text)


async def _request(nc: NATS, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        return await api_request(nc, subject, body, timeout_s=REQUEST_TIMEOUT_S)
    except JetStreamApiError as exc:
        raise _access(exc) from exc


def _access(exc: JetStreamApiError) -> RelayError:
    if exc.status == 0:
        return DlqAccessError(
            f"{exc.message} (the DLQ needs the operator's NATS user, e.g. "
            "nats://worker:...@host:4222; the client user may not read it)"
        )
    return exc
