"""What to do with a job whose attempt failed: a pure function, easy to test.

The answer is data (``Retry``, ``Requeue``, ``Fail``); exactly one place in
the worker (``_job.JobRun._apply``) turns it into a delayed redelivery, a
re-queue to a backup pool, or an error event plus dead letter.

Rules (DESIGN.md, "Failure handling"):
- non-retryable client errors (400, content filter): ``Fail`` at once, no DLQ;
- context length exceeded: ``Requeue`` to a target with a larger context
  window, else ``Fail``;
- auth failures, time-to-first-token timeouts, an open circuit, and any failure
  after chunks were sent: ``Requeue`` to the next untried target at once;
- other retryable failures before the first chunk: ``Retry`` on the same pool
  with exponential backoff and full jitter (never sooner than Retry-After)
  until ``max_retries``, then ``Requeue``;
- no target left: ``Fail(all_providers_failed)`` and dead-letter.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from broker._config import Config, PoolConfig
from broker._errors import AllProvidersFailed, ContextLengthExceeded, ProviderError
from broker._protocol import Job


class Retry(msgspec.Struct, frozen=True):
    delay_s: float


class Requeue(msgspec.Struct, frozen=True):
    pool: str
    model: str
    rank: int
    reset: bool


class Fail(msgspec.Struct, frozen=True):
    code: str
    message: str
    dead_letter: bool


Decision = Retry | Requeue | Fail


class FailureContext(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the decision depends on."""

    job: Job
    pool_name: str
    deliveries: int
    chunks_sent: int
    remaining_s: float
    pinned: bool


def backoff_s(
    pool: PoolConfig, deliveries: int, rand: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff: uniform in [base/2, min(max, base * 2^(n-1))]."""
    ceiling = min(pool.backoff_max_s, pool.backoff_base_s * 2.0 ** max(0, deliveries - 1))
    floor = pool.backoff_base_s / 2
    return floor + (max(ceiling, floor) - floor) * rand()


def decide(
    err: ProviderError,
    ctx: FailureContext,
    config: Config,
    rand: Callable[[], float] = random.random,
) -> Decision:
    if isinstance(err, ContextLengthExceeded):
        return _larger_context(err, ctx, config)
    if not err.retryable:
        return Fail(err.code, err.message, dead_letter=False)
    mid_stream = ctx.chunks_sent > 0 or err.mid_stream
    if err.failover_now or mid_stream:
        target = next_target(ctx, config)
        if target is not None:
            return target if not mid_stream else msgspec.structs.replace(target, reset=True)
        if err.failover_now:
            return _exhausted(err, ctx)
    return _retry_or_requeue(err, ctx, config, rand)


def _retry_or_requeue(
    err: ProviderError, ctx: FailureContext, config: Config, rand: Callable[[], float]
) -> Decision:
    pool = config.pools[ctx.pool_name]
    if ctx.deliveries <= pool.max_retries:
        delay = max(backoff_s(pool, ctx.deliveries, rand), err.retry_after_s or 0.0)
        if delay < ctx.remaining_s:
            return Retry(delay)
    target = next_target(ctx, config)
    if target is not None:
        return msgspec.structs.replace(target, reset=ctx.chunks_sent > 0)
    return _exhausted(err, ctx)


def _exhausted(err: ProviderError, ctx: FailureContext) -> Fail:
    if ctx.pinned:
        msg = f"pool {ctx.pool_name} failed ({err.code}: {err.message}); the job was pinned to it"
    else:
        msg = f"every target of route {ctx.job.route} failed; last: {err.code}: {err.message}"
    return Fail(AllProvidersFailed.code, msg, dead_letter=True)


def tried_pools(job: Job, current: str) -> set[str]:
    return {a.pool for a in job.attempts} | {current}


def next_target(ctx: FailureContext, config: Config) -> Requeue | None:
    """The best untried target of the job's route, lowest rank first."""
    if ctx.pinned:
        return None
    route = config.routes.get(ctx.job.route)
    if route is None:
        return None
    tried = tried_pools(ctx.job, ctx.pool_name)
    for rank, target in sorted(route.ranks(), key=lambda rt: rt[0]):
        if target.pool not in tried:
            return Requeue(pool=target.pool, model=target.model, rank=rank, reset=False)
    return None


def _larger_context(err: ProviderError, ctx: FailureContext, config: Config) -> Decision:
    route = config.routes.get(ctx.job.route)
    here = config.pools[ctx.pool_name].context_window or 0
    if route is not None and not ctx.pinned:
        tried = tried_pools(ctx.job, ctx.pool_name)
        for rank, target in sorted(route.ranks(), key=lambda rt: rt[0]):
            window = config.pools[target.pool].context_window or 0
            if target.pool not in tried and window > here:
                return Requeue(pool=target.pool, model=target.model, rank=rank, reset=False)
    return Fail(err.code, err.message, dead_letter=False)
