"""One job on one worker: decode, check, call upstream, stream, finish.

``JobRun.run`` reads as its steps::

    decode -> resolve model -> check deadline -> (a redelivery: read back the lost text)
           -> check circuit -> stream from the provider (time limits, cancel)
           -> done | failure (retry here, re-queue, or error)

The input checks are ``_intake.py``'s: bad input never raises out of here, it
is answered and parked in the dead-letter queue. A failure becomes a
``Decision`` (``_decide.decide``), and ``_apply`` is the one place that turns
it into a retry (in place, under the same attempt id: nothing of the failed
call was published; or a delayed redelivery), a re-queue to a backup pool, or
an error event (plus a dead letter when no target is left). A run sees its
worker only through a ``PoolContext`` (``_context.py``).

What a run may trust of its job, which attempt it is, and whether the worker
still holds it are its ``_delivery.Delivery``'s: a run whose lease lapsed
(``LeaseLost``) ends without publishing, acking or re-queueing anything. Every
event it publishes carries its attempt id and the job's ``job_seq``. A job
whose caller already has text continues that answer (``_continuation.py``).
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
from nats.aio.msg import Msg

from broker._errors import (
    AllProvidersFailed,
    BadUpstreamEvent,
    Cancelled,
    CannotContinue,
    CircuitOpen,
    DeadlineExceeded,
    LeaseLost,
    ProviderError,
    RateLimited,
    RelayError,
)
from broker._protocol import (
    Attempt,
    Chunk,
    Done,
    Error,
    Event,
    Job,
    Notice,
    Timings,
    TokenLogprob,
    ToolCallDelta,
    Usage,
    encode,
    now_ms,
)
from workers._context import PoolContext
from workers._continuation import Continuation, lost_answer, resumed_job
from workers._decide import (
    Decision,
    Fail,
    FailureContext,
    Requeue,
    Retry,
    decide,
    next_target,
)
from workers._delivery import Delivery
from workers._intake import DLQ_RETRY_S, read_job, resolve_model, unsupported
from workers._ratelimit import job_estimate, prompt_chars
from workers._upstream import RunCancel, UpstreamCall
from workers.providers._base import Finish, Malformed, ReasoningDelta, StreamItem, TextDelta

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
        self.trace = ctx.trace_delivery(self.delivery)  # spans (``_tracing.py``), or None
        self.seq = 0
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.degraded = False
        self.cancel_scope = RunCancel()
        self.cancelled_by_client = False
        self.retries_here = 0  # in-place retries of this run
        self.tool_calls_sent = False  # a continuation cannot take over half a tool call
        self.cont: Continuation | None = None
        self._call: UpstreamCall | None = None
        self.final: Chunk | None = None  # the last chunk, kept to go out inside done

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
            if self.trace is not None:
                self.trace.end(self.job)

    async def _run(self) -> None:
        self.job = job = await read_job(self.ctx, self.delivery)
        if job is None:
            return
        model = await resolve_model(self.ctx, self.delivery, job)
        if model is None:
            return
        self.model, self.model_label = model, self.ctx.model_label(model)
        self.cont = Continuation(job, self.ctx.pool, model, self.ctx.prefill_refused)
        self.ctx.metrics.job_started((now_ms() - job.created_ms) / 1000 if job.created_ms else 0.0)
        if self._remaining_s() <= 0:
            await self._finish_error(
                DeadlineExceeded.code, "the job's deadline passed while it was queued"
            )
            return
        if self.deliveries > 1:
            if not await self._recover(job):
                return
            await self._publish(self.cont.redelivered(self.attempt))
        while await self._attempt(job):
            self.retries_here += 1

    async def _recover(self, job: Job) -> bool:
        """A redelivery: continue from what a lost delivery sent (``lost_answer``);
        False when that had ended the answer already (only its ack was lost)."""
        assert self.cont is not None
        answer = None if self.cont.active else await lost_answer(self.ctx.nc, job, self.job_seq)
        if answer is not None and answer.finished:
            log.info("job %s: a lost delivery had answered it; acked", job.id)
            await self.delivery.ack()
            return False
        if answer is not None and answer.text:
            self.cont = Continuation(resumed_job(job, answer), self.ctx.pool, self.model,
                                     self.ctx.prefill_refused)  # fmt: skip
        return True

    async def _attempt(self, job: Job) -> bool:
        """One upstream call and its outcome; True: call again, in place."""
        paused = await self._paused(job)
        if paused is not None:
            return paused
        refused = unsupported(self.ctx, job)
        if refused is not None:
            return await self._failed(job, refused)
        if not self.ctx.circuits.allow(self.model):
            circuit = CircuitOpen(f"circuit of {self.ctx.pool_name}/{self.model} is open")
            return await self._failed(job, circuit)
        estimate = job_estimate(job)
        self.ctx.budget.charge_tokens(estimate)
        try:
            with self.cancel_scope.scope() as scope:
                finish = await self._stream(job)
        except ProviderError as err:
            self.ctx.budget.charge_tokens(-estimate)
            await self._close_upstream()
            assert self.cont is not None
            if self.cont.prefill_refused(err, self.seq):
                log.info("%s/%s refused an assistant prefill (%s); restarting the answer",
                         self.ctx.pool_name, self.model, err.message)  # fmt: skip
                return True
            return await self._failed(job, err)
        except DeadlineExceeded:
            self.ctx.budget.charge_tokens(-estimate)
            await self._finish_error(DeadlineExceeded.code, "the job's deadline passed mid-answer")
            return False
        if scope.cancelled_caught or self.cancel_scope.requested:
            await self._cancelled()  # (a kept final chunk goes nowhere: no done follows)
            return False
        assert finish is not None
        await self._succeeded(job, finish, estimate)
        return False

    async def _paused(self, job: Job) -> bool | None:
        """None: the pool is not paused (a 429). Else what the pause makes of this run,
        as ``_attempt`` answers: a short one is waited out here (within the deadline),
        a longer one is a 429 of the run's own (to a healthy backup, if there is one)."""
        pause_s = self.ctx.budget.pause_remaining_s()
        if pause_s <= 0:
            return None
        if pause_s > self.ctx.pool.retry_after_wait_max_s or pause_s >= self._remaining_s():
            message = f"pool {self.ctx.pool_name} is paused for {pause_s:.1f}s (429)"
            return await self._failed(job, RateLimited(message, retry_after_s=pause_s))
        return await self._wait(pause_s)

    async def _wait(self, seconds: float) -> bool:
        """Wait before calling again in place; False once the run was cancelled meanwhile."""
        with self.cancel_scope.scope():
            await anyio.sleep(seconds)
        if self.cancel_scope.requested:
            await self._cancelled()
            return False
        return True

    # --- streaming ---------------------------------------------------------------

    async def _stream(self, job: Job) -> Finish | None:
        self.ctx.metrics.upstream_request()
        assert self.cont is not None
        job = job if self.trace is None else self.trace.attempt(job, self.model)
        self._call = call = UpstreamCall(
            self.ctx.http, self.ctx.pool.timeouts, job.deadline_ms / 1000
        )
        call.open(*self.cont.request(job), model=self.model)
        while True:
            item = await call.next()
            if self.final is not None and type(item) is not Finish:
                await self._publish(self.final)  # (a last text's finish is the next item)
                self.final = None
            finish = await self._handle_item(item)
            if finish is not None:
                self.cont.finish()
                return finish

    async def _close_upstream(self) -> None:
        """Close the provider's stream (after the client has its answer) and free the shard.

        After a ``Finish`` the adapter drains the last bytes on its way out, so
        the connection goes back to the pool; before one, closing aborts the
        upstream call (cancel, failover).
        """
        call, self._call = self._call, None
        if call is not None:
            await call.close()

    async def _handle_item(self, item: StreamItem) -> Finish | None:
        if isinstance(item, TextDelta):
            if not item.text:
                return None
            self._first_token()
            assert self.cont is not None
            text = self.cont.feed(item.text, item.tokens)
            if text:  # a spliced restart's logprobs would not match the text sent
                lp = item.logprobs if text == item.text else None
                await self._chunk(text, logprobs=lp, last=item.last)
            return None
        if isinstance(item, ToolCallDelta | ReasoningDelta):
            self._first_token()
            if isinstance(item, ToolCallDelta):
                self.tool_calls_sent = True
                await self._chunk("", [item])
            elif item.text:
                await self._chunk("", reasoning=item.text)
            return None
        if isinstance(item, Malformed):
            self.ctx.metrics.malformed_event()
            assert self.job is not None
            if next_target(self._failure_context(self.job), self.ctx.config) is not None:
                raise BadUpstreamEvent(f"undecodable event from the provider: {item.raw[:120]!r}")
            self.degraded = True
            return None
        return item

    def _first_token(self) -> None:
        if self._call is not None:
            self._call.texts += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.ctx.metrics.first_token(self.model_label, self.first_token_at - self.started)

    async def _chunk(
        self, text: str, tool_calls: list[ToolCallDelta] | None = None,
        reasoning: str = "", logprobs: list[TokenLogprob] | None = None, last: bool = False,
    ) -> None:  # fmt: skip
        """Publish the next chunk; one whose finish came with it (``last``) is kept for
        ``done`` instead, when the job's client reads it there (``Done.final``)."""
        await self._announce_resume()
        chunk = Chunk(seq=self.seq, attempt=self.attempt, delta=text, tool_calls=tool_calls,
                      reasoning=reasoning, logprobs=logprobs, job_seq=self.job_seq)  # fmt: skip
        if self.seq == 0:
            chunk.pool, chunk.model = self.ctx.pool_name, self.model
            assert self.cont is not None  # and a continuation's first chunk says where it goes
            chunk.offset = len(self.cont.have) if self.cont.active else None
        self.seq += 1
        assert self.job is not None
        if last and self.job.final_in_done and self.ctx.config.streams.replicas < 2:
            self.final = chunk  # (on a cluster done waits for its PubAck: text would wait)
        else:
            await self._publish(chunk)

    async def _announce_resume(self) -> None:
        """Before a continuing attempt's first event: the caller's text stands."""
        assert self.cont is not None
        notice = self.cont.announcement(self.attempt, self.ctx.pool_name)
        if notice is not None:
            await self._publish(notice)

    # --- outcomes ----------------------------------------------------------------

    async def _succeeded(self, job: Job, finish: Finish, estimate: int) -> None:
        assert self.cont is not None
        usage = finish.usage or Usage(prompt_tokens=max(1, prompt_chars(job) // 4),
                                      completion_tokens=self.cont.sent_tokens)  # fmt: skip
        self.ctx.budget.charge_tokens(usage.prompt_tokens + usage.completion_tokens - estimate)
        self.ctx.circuits.record_success(self.model)
        await self._announce_resume()  # a continuation with nothing to add still keeps the text
        total_s = time.monotonic() - self.started
        answer_usage = msgspec.structs.replace(
            usage, completion_tokens=usage.completion_tokens + self.cont.prior_tokens
        )
        done = Done(attempt=self.attempt, finish_reason=finish.reason, usage=answer_usage,
                    pool=self.ctx.pool_name, model=self.model, degraded=self.degraded,
                    timings=self._timings(job, total_s), attempts=job.attempts,
                    embeddings=finish.embeddings, chunks=self.seq,
                    final=self.final or msgspec.UNSET)  # fmt: skip
        if self.trace is not None:
            self.trace.succeeded(self.model, finish, usage, self.first_token_at, self.cont)
        await self._publish(self.ctx.priced(job, usage, done))
        await self.delivery.ack()
        await self._close_upstream()
        self.ctx.metrics.job_done(
            self.model_label, total_s, usage.prompt_tokens, usage.completion_tokens
        )
        await self._announce("done", f"{self.ctx.pool_name}/{self.model} {total_s * 1000:.0f}ms")

    def _timings(self, job: Job, total_s: float) -> Timings:
        queued_ms = float(now_ms() - job.created_ms) - total_s * 1000 if job.created_ms else 0.0
        ttft = (self.first_token_at - self.started) * 1000 if self.first_token_at else None
        return Timings(queued_ms=max(0.0, queued_ms), ttft_ms=ttft, total_ms=total_s * 1000)

    async def _failed(self, job: Job, err: ProviderError) -> bool:
        """Record a failed call and act on the decision; True: call again, in place."""
        self.ctx.metrics.attempt_failed(self.model_label, err.code)
        self.ctx.circuits.record_failure(self.model, err)
        if isinstance(err, RateLimited) and not self.ctx.budget.pause_remaining_s():
            # The whole pool backs off: Retry-After if given (within the pool's ceiling),
            # else the base backoff.
            pause_s = min(
                err.retry_after_s or self.ctx.pool.backoff_base_s, self.ctx.pool.pause_max_s
            )
            await self.ctx.pause_pool(pause_s)
        log.info("job %s attempt %d on %s failed: %s", job.id, self.attempt,
                 self.ctx.pool_name, err, extra=self.ctx.log_fields(job, self.attempt))  # fmt: skip
        decision = decide(
            err, self._failure_context(job), self.ctx.config, healthy=self.ctx.target_healthy
        )
        return await self._apply(decision, job, err)

    def _failure_context(self, job: Job) -> FailureContext:
        assert self.cont is not None
        return FailureContext(
            job=job,
            pool_name=self.ctx.pool_name,
            deliveries=self.deliveries,
            chunks_sent=self.seq,
            remaining_s=self._remaining_s(),
            pinned=job.pool is not None,
            has_text=bool(self.cont.text) or self.tool_calls_sent,
            tool_calls_sent=self.tool_calls_sent,
            tries=self.deliveries + self.retries_here,
            failing_elsewhere=self.ctx.circuits.failures_in_a_row(self.model)
            > self.retries_here + 1,
        )

    async def _apply(self, decision: Decision, job: Job, err: ProviderError) -> bool:
        if self.trace is not None:
            self.trace.failed(job, self.model, err, decision, self.first_token_at)
        if isinstance(decision, Retry):
            return await self._retry(decision, err)
        if isinstance(decision, Requeue):
            await self._requeue(decision, job, err)
        else:
            await self._fail(decision, job, err)
        return False

    async def _retry(self, decision: Retry, err: ProviderError) -> bool:
        """Try again on this pool: now or after a wait in this run, or by a delayed redelivery."""
        self.ctx.metrics.retried()
        where = "here" if decision.in_place else "redelivered"
        pool, delay_ms = self.ctx.pool_name, int(decision.delay_s * 1000)
        await self._publish(Notice(kind="retry", attempt=self.attempt, from_pool=pool,
                                   to_pool=pool, delay_ms=delay_ms,
                                   message=f"{err.code}: {err.message}"))  # fmt: skip
        await self._announce("retry", f"{err.code}; again {where} in {decision.delay_s:.2f}s")
        if not decision.in_place:
            await self.delivery.nak(decision.delay_s)
            return False
        return await self._wait(decision.delay_s)

    async def _requeue(self, decision: Requeue, job: Job, err: ProviderError) -> None:
        assert self.cont is not None
        resume = self.cont.carried() if decision.resume else None
        moved = msgspec.structs.replace(
            job, attempts=[*job.attempts, self._attempt_record(err)], rank=decision.rank,
            resume=resume,
        )  # fmt: skip
        if resume is not None and len(encode(moved)) > self.ctx.config.streams.max_job_bytes:
            # An answer too long to carry in a job: the next attempt starts over.
            resume, decision = None, msgspec.structs.replace(decision, reset=True)
            moved = msgspec.structs.replace(moved, resume=None)
        # Tell the client first: the backup may start streaming within a millisecond.
        await self._publish(
            Notice(
                kind="failover",
                attempt=self.attempt,
                from_pool=self.ctx.pool_name,
                to_pool=decision.pool,
                reset=decision.reset,
                resume=resume is not None,
                offset=len(resume.text) if resume is not None else None,
                message=f"{err.code}: {err.message}",
            )
        )
        await self._announce("failover", f"{self.ctx.pool_name} -> {decision.pool}: {err.code}")
        try:
            await self.delivery.requeue(self.ctx.js, decision.pool, moved, self._remaining_s())
        except RelayError as exc:  # full backup queue, timeout, id taken: hand the job back
            fields = self.ctx.log_fields(job, self.attempt)
            log.warning("re-queue of %s to %s failed (%s); redelivering", job.id,
                        decision.pool, exc, extra=fields)  # fmt: skip
            await self.delivery.nak(1.0)
            return
        self.ctx.metrics.failed_over(decision.pool)
        await self.delivery.ack()

    async def _fail(self, decision: Fail, job: Job, err: ProviderError) -> None:
        attempts = [*job.attempts, self._attempt_record(err)]
        if decision.dead_letter and not await self.ctx.park(
            job, decision.code, decision.message, attempts
        ):
            # The DLQ did not take it: hand the job back rather than ack it unparked.
            # It comes back (a new attempt, or deadline_exceeded) or, after
            # max_deliver tries, the max-deliveries advisory parks it.
            await self.delivery.nak(DLQ_RETRY_S)
            return
        retryable = decision.code in (AllProvidersFailed.code, CannotContinue.code)
        await self._publish(Error(code=decision.code, message=decision.message, retryable=retryable,
                                  attempt=self.attempt, attempts=attempts))  # fmt: skip
        await self.delivery.ack()
        self.ctx.metrics.job_outcome(self.model_label, "error")
        if not decision.dead_letter:  # PoolContext.dead_letter announced "dead" already
            await self._announce("failed", decision.code)

    def _attempt_record(self, err: ProviderError) -> Attempt:
        chars, tokens = (self.cont.sent_chars, self.cont.sent_tokens) if self.cont else (0, 0)
        return self.ctx.attempt_record(self.job, err, pool=self.ctx.pool_name, model=self.model,
                                       deliveries=self.deliveries, chunks_sent=self.seq,
                                       chars=chars, tokens=tokens)  # fmt: skip

    async def _cancelled(self) -> None:
        if not self.cancelled_by_client:
            # Shutdown: hand the job back to the queue for another worker.
            await self.delivery.nak()
            return
        await self._finish_error(Cancelled.code, "the client cancelled the request")

    async def _finish_error(self, code: str, message: str) -> None:
        assert self.job is not None
        if self.trace is not None:
            self.trace.outcome(self.job, code)
        await self._publish(
            Error(code=code, message=message, attempt=self.attempt, attempts=self.job.attempts)
        )
        await self.delivery.ack()
        self.ctx.metrics.job_outcome(self.model_label, code)
        await self._announce("failed", code)

    # --- helpers -----------------------------------------------------------------

    async def _announce(self, kind: str, detail: str) -> None:
        assert self.job is not None
        await self.ctx.announce(kind, self.job.id, self.job.route, detail)

    def _remaining_s(self) -> float:
        assert self.job is not None
        return self.job.deadline_ms / 1000 - time.time()

    async def _publish(self, event: Event) -> None:
        """Publish one event of this attempt, stamped with the job's ``job_seq``."""
        assert self.job is not None
        self.delivery.hold()
        event.job_seq = self.job_seq
        await self.ctx.reply(self.job.reply_to, event, self.job.deadline_ms)
