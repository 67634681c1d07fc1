"""What a worker hears besides jobs, and the dead letters that do not come from a job run.

Three core-NATS subscriptions (subjects from ``broker/_subjects.py``):

- ``llm.cancel.<id>``: a client cancelled; the run serving it stops and
  answers ``cancelled``;
- ``llm.control.<pool>.pause``: another worker of the pool met a 429; this
  worker's budget waits out the same pause (a ``PoolPause``);
- the JetStream max-deliveries advisory (one queue group for every worker): a
  job delivered ``max_deliver`` times without an answer is copied to the DLQ,
  answered, and deleted from the work queue (NATS-NOTES.md).

``dead_letter_bug`` parks a job whose run raised an unexpected exception; the
worker's ``_run_job`` calls it so a bug in one job never reaches the task group.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from broker._errors import InternalError
from broker._protocol import DeadLetter, Error, Job, decode_job, decode_pause, encode, now_ms
from broker._subjects import (
    JOBS_STREAM,
    MAX_DELIVERIES_ADVISORY,
    cancel_all_subject,
    pause_subject,
)
from workers._context import PoolContext
from workers._intake import INVALID_ROUTE_TOKEN
from workers._job import JobRun

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
        rid = msg.subject.rsplit(".", 1)[-1]
        for run in self.running.values():
            if run.job is not None and run.job.id == rid:
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
            stored = await self.ctx.js.get_msg(JOBS_STREAM, seq)
        except NotFoundError:
            return
        await self._dead_letter_poison(stored.data or b"", seq)

    async def _dead_letter_poison(self, data: bytes, seq: int) -> None:
        try:
            job: Job | None = decode_job(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            job = None
        max_deliver = self.ctx.config.streams.max_deliver
        reason = f"delivered {max_deliver} times without an answer (workers died?)"
        letter = DeadLetter(
            code=InternalError.code,
            message=reason,
            at_ms=now_ms(),
            route=job.route if job else INVALID_ROUTE_TOKEN,
            job=job,
            raw=None if job else data.decode(errors="replace"),
        )
        await self.ctx.dead_letter(letter)
        if job is not None:
            error = Error(code=InternalError.code, message=reason)
            await self.ctx.nc.publish(job.reply_to, encode(error))
        await self.ctx.js.delete_msg(JOBS_STREAM, seq)


async def dead_letter_bug(ctx: PoolContext, run: JobRun) -> None:
    """Answer and park a job whose run raised unexpectedly, then terminate its message."""
    job = run.job
    with anyio.CancelScope(shield=True):
        if job is not None:
            err = Error(
                code=InternalError.code,
                message="llmrelay failed on this job; it was dead-lettered",
            )
            await ctx.nc.publish(job.reply_to, encode(err))
        await ctx.dead_letter(
            DeadLetter(
                code=InternalError.code,
                message="worker bug",
                at_ms=now_ms(),
                route=job.route if job else INVALID_ROUTE_TOKEN,
                job=job,
                raw=None if job else run.msg.data.decode(errors="replace"),
            )
        )
        await run.msg.term()
