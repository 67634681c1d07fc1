"""The failure decision table: retry here, fail over, or give up."""

from __future__ import annotations

from broker import Attempt, Job, Message
from broker._errors import (
    AuthFailed,
    ContentFiltered,
    ContextLengthExceeded,
    ProviderTimeout,
    RateLimited,
    StreamInterrupted,
    UpstreamUnavailable,
)
from tests._builders import make_config
from workers._decide import Fail, FailureContext, Requeue, Retry, backoff_s, decide

CFG = make_config(
    {"a": {"max_retries": 2, "context_window": 8000}, "b": {"context_window": 128000}, "c": {}},
    {"chat": [("a", "ma"), ("b", "mb")], "solo": [("c", "mc")]},
)


def ctx(
    route: str = "chat",
    pool: str = "a",
    deliveries: int = 1,
    chunks: int = 0,
    attempts: list[Attempt] | None = None,
    pinned: bool = False,
) -> FailureContext:
    job = Job(
        id="j",
        route=route,
        messages=[Message(role="user", content="x")],
        reply_to="llm.reply.j",
        deadline_ms=0,
        attempts=attempts or [],
        pool=pool if pinned else None,
    )
    return FailureContext(
        job=job,
        pool_name=pool,
        deliveries=deliveries,
        chunks_sent=chunks,
        remaining_s=60.0,
        pinned=pinned,
    )


def half() -> float:
    return 0.5


def test_5xx_is_retried_here_with_backoff_then_failed_over() -> None:
    err = UpstreamUnavailable("503", status=503)
    assert isinstance(decide(err, ctx(deliveries=1), CFG, half), Retry)
    assert isinstance(decide(err, ctx(deliveries=2), CFG, half), Retry)
    assert decide(err, ctx(deliveries=3), CFG, half) == Requeue(
        pool="b", model="mb", rank=1, reset=False
    )


def test_retry_after_is_never_undercut() -> None:
    decision = decide(RateLimited("429", status=429, retry_after_s=2.0), ctx(), CFG, half)
    assert isinstance(decision, Retry) and decision.delay_s >= 2.0


def test_backoff_grows_and_is_capped() -> None:
    pool = CFG.pools["a"]
    assert backoff_s(pool, 1, lambda: 1.0) == 0.5
    assert backoff_s(pool, 3, lambda: 1.0) == 2.0
    assert backoff_s(pool, 30, lambda: 1.0) == pool.backoff_max_s
    assert backoff_s(pool, 30, lambda: 0.0) == 0.25


def test_timeouts_and_auth_fail_over_at_once() -> None:
    for err in (ProviderTimeout("ttft"), AuthFailed("401", status=401)):
        assert decide(err, ctx(), CFG, half) == Requeue(pool="b", model="mb", rank=1, reset=False)


def test_mid_stream_failure_requeues_with_reset() -> None:
    assert decide(StreamInterrupted("cut"), ctx(chunks=3), CFG, half) == Requeue(
        pool="b", model="mb", rank=1, reset=True
    )


def test_client_errors_fail_at_once_without_dead_letter() -> None:
    assert decide(ContentFiltered("no"), ctx(), CFG, half) == Fail(
        "content_filtered", "no", dead_letter=False
    )


def test_context_length_goes_to_larger_target_or_fails() -> None:
    assert decide(ContextLengthExceeded("long"), ctx(), CFG, half) == Requeue(
        pool="b", model="mb", rank=1, reset=False
    )
    tried = [Attempt(pool="a", model="ma", code="context_length_exceeded", message="long")]
    decision = decide(ContextLengthExceeded("long"), ctx(pool="b", attempts=tried), CFG, half)
    assert decision == Fail("context_length_exceeded", "long", dead_letter=False)


def test_no_target_left_is_all_providers_failed_and_dead_lettered() -> None:
    tried = [Attempt(pool="a", model="ma", code="upstream_unavailable", message="503")]
    decision = decide(
        UpstreamUnavailable("503"), ctx(pool="b", deliveries=3, attempts=tried), CFG, half
    )
    assert (
        isinstance(decision, Fail)
        and decision.code == "all_providers_failed"
        and decision.dead_letter
    )


def test_pinned_job_never_fails_over() -> None:
    decision = decide(ProviderTimeout("ttft"), ctx(pinned=True), CFG, half)
    assert isinstance(decision, Fail) and decision.code == "all_providers_failed"


def test_retry_that_would_pass_the_deadline_fails_over_instead() -> None:
    c = ctx()
    short = FailureContext(
        job=c.job, pool_name="a", deliveries=1, chunks_sent=0, remaining_s=0.1, pinned=False
    )
    assert isinstance(decide(RateLimited("429", retry_after_s=5.0), short, CFG, half), Requeue)
