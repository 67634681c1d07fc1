"""One job on one worker: decode, check, call upstream, stream, finish.

``JobRun.run`` reads as its steps::

    decode -> resolve model -> check deadline -> check circuit
           -> stream from the provider (time limits, cancel) -> done | failure

A failure becomes a ``Decision`` (``_decide.decide``), and ``_apply`` is the one
place that turns it into a delayed redelivery, a re-queue to a backup pool, or
an error event (plus a dead letter when no target is left). Bad input never
raises out of here: it is answered (when a reply subject can be read) and
parked in the dead-letter queue.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import msgspec
import nats.errors
from nats.aio.msg import Msg

from broker._errors import (
    AllProvidersFailed,
    AuthFailed,
    BadUpstreamEvent,
    Cancelled,
    CircuitOpen,
    DeadlineExceeded,
    InvalidJob,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    StreamInterrupted,
    UnknownRoute,
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
    decode_job,
    encode,
    now_ms,
)
from broker._subjects import REPLY_PREFIX, events_subject, is_valid_name, pool_subject
from workers._decide import Decision, Fail, FailureContext, Requeue, Retry, decide, next_target
from workers._ratelimit import estimate_tokens
from workers.providers._base import Finish, Malformed, StreamItem, TextDelta

if TYPE_CHECKING:
    from workers._worker import Worker

log = logging.getLogger("llmrelay.worker")

INVALID_ROUTE_TOKEN = "_invalid"


class JobRun:
    """The life of one delivery of one job on this worker."""

    def __init__(self, worker: Worker, msg: Msg, route: str | None) -> None:
        self.w = worker
        self.msg = msg
        self.from_route = route  # None: came from the pool's own subject
        self.job: Job | None = None
        self.model = ""
        self.model_label = ""
        self.attempt = 0
        self.seq = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.degraded = False
        self.cancel_scope = anyio.CancelScope()
        self.cancelled_by_client = False
        self.last_progress = time.monotonic()
        self._items: AsyncIterator[StreamItem] | None = None
        self._shard: int | None = None

    @property
    def deliveries(self) -> int:
        return int(self.msg.metadata.num_delivered)

    # --- steps -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._close_upstream()

    async def _run(self) -> None:
        job = await self._decode()
        if job is None:
            return
        self.job = job
        if not await self._resolve_model(job):
            return
        self.attempt = sum(a.deliveries for a in job.attempts) + self.deliveries
        self.w.metrics.job_started((now_ms() - job.created_ms) / 1000 if job.created_ms else 0.0)
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
        if not self.w.breaker.allow():
            await self._failed(job, CircuitOpen(f"circuit of pool {self.w.pool_name} is open"))
            return
        estimate = estimate_tokens(sum(len(m.content) for m in job.messages), job.max_tokens)
        self.w.budget.charge_tokens(estimate)
        try:
            with self.cancel_scope:
                finish = await self._stream(job)
        except ProviderError as err:
            self.w.budget.charge_tokens(-estimate)
            await self._close_upstream()
            await self._failed(job, err)
            return
        except DeadlineExceeded:
            self.w.budget.charge_tokens(-estimate)
            await self._finish_error(DeadlineExceeded.code, "the job's deadline passed mid-answer")
            return
        if self.cancel_scope.cancelled_caught:
            await self._cancelled()
            return
        assert finish is not None
        await self._succeeded(job, finish, estimate)

    async def _wait_pause_over(self) -> bool:
        """A job pulled before a 429 paused the pool waits out the pause, within its deadline."""
        pause_s = self.w.budget.pause_remaining_s()
        if pause_s <= 0:
            return True
        if pause_s >= self._remaining_s():
            return False
        await anyio.sleep(pause_s)
        return True

    # --- streaming ---------------------------------------------------------------

    async def _stream(self, job: Job) -> Finish | None:
        self.w.metrics.upstream_request()
        assert self.w.http is not None
        self._shard, provider = self.w.http.acquire()
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
        if self._shard is not None and self.w.http is not None:
            self.w.http.release(self._shard)
            self._shard = None

    async def _next(self, items: AsyncIterator[StreamItem]) -> StreamItem:
        """The next item, within the time-to-first-token or idle limit and the deadline."""
        timeouts = self.w.pool.timeouts
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
                self.w.metrics.first_token(self.model_label, self.first_token_at - self.started)
            if self.seq == 0:
                chunk = Chunk(seq=0, attempt=self.attempt, delta=item.text,
                              pool=self.w.pool_name, model=self.model)  # fmt: skip
            else:
                chunk = Chunk(seq=self.seq, attempt=self.attempt, delta=item.text)
            await self._publish(chunk)
            self.seq += 1
            return None
        if isinstance(item, Malformed):
            self.w.metrics.malformed_event()
            if self._has_other_target():
                raise BadUpstreamEvent(f"undecodable event from the provider: {item.raw[:120]!r}")
            self.degraded = True
            return None
        return item

    def _has_other_target(self) -> bool:
        assert self.job is not None
        return next_target(self._failure_context(self.job), self.w.config) is not None

    # --- outcomes ----------------------------------------------------------------

    async def _succeeded(self, job: Job, finish: Finish, estimate: int) -> None:
        usage = finish.usage or Usage(
            prompt_tokens=max(1, sum(len(m.content) for m in job.messages) // 4),
            completion_tokens=self.seq,
        )
        self.w.budget.charge_tokens(usage.prompt_tokens + usage.completion_tokens - estimate)
        state = self.w.breaker.record_success()
        self.w.circuit_changed(state)
        total_s = time.monotonic() - self.started
        await self._publish(
            Done(
                attempt=self.attempt,
                finish_reason=finish.reason,
                usage=usage,
                pool=self.w.pool_name,
                model=self.model,
                timings=self._timings(job, total_s),
                degraded=self.degraded,
                attempts=job.attempts,
            )
        )
        await self.msg.ack()
        await self._close_upstream()
        self.w.metrics.job_done(
            self.model_label, total_s, usage.prompt_tokens, usage.completion_tokens
        )
        await self._lifecycle("done", f"{self.w.pool_name}/{self.model} {total_s * 1000:.0f}ms")

    def _timings(self, job: Job, total_s: float) -> Timings:
        queued_ms = float(now_ms() - job.created_ms) - total_s * 1000 if job.created_ms else 0.0
        ttft = (self.first_token_at - self.started) * 1000 if self.first_token_at else None
        return Timings(queued_ms=max(0.0, queued_ms), ttft_ms=ttft, total_ms=total_s * 1000)

    async def _failed(self, job: Job, err: ProviderError) -> None:
        self.w.metrics.attempt_failed(self.model_label, err.code)
        if err.health:
            if isinstance(err, AuthFailed):
                self.w.breaker.trip()
            self.w.circuit_changed(self.w.breaker.record_failure())
        if isinstance(err, RateLimited):
            # The whole pool backs off: Retry-After if given, else the base backoff.
            await self.w.pause_pool(err.retry_after_s or self.w.pool.backoff_base_s)
        log.info(
            "job %s attempt %d on %s failed: %s",
            job.id,
            self.attempt,
            self.w.pool_name,
            err,
            extra=self._log_fields(job),
        )
        await self._apply(decide(err, self._failure_context(job), self.w.config), job, err)

    def _log_fields(self, job: Job) -> dict[str, object]:
        """What JSON log lines carry (cli/_common.JsonFormatter); never message content."""
        return {
            "request_id": job.id,
            "route": job.route,
            "pool": self.w.pool_name,
            "attempt": self.attempt,
            "worker_id": self.w.worker_id,
        }

    def _failure_context(self, job: Job) -> FailureContext:
        return FailureContext(
            job=job,
            pool_name=self.w.pool_name,
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
        self.w.metrics.retried()
        await self._publish(
            Notice(
                kind="retry",
                attempt=self.attempt,
                from_pool=self.w.pool_name,
                to_pool=self.w.pool_name,
                reset=self.seq > 0,
                delay_ms=int(decision.delay_s * 1000),
                message=f"{err.code}: {err.message}",
            )
        )
        await self.msg.nak(delay=decision.delay_s)
        await self._lifecycle("retry", f"{err.code}; again in {decision.delay_s:.2f}s")

    async def _requeue(self, decision: Requeue, job: Job, err: ProviderError) -> None:
        # Tell the client first: the backup may start streaming within a millisecond.
        await self._publish(
            Notice(
                kind="failover",
                attempt=self.attempt,
                from_pool=self.w.pool_name,
                to_pool=decision.pool,
                reset=decision.reset,
                message=f"{err.code}: {err.message}",
            )
        )
        await self._lifecycle("failover", f"{self.w.pool_name} -> {decision.pool}: {err.code}")
        moved = msgspec.structs.replace(
            job, attempts=[*job.attempts, self._attempt_record(err)], rank=decision.rank
        )
        ttl_s = max(1, math.ceil(self._remaining_s()) + 1)
        headers = {"Nats-Msg-Id": f"{job.id}.{len(moved.attempts)}", "Nats-TTL": f"{ttl_s}s"}
        try:
            await self.w.js.publish(
                pool_subject(decision.pool), encode(moved), headers=headers, timeout=5.0
            )
        except nats.errors.Error as exc:  # full backup queue, timeout: hand the job back
            log.warning(
                "re-queue of %s to %s failed (%r); redelivering",
                job.id,
                decision.pool,
                exc,
                extra=self._log_fields(job),
            )
            await self.msg.nak(delay=1.0)
            return
        self.w.metrics.failed_over(decision.pool)
        await self.msg.ack()

    async def _fail(self, decision: Fail, job: Job, err: ProviderError) -> None:
        attempts = [*job.attempts, self._attempt_record(err)]
        if decision.dead_letter:
            await self.w.dead_letter(
                DeadLetter(
                    code=decision.code,
                    message=decision.message,
                    at_ms=now_ms(),
                    route=job.route,
                    job=msgspec.structs.replace(job, attempts=attempts),
                )
            )
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
        await self.msg.ack()
        self.w.metrics.job_outcome(self.model_label, "error")
        if not decision.dead_letter:  # Worker.dead_letter announced "dead" already
            await self._lifecycle("failed", decision.code)

    def _attempt_record(self, err: ProviderError) -> Attempt:
        return Attempt(
            pool=self.w.pool_name,
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
            await self.msg.nak()
            return
        await self._finish_error(Cancelled.code, "the client cancelled the request")

    async def _finish_error(self, code: str, message: str) -> None:
        assert self.job is not None
        await self._publish(
            Error(code=code, message=message, attempt=self.attempt, attempts=self.job.attempts)
        )
        await self.msg.ack()
        self.w.metrics.job_outcome(self.model_label, code)
        await self._lifecycle("failed", code)

    # --- input checks ------------------------------------------------------------

    async def _decode(self) -> Job | None:
        try:
            job = decode_job(self.msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await self._reject_raw(InvalidJob.code, f"the job could not be decoded: {exc}")
            return None
        if not _valid_reply(job.reply_to):
            await self._reject_raw(InvalidJob.code, "reply_to must be a subject under llm.reply.")
            return None
        return job

    async def _resolve_model(self, job: Job) -> bool:
        model = self.w.model_for(job, self.from_route)
        if model is None:
            await self._reject(
                job,
                UnknownRoute.code,
                f"pool {self.w.pool_name} does not serve route {job.route!r}",
            )
            return False
        self.model = model
        self.model_label = self.w.model_label(model)
        return True

    async def _reject(self, job: Job, code: str, message: str) -> None:
        await self._publish(Error(code=code, message=message, attempts=job.attempts))
        route = job.route if is_valid_name(job.route) else INVALID_ROUTE_TOKEN
        await self.w.dead_letter(
            DeadLetter(code=code, message=message, at_ms=now_ms(), route=route, job=job)
        )
        await self.msg.term()

    async def _reject_raw(self, code: str, message: str) -> None:
        """Answer a job we could not decode, if a reply subject can be read from it."""
        loose = _loose_fields(self.msg.data)
        reply, route = loose.get("reply_to"), loose.get("route")
        if isinstance(reply, str) and _valid_reply(reply):
            await self.w.nc.publish(reply, encode(Error(code=code, message=message)))
        token = route if isinstance(route, str) and is_valid_name(route) else INVALID_ROUTE_TOKEN
        raw = self.msg.data[: self.w.config.streams.max_job_bytes].decode(errors="replace")
        await self.w.dead_letter(
            DeadLetter(code=code, message=message, at_ms=now_ms(), route=token, raw=raw)
        )
        await self.msg.term()

    # --- helpers -----------------------------------------------------------------

    def _remaining_s(self) -> float:
        assert self.job is not None
        return self.job.deadline_ms / 1000 - time.time()

    async def _publish(self, event: Event) -> None:
        assert self.job is not None
        await self.w.nc.publish(self.job.reply_to, encode(event))

    async def _lifecycle(self, kind: str, detail: str) -> None:
        assert self.job is not None
        event = LifecycleEvent(
            kind=kind,
            request_id=self.job.id,
            route=self.job.route,
            pool=self.w.pool_name,
            at_ms=now_ms(),
            detail=detail,
        )
        await self.w.nc.publish(events_subject(kind), encode(event))


async def _close(items: AsyncIterator[StreamItem]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


def _valid_reply(subject: str) -> bool:
    """Only plain subjects under llm.reply.: a job must not make a worker publish elsewhere."""
    return (
        subject.startswith(REPLY_PREFIX + ".")
        and len(subject) > len(REPLY_PREFIX) + 1
        and not any(c in subject for c in "*> \t\r\n")
    )


def _loose_fields(data: bytes) -> dict[str, object]:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}
