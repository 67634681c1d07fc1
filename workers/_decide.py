"""What to do with a job whose attempt failed: a pure function, easy to test.

The answer is data (``Retry``, ``Requeue``, ``Fail``); exactly one place in
the worker (``_job.JobRun._apply``) turns it into a retry (in place, or a
delayed redelivery), a re-queue to a backup pool, or an error event plus dead
letter.

Rules (DESIGN.md, "Failure handling"); a target is *healthy* when some worker
of its pool is live and neither its pool's nor its model's circuit is open:

- non-retryable client errors (400, content filter): ``Fail`` at once, no DLQ;
- context length exceeded: ``Requeue`` to a target with a larger context
  window, else ``Fail``; a feature the pool's provider kind does not map
  (structured output, reasoning): ``Requeue`` to a target whose kind maps it,
  else ``Fail(bad_request)``;
- a failure after the caller has text follows the route's ``midstream``
  policy: ``fail`` ends it (``stream_interrupted``); otherwise the job moves to
  the next untried target at once (healthy first), carrying its text along
  (``continue``, ``resume``) or voiding it (``restart``, ``reset``). With no
  other target it goes back to its own pool, at once, up to ``max_retries``;
- auth failures, time-to-first-token timeouts and an open circuit: ``Requeue``
  to the next untried target at once (healthy first);
- a 429 whose Retry-After is at most the pool's ``retry_after_wait_max_s`` is
  waited out in place when the deadline allows, up to ``max_retries`` times;
- other retryable failures before any text, while a healthy target is left:
  retried in place at once, ``retry_before_failover`` times (none when the
  model is failing for other requests too: an outage, not a blip), then
  ``Requeue`` to that target. Only when no healthy target is left does the backoff chain run
  on the same pool (exponential, full jitter, never sooner than Retry-After)
  until ``max_retries``, then ``Requeue`` to any untried target;
- no target left: ``Fail(all_providers_failed)`` and dead-letter.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from broker._config import Config, PoolConfig, RouteConfig
from broker._errors import (
    AllProvidersFailed,
    CannotContinue,
    ContextLengthExceeded,
    FeatureUnsupported,
    ProviderError,
    RateLimited,
)
from broker._protocol import Attempt, Job, now_ms
from workers.providers._registry import provider_features

# Whether (pool, upstream model) is worth sending a job to now.
Healthy = Callable[[str, str], bool]


def _always_healthy(pool: str, model: str) -> bool:
    return True


class Retry(msgspec.Struct, frozen=True):
    """Try the same pool again after ``delay_s``: in this run (``in_place``), or by a
    delayed redelivery of the message."""

    delay_s: float
    in_place: bool = False


class Requeue(msgspec.Struct, frozen=True):
    """Move the job to ``pool``; ``resume``: carry the caller's text along; ``reset``: void it."""

    pool: str
    model: str
    rank: int
    reset: bool
    resume: bool = False


class Fail(msgspec.Struct, frozen=True):
    code: str
    message: str
    dead_letter: bool


Decision = Retry | Requeue | Fail


class FailureContext(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the decision depends on.

    ``chunks_sent``: chunks this attempt published; ``has_text``: the caller has
    text of the answer (this attempt's, or the text it continued); ``tries``:
    failed upstream calls of this job on this pool in this delivery's line
    (deliveries plus in-place retries); ``failing_elsewhere``: the same model
    failed for other requests just before (more health failures in a row than
    this job's own), so the failure is no blip worth a retry; ``tool_calls_sent``:
    the attempt streamed tool-call fragments, which no continuation can take over.
    """

    job: Job
    pool_name: str
    deliveries: int
    chunks_sent: int
    remaining_s: float
    pinned: bool
    has_text: bool = False
    tries: int = 1
    failing_elsewhere: bool = False
    tool_calls_sent: bool = False

    @property
    def text_kept(self) -> bool:
        return self.has_text or self.chunks_sent > 0


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
    healthy: Healthy = _always_healthy,
) -> Decision:
    if isinstance(err, ContextLengthExceeded):
        return _larger_context(err, ctx, config)
    if isinstance(err, FeatureUnsupported):
        return _capable(err, ctx, config)
    if isinstance(err, CannotContinue) or not err.retryable:
        return Fail(err.code, err.message, dead_letter=False)
    if ctx.text_kept or err.mid_stream:
        return _mid_stream(err, ctx, config, healthy)
    if err.failover_now:
        target = next_target(ctx, config, healthy) or next_target(ctx, config)
        return target if target is not None else _exhausted(err, ctx)
    pool = config.pools[ctx.pool_name]
    wait_s = err.retry_after_s if isinstance(err, RateLimited) else None
    if (
        wait_s is not None
        and wait_s <= pool.retry_after_wait_max_s
        and wait_s < ctx.remaining_s
        and ctx.tries <= pool.max_retries
    ):
        return Retry(wait_s, in_place=True)  # what the provider asked for, and cheaper
    target = next_target(ctx, config, healthy)
    if target is not None:
        blip = not ctx.failing_elsewhere and not isinstance(err, RateLimited)
        if blip and ctx.tries <= _retries_before_failover(ctx, config):
            return Retry(0.0, in_place=True)
        return target
    return _retry_or_requeue(err, ctx, config, rand)


def _mid_stream(
    err: ProviderError, ctx: FailureContext, config: Config, healthy: Healthy
) -> Decision:
    """The stream broke (or failed) after the caller had text: the route's ``midstream`` policy."""
    route = _route(ctx, config)
    policy = route.midstream if route is not None else "continue"  # a pinned job: continue
    has_text = ctx.text_kept
    if has_text and policy == "fail":
        return Fail(
            err.code,
            f"{err.message} (after the caller had text; route policy midstream: fail)",
            dead_letter=False,
        )
    # Half a tool call cannot be continued by a prefill: the next attempt starts over.
    resume = has_text and policy == "continue" and not ctx.tool_calls_sent
    reset = has_text and not resume
    target = next_target(ctx, config, healthy) or next_target(ctx, config)
    if target is not None:
        return msgspec.structs.replace(target, reset=reset, resume=resume)
    pool = config.pools[ctx.pool_name]
    if _tries_on_pool(ctx) <= pool.max_retries and ctx.remaining_s > 0:
        # No other target: the same pool again, at once, with the text so far.
        model = config.model_for(ctx.job.route, ctx.pool_name) or ctx.job.route
        return Requeue(ctx.pool_name, model, ctx.job.rank, reset=reset, resume=resume)
    return _exhausted(err, ctx)


def _retry_or_requeue(
    err: ProviderError, ctx: FailureContext, config: Config, rand: Callable[[], float]
) -> Decision:
    """No healthy target left: the backoff chain on this pool, then any untried target."""
    pool = config.pools[ctx.pool_name]
    if ctx.tries <= pool.max_retries:
        delay = max(backoff_s(pool, ctx.tries, rand), err.retry_after_s or 0.0)
        if delay < ctx.remaining_s:
            return Retry(delay)
    target = next_target(ctx, config)
    if target is not None:
        return target
    return _exhausted(err, ctx)


def _retries_before_failover(ctx: FailureContext, config: Config) -> int:
    route = _route(ctx, config)
    return route.retry_before_failover if route is not None else 1


def _route(ctx: FailureContext, config: Config) -> RouteConfig | None:
    return config.routes.get(ctx.job.route)


def _tries_on_pool(ctx: FailureContext) -> int:
    """Attempts of this job on this pool so far, this one included."""
    return 1 + sum(1 for a in ctx.job.attempts if a.pool == ctx.pool_name)


def _exhausted(err: ProviderError, ctx: FailureContext) -> Fail:
    if ctx.pinned:
        msg = f"pool {ctx.pool_name} failed ({err.code}: {err.message}); the job was pinned to it"
    else:
        msg = f"every target of route {ctx.job.route} failed; last: {err.code}: {err.message}"
    return Fail(AllProvidersFailed.code, msg, dead_letter=True)


def tried_pools(job: Job, current: str) -> set[str]:
    return {a.pool for a in job.attempts} | {current}


def next_target(
    ctx: FailureContext, config: Config, healthy: Healthy | None = None
) -> Requeue | None:
    """The best untried target of the job's route, lowest rank first (healthy ones only,
    given ``healthy``)."""
    if ctx.pinned:
        return None
    route = config.routes.get(ctx.job.route)
    if route is None:
        return None
    tried = tried_pools(ctx.job, ctx.pool_name)
    for rank, target in sorted(route.ranks(), key=lambda rt: rt[0]):
        if target.pool in tried or (healthy is not None and not healthy(target.pool, target.model)):
            continue
        return Requeue(pool=target.pool, model=target.model, rank=rank, reset=False)
    return None


def _capable(err: FeatureUnsupported, ctx: FailureContext, config: Config) -> Decision:
    """The best untried target whose provider kind maps what the job asks, else ``Fail``."""
    route = config.routes.get(ctx.job.route)
    if route is not None and not ctx.pinned:
        tried = tried_pools(ctx.job, ctx.pool_name)
        for rank, target in sorted(route.ranks(), key=lambda rt: rt[0]):
            kind = config.pools[target.pool].kind
            if target.pool not in tried and err.features <= provider_features(kind):
                return Requeue(pool=target.pool, model=target.model, rank=rank, reset=False)
    where = "the job was pinned to it" if ctx.pinned else "no other target of the route does"
    return Fail(err.code, f"{err.message}; {where}", dead_letter=False)


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


def attempt_record(
    err: ProviderError,
    *,
    pool: str,
    model: str,
    deliveries: int,
    chunks_sent: int,
    chars: int,
    tokens: int | None = None,
) -> Attempt:
    """What a failed attempt leaves in the job, and in ``done``/``error``: where, why, and
    what of it the caller kept (``chars``, and ``tokens``: the provider's events it sent,
    each about a token; unknown, its chunks stand in for them)."""
    return Attempt(
        pool=pool,
        model=model,
        code=err.code,
        message=err.message,
        retryable=err.retryable,
        status=err.status,
        deliveries=deliveries,
        chunks_sent=chunks_sent,
        at_ms=now_ms(),
        chars=chars,
        completion_tokens=chunks_sent if tokens is None else tokens,
    )
