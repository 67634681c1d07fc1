"""One job on one worker: decode, check, call upstream, stream, finish.

``JobRun.run`` reads as its steps::

    decode -> resolve model -> check deadline -> check circuit
           -> stream from the provider (time limits, cancel) -> done | failure

The input checks (decode, model) are ``_intake.py``'s: bad input never raises
out of here, it is answered and parked in the dead-letter queue. A failure
becomes a ``Decision`` (``_decide.decide``), and ``_apply`` is the one place
that turns it into a delayed redelivery, a re-queue to a backup pool, or an
error event (plus a dead letter when no target is left).

A run sees its worker only through a ``PoolContext`` (``_context.py``): the
pool's config, connection, HTTP shards, breaker, budget and metrics.

What a run may trust of its job, which attempt it is, and whether the worker
still holds it are its ``_delivery.Delivery``'s: a run whose lease lapsed
(``LeaseLost``) ends without publishing, acking or re-queueing anything. Every
event it publishes carries its attempt id and the job's ``job_seq``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import anyio
import msgspec
from nats.aio.msg import Msg

from broker._errors import (
    AllProvidersFailed,
    AuthFailed,
    BadUpstreamEvent,
    Cancelled,
    CircuitOpen,
    DeadlineExceeded,
    LeaseLost,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RelayError,
    StreamInterrupted,
)
from broker._protocol import (
    Attempt,
    Chunk,
    DeadLetter,
    Done,
    Error,
    Event,
    Job,
    LifecycleEvent,
    Notice,
    Timings,
    Usage,
    encode,
    now_ms,
)
from broker._subjects import events_subject
from workers._context import PoolContext
from workers._decide import Decision, Fail, FailureContext, Requeue, Retry, decide, next_target
from workers._delivery import Delivery
from workers._intake import DLQ_RETRY_S, read_job, resolve_model
from workers._ratelimit import estimate_tokens
from workers.providers._base import Finish, Malformed, StreamItem, TextDelta

log = logging.getLogger("llmrelay.worker")


class JobRun:
    """The life of one delivery of one job on this worker."""

    def __init__(self, ctx: PoolContext, msg: Msg, route: str | None) -> None:
        self.ctx = ctx
        self.msg = msg
        self.from_route = route  # None: came from the pool's own subject
        self.job: Job | None = None
        self.model = ""
        self.model_label = ""
        self.delivery = Delivery(msg, ctx.pool.ack_wait_s)
        self.job_seq, self.attempt = self.delivery.job_seq, self.delivery.attempt
        self.seq = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.degraded = False
        self.cancel_scope = anyio.CancelScope()
        self.cancelled_by_client = False
        self._items: AsyncIterator[StreamItem] | None = None
        self._shard: int | None = None

    @property
    def deliveries(self) -> int:
        return self.delivery.deliveries

    # --- steps -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except LeaseLost as exc:
            rid = self.job.id if self.job else "?"
            log.warning("job %s: %s; stopped, nothing published or acked", rid, exc.message)
        finally:
            await self._close_upstream()

    async def _run(self) -> None:
        self.job = job = await read_job(self.ctx, self.delivery)
        if job is None:
            return
        model = await resolve_model(self.ctx, self.delivery, job)
        if model is None:
            return
        self.model, self.model_label = model, self.ctx.model_label(model)
        self.ctx.metrics.job_started((now_ms() - job.created_ms) / 1000 if job.created_ms else 0.0)
        if self._remaining_s() <= 0:
            await self._finish_error(
                DeadlineExceeded.code, "the job's deadline passed while it was queued"
            )
            return
        if self.deliveries > 1:
            await self._publish(
                Notice(
                    kind="redelivered",
                    attempt=self.attempt,
                    reset=True,
                    message="the job was delivered again; earlier text is void",
                )
            )
        await self._attempt(job)

    async def _attempt(self, job: Job) -> None:
        if not await self._wait_pause_over():
            await self._finish_error(
                DeadlineExceeded.code, "the pool was paused (429) past the deadline"
            )
            return
        if not self.ctx.breaker.allow():
            await self._failed(job, CircuitOpen(f"circuit of pool {self.ctx.pool_name} is open"))
            return
        estimate = estimate_tokens(sum(len(m.content) for m in job.messages), job.max_tokens)
        self.ctx.budget.charge_tokens(estimate)
        try:
            with self.cancel_scope:
                finish = await self._stream(job)
        except ProviderError as err:
            self.ctx.budget.charge_tokens(-estimate)
            await self._close_upstream()
            await self._failed(job, err)
            return
        except DeadlineExceeded:
            self.ctx.budget.charge_tokens(-estimate)
            await self._finish_error(DeadlineExceeded.code, "the job's deadline passed mid-answer")
            return
        if self.cancel_scope.cancelled_caught:
            await self._cancelled()
            return
        assert finish is not None
        await self._succeeded(job, finish, estimate)

    async def _wait_pause_over(self) -> bool:
        """A job pulled before a 429 paused the pool waits out the pause, within its deadline."""
        pause_s = self.ctx.budget.pause_remaining_s()
        if pause_s <= 0:
            return True
        if pause_s >= self._remaining_s():
            return False
        await anyio.sleep(pause_s)
        return True

    # --- streaming ---------------------------------------------------------------

    async def _stream(self, job: Job) -> Finish | None:
        self.ctx.metrics.upstream_request()
        self._shard, provider = self.ctx.http.acquire()
        self._items = provider.stream(job, self.model).__aiter__()
        while True:
            item = await self._next(self._items)
            finish = await self._handle_item(item)
            if finish is not None:
                return finish

    async def _close_upstream(self) -> None:
        """Close the provider's stream (after the client has its answer) and free the shard.

        After a ``Finish`` the adapter drains the last bytes on its way out, so
        the connection goes back to the pool; before one, closing aborts the
        upstream call (cancel, failover).
        """
        items, self._items = self._items, None
        if items is not None:
            await _close(items)
        if self._shard is not None:
            self.ctx.http.release(self._shard)
            self._shard = None

    async def _next(self, items: AsyncIterator[StreamItem]) -> StreamItem:
        """The next item, within the time-to-first-token or idle limit and the deadline."""
        timeouts = self.ctx.pool.timeouts
        limit = timeouts.ttft_s if self.first_token_at is None else timeouts.idle_s
        remaining = self._remaining_s()
        with anyio.move_on_after(min(limit, remaining)) as scope:
            try:
                return await items.__anext__()
            except StopAsyncIteration:
                raise StreamInterrupted("the provider's stream ended without a finish") from None
        assert scope.cancelled_caught
        if remaining <= limit:
            raise DeadlineExceeded("the job's deadline passed mid-answer")
        if self.first_token_at is None:
            raise ProviderTimeout(f"no first token within {limit:g}s")
        raise StreamInterrupted(f"the stream stalled for {limit:g}s mid-answer")

    async def _handle_item(self, item: StreamItem) -> Finish | None:
        if isinstance(item, TextDelta):
            if not item.text:
                return None
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.ctx.metrics.first_token(self.model_label, self.first_token_at - self.started)
            if self.seq == 0:
                chunk = Chunk(seq=0, attempt=self.attempt, delta=item.text,
                              pool=self.ctx.pool_name, model=self.model)  # fmt: skip
            else:
                chunk = Chunk(seq=self.seq, attempt=self.attempt, delta=item.text)
            await self._publish(chunk)
            self.seq += 1
            return None
        if isinstance(item, Malformed):
            self.ctx.metrics.malformed_event()
            if self._has_other_target():
                raise BadUpstreamEvent(f"undecodable event from the provider: {item.raw[:120]!r}")
            self.degraded = True
            return None
        return item

    def _has_other_target(self) -> bool:
        assert self.job is not None
        return next_target(self._failure_context(self.job), self.ctx.config) is not None

    # --- outcomes ----------------------------------------------------------------

    async def _succeeded(self, job: Job, finish: Finish, estimate: int) -> None:
        usage = finish.usage or Usage(
            prompt_tokens=max(1, sum(len(m.content) for m in job.messages) // 4),
            completion_tokens=self.seq,
        )
        self.ctx.budget.charge_tokens(usage.prompt_tokens + usage.completion_tokens - estimate)
        state = self.ctx.breaker.record_success()
        self.ctx.circuit_changed(state)
        total_s = time.monotonic() - self.started
        await self._publish(
            Done(
                attempt=self.attempt,
                finish_reason=finish.reason,
                usage=usage,
                pool=self.ctx.pool_name,
                model=self.model,
                timings=self._timings(job, total_s),
                degraded=self.degraded,
                attempts=job.attempts,
            )
        )
        await self._ack()
        await self._close_upstream()
        self.ctx.metrics.job_done(
            self.model_label, total_s, usage.prompt_tokens, usage.completion_tokens
        )
        await self._lifecycle("done", f"{self.ctx.pool_name}/{self.model} {total_s * 1000:.0f}ms")

    def _timings(self, job: Job, total_s: float) -> Timings:
        queued_ms = float(now_ms() - job.created_ms) - total_s * 1000 if job.created_ms else 0.0
        ttft = (self.first_token_at - self.started) * 1000 if self.first_token_at else None
        return Timings(queued_ms=max(0.0, queued_ms), ttft_ms=ttft, total_ms=total_s * 1000)

    async def _failed(self, job: Job, err: ProviderError) -> None:
        self.ctx.metrics.attempt_failed(self.model_label, err.code)
        if err.health:
            if isinstance(err, AuthFailed):
                self.ctx.breaker.trip()
            self.ctx.circuit_changed(self.ctx.breaker.record_failure())
        if isinstance(err, RateLimited):
            # The whole pool backs off: Retry-After if given, else the base backoff.
            await self.ctx.pause_pool(err.retry_after_s or self.ctx.pool.backoff_base_s)
        log.info(
            "job %s attempt %d on %s failed: %s",
            job.id,
            self.attempt,
            self.ctx.pool_name,
            err,
            extra=self._log_fields(job),
        )
        await self._apply(decide(err, self._failure_context(job), self.ctx.config), job, err)

    def _log_fields(self, job: Job) -> dict[str, object]:
        """What JSON log lines carry (cli/_common.JsonFormatter); never message content."""
        return {
            "request_id": job.id,
            "route": job.route,
            "pool": self.ctx.pool_name,
            "attempt": self.attempt,
            "worker_id": self.ctx.worker_id,
        }

    def _failure_context(self, job: Job) -> FailureContext:
        return FailureContext(
            job=job,
            pool_name=self.ctx.pool_name,
            deliveries=self.deliveries,
            chunks_sent=self.seq,
            remaining_s=self._remaining_s(),
            pinned=job.pool is not None,
        )

    async def _apply(self, decision: Decision, job: Job, err: ProviderError) -> None:
        if isinstance(decision, Retry):
            await self._retry(decision, err)
        elif isinstance(decision, Requeue):
            await self._requeue(decision, job, err)
        else:
            await self._fail(decision, job, err)

    async def _retry(self, decision: Retry, err: ProviderError) -> None:
        self.ctx.metrics.retried()
        await self._publish(
            Notice(
                kind="retry",
                attempt=self.attempt,
                from_pool=self.ctx.pool_name,
                to_pool=self.ctx.pool_name,
                reset=self.seq > 0,
                delay_ms=int(decision.delay_s * 1000),
                message=f"{err.code}: {err.message}",
            )
        )
        await self._nak(decision.delay_s)
        await self._lifecycle("retry", f"{err.code}; again in {decision.delay_s:.2f}s")

    async def _requeue(self, decision: Requeue, job: Job, err: ProviderError) -> None:
        # Tell the client first: the backup may start streaming within a millisecond.
        await self._publish(
            Notice(
                kind="failover",
                attempt=self.attempt,
                from_pool=self.ctx.pool_name,
                to_pool=decision.pool,
                reset=decision.reset,
                message=f"{err.code}: {err.message}",
            )
        )
        await self._lifecycle("failover", f"{self.ctx.pool_name} -> {decision.pool}: {err.code}")
        moved = msgspec.structs.replace(
            job, attempts=[*job.attempts, self._attempt_record(err)], rank=decision.rank
        )
        try:
            await self.delivery.requeue(self.ctx.js, decision.pool, moved, self._remaining_s())
        except RelayError as exc:  # full backup queue, timeout, id taken: hand the job back
            log.warning(
                "re-queue of %s to %s failed (%s); redelivering",
                job.id,
                decision.pool,
                exc,
                extra=self._log_fields(job),
            )
            await self._nak(1.0)
            return
        self.ctx.metrics.failed_over(decision.pool)
        await self._ack()

    async def _fail(self, decision: Fail, job: Job, err: ProviderError) -> None:
        attempts = [*job.attempts, self._attempt_record(err)]
        if decision.dead_letter and not await self._park(decision, job, attempts):
            # The DLQ did not take it: hand the job back rather than ack it unparked.
            # It comes back (a new attempt, or deadline_exceeded) or, after
            # max_deliver tries, the max-deliveries advisory parks it.
            await self._nak(DLQ_RETRY_S)
            return
        retryable = decision.code == AllProvidersFailed.code
        await self._publish(
            Error(
                code=decision.code,
                message=decision.message,
                retryable=retryable,
                attempt=self.attempt,
                attempts=attempts,
            )
        )
        await self._ack()
        self.ctx.metrics.job_outcome(self.model_label, "error")
        if not decision.dead_letter:  # PoolContext.dead_letter announced "dead" already
            await self._lifecycle("failed", decision.code)

    async def _park(self, decision: Fail, job: Job, attempts: list[Attempt]) -> bool:
        letter = DeadLetter(
            code=decision.code,
            message=decision.message,
            at_ms=now_ms(),
            route=job.route,
            job=msgspec.structs.replace(job, attempts=attempts),
        )
        return await self.ctx.dead_letter(letter)

    def _attempt_record(self, err: ProviderError) -> Attempt:
        return Attempt(
            pool=self.ctx.pool_name,
            model=self.model,
            code=err.code,
            message=err.message,
            retryable=err.retryable,
            status=err.status,
            deliveries=self.deliveries,
            chunks_sent=self.seq,
            at_ms=now_ms(),
        )

    async def _cancelled(self) -> None:
        if not self.cancelled_by_client:
            # Shutdown: hand the job back to the queue for another worker.
            await self._nak()
            return
        await self._finish_error(Cancelled.code, "the client cancelled the request")

    async def _finish_error(self, code: str, message: str) -> None:
        assert self.job is not None
        await self._publish(
            Error(code=code, message=message, attempt=self.attempt, attempts=self.job.attempts)
        )
        await self._ack()
        self.ctx.metrics.job_outcome(self.model_label, code)
        await self._lifecycle("failed", code)

    # --- helpers -----------------------------------------------------------------

    def _remaining_s(self) -> float:
        assert self.job is not None
        return self.job.deadline_ms / 1000 - time.time()

    async def _publish(self, event: Event) -> None:
        """Publish one event of this attempt, stamped with the job's ``job_seq``."""
        assert self.job is not None
        self.delivery.hold()
        event.job_seq = self.job_seq
        await self.ctx.nc.publish(self.job.reply_to, encode(event))

    async def _ack(self) -> None:
        await self.delivery.ack()

    async def _nak(self, delay_s: float | None = None) -> None:
        await self.delivery.nak(delay_s)

    async def _lifecycle(self, kind: str, detail: str) -> None:
        assert self.job is not None
        event = LifecycleEvent(
            kind=kind,
            request_id=self.job.id,
            route=self.job.route,
            pool=self.ctx.pool_name,
            at_ms=now_ms(),
            detail=detail,
        )
        await self.ctx.nc.publish(events_subject(kind), encode(event))


async def _close(items: AsyncIterator[StreamItem]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()
