"""What a worker hears besides jobs, and the dead letters that do not come from a job run.

Three core-NATS subscriptions (subjects from ``broker/_subjects.py``):

- ``llm.cancel.>``: a client cancelled; ``llm.cancel.<id>`` names a job
  without a tenant, ``llm.cancel.<tenant>.<id>`` one of that tenant (whose
  reply subject is ``llm.reply.<tenant>.<id>``); the run serving it stops and
  answers ``cancelled``;
- ``llm.control.<pool>.pause``: another worker of the pool met a 429; this
  worker's budget waits out the same pause (a ``PoolPause``);
- the JetStream max-deliveries advisory (one queue group for every worker): a
  job delivered ``max_deliver`` times without an answer is copied to the DLQ,
  answered, and deleted from the work queue (NATS-NOTES.md).

``dead_letter_bug`` parks a job whose run raised an unexpected exception; the
worker's ``_run_job`` calls it so a bug in one job never reaches the task group.

Both publish to a job's reply subject only through ``PoolContext.answer`` (a
plain ``llm.reply.`` subject, as at intake), keep a payload that is not a job as
a bounded preview, and never raise for NATS trouble.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from broker._errors import InternalError, InvalidJob, RelayError
from broker._fold import attempt_id
from broker._nats import nats_errors
from broker._protocol import DeadLetter, Error, Job, decode_pause, now_ms
from broker._subjects import (
    JOBS_STREAM,
    MAX_DELIVERIES_ADVISORY,
    cancel_all_subject,
    is_valid_name,
    parse_cancel,
    pause_subject,
    reply_tenant,
)
from broker._validate import decode_untrusted, reply_allowed
from workers._context import PoolContext
from workers._delivery import stored_identity
from workers._intake import INVALID_ROUTE_TOKEN, raw_letter, refusal, settle
from workers._job import JobRun

log = logging.getLogger("llmrelay.worker")

DLQ_QUEUE_GROUP = "llmrelay-dlq"


class Control:
    """The cancel, pause and max-deliveries subscriptions of one worker."""

    def __init__(self, ctx: PoolContext, running: Mapping[str, JobRun]) -> None:
        self.ctx = ctx
        self.running = running  # the worker's runs in flight, read only

    async def subscribe(self) -> None:
        nc = self.ctx.nc
        await nc.subscribe(cancel_all_subject(), cb=self._on_cancel)
        await nc.subscribe(pause_subject(self.ctx.pool_name), cb=self._on_pause)
        await nc.subscribe(
            MAX_DELIVERIES_ADVISORY, queue=DLQ_QUEUE_GROUP, cb=self._on_max_deliveries
        )

    async def _on_cancel(self, msg: Msg) -> None:
        """Cancel the run of ``llm.cancel.[<tenant>.]<id>``, if the message carries its
        job's key.

        A tenant may publish only on its own ``llm.cancel.<tenant>.>`` (NATS
        permissions), and cancels only its own jobs: the tenant of a job is that
        of its reply subject, checked against its arrival subject at intake.
        Clients of one user share its cancel subjects and read its request ids;
        only the submitter knows the job's ``cancel_key``.
        """
        parsed = parse_cancel(msg.subject)
        if parsed is None:
            return
        tenant, rid = parsed
        for run in self.running.values():
            job = run.job
            if job is None or job.id != rid or reply_tenant(job.reply_to) != tenant:
                continue
            if _may_cancel(job, msg.data):
                run.cancelled_by_client = True
                run.cancel_scope.cancel()

    async def _on_pause(self, msg: Msg) -> None:
        try:
            pause = decode_pause(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.ctx.budget.pause(max(0.0, (pause.until_ms - now_ms()) / 1000))

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """A job delivered max_deliver times without an answer: dead-letter it."""
        try:
            seq = int(msgspec.json.decode(msg.data)["stream_seq"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return
        try:
            with nats_errors(f"reading poison job {seq}"):
                stored = await self.ctx.js.get_msg(JOBS_STREAM, seq)
        except RelayError as exc:
            if not isinstance(exc.__cause__, NotFoundError):  # gone already: another worker's
                log.warning("max deliveries of job %d: %s", seq, exc)
            return
        subject = stored.subject or ""
        job_seq, base = stored_identity(subject, stored.headers, seq)
        await self._dead_letter_poison(stored.data or b"", seq, job_seq, base, subject)

    async def _dead_letter_poison(
        self, data: bytes, seq: int, job_seq: int, base: int, subject: str
    ) -> None:
        """Park, answer, delete; a job the DLQ did not take stays in the stream, never lost.

        The answer names the job and its last delivery's attempt, so the client's
        fold takes it as the end of this job (not a stale event).
        """
        job = _job_or_none(data)
        max_deliver = self.ctx.config.streams.max_deliver
        reason = f"delivered {max_deliver} times without an answer (workers died?)"
        if not await self.ctx.dead_letter(_letter(InternalError.code, reason, job, data)):
            return
        if job is not None and reply_allowed(subject, job.reply_to):
            error = Error(
                code=InternalError.code,
                message=reason,
                attempt=attempt_id(base, max_deliver),
                job_seq=job_seq,
            )
            await self.ctx.answer(job.reply_to, error)
        try:
            with nats_errors(f"deleting poison job {seq}"):
                await self.ctx.js.delete_msg(JOBS_STREAM, seq)
        except RelayError as exc:
            log.warning("poison job %d parked but not deleted: %s", seq, exc)


async def dead_letter_bug(ctx: PoolContext, run: JobRun) -> None:
    """Answer and park a job whose run raised unexpectedly, then settle its message."""
    job = run.job
    with anyio.CancelScope(shield=True):
        if job is not None and run.delivery.may_answer(job.reply_to):
            message = "llmrelay failed on this job; it was dead-lettered"
            await ctx.answer(job.reply_to, refusal(run.delivery, InternalError.code, message, job))
        letter = _letter(InternalError.code, "worker bug", job, run.msg.data or b"")
        await settle(run.msg, await ctx.dead_letter(letter))


def _may_cancel(job: Job, key: bytes) -> bool:
    if job.cancel_key is None:
        return True  # a raw client's job without a key: anyone who knows its id
    return hmac.compare_digest(job.cancel_key.encode(), key)


def _job_or_none(data: bytes) -> Job | None:
    try:
        return decode_untrusted(data)
    except InvalidJob:
        return None


def _letter(code: str, message: str, job: Job | None, data: bytes) -> DeadLetter:
    """The job's dead letter, or a bounded preview of ``data`` when there is no job."""
    if job is None:
        return raw_letter(code, message, data)
    route = job.route if is_valid_name(job.route) else INVALID_ROUTE_TOKEN
    return DeadLetter(code=code, message=message, at_ms=now_ms(), route=route, job=job)
