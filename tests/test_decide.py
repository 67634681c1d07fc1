"""The failure decision table: retry here, fail over, or give up.

A target is healthy unless the test says otherwise (``decide(..., healthy=...)``);
the healthy-backup rules are the fast path, the backoff chain the slow one.
"""

from __future__ import annotations

from broker import Attempt, Job, Message
from broker._errors import (
    AuthFailed,
    CannotContinue,
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
    {
        "chat": [("a", "ma"), ("b", "mb")],
        "solo": [("c", "mc")],
        "strict": {"targets": [("a", "ma"), ("b", "mb")], "midstream": "fail"},
        "redo": {"targets": [("a", "ma"), ("b", "mb")], "midstream": "restart"},
        "patient": {"targets": [("a", "ma"), ("b", "mb")], "retry_before_failover": 0},
    },
)
TO_B = Requeue(pool="b", model="mb", rank=1, reset=False)


def no_backup(pool: str, model: str) -> bool:
    return pool == "a"


def ctx(
    route: str = "chat",
    pool: str = "a",
    deliveries: int = 1,
    chunks: int = 0,
    attempts: list[Attempt] | None = None,
    pinned: bool = False,
    tries: int | None = None,
    remaining_s: float = 60.0,
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
        remaining_s=remaining_s,
        pinned=pinned,
        tries=deliveries if tries is None else tries,
    )


def half() -> float:
    return 0.5


def test_5xx_with_a_healthy_backup_is_retried_here_once_at_once_then_failed_over() -> None:
    err = UpstreamUnavailable("503", status=503)
    assert decide(err, ctx(tries=1), CFG, half) == Retry(0.0, in_place=True)
    assert decide(err, ctx(tries=2), CFG, half) == TO_B
    # retry_before_failover: 0 moves on at the first failure.
    assert decide(err, ctx(route="patient", tries=1), CFG, half) == TO_B


def test_5xx_without_a_healthy_backup_runs_the_backoff_chain_then_fails_over() -> None:
    err = UpstreamUnavailable("503", status=503)
    for tries in (1, 2):
        decision = decide(err, ctx(deliveries=tries), CFG, half, healthy=no_backup)
        assert isinstance(decision, Retry) and not decision.in_place and decision.delay_s > 0
    # Out of retries here: the unhealthy backup is still better than giving up.
    assert decide(err, ctx(deliveries=3), CFG, half, healthy=no_backup) == TO_B


def test_short_retry_after_is_waited_out_here_and_a_long_one_fails_over() -> None:
    short = decide(RateLimited("429", status=429, retry_after_s=2.0), ctx(), CFG, half)
    assert short == Retry(2.0, in_place=True)
    assert decide(RateLimited("429", status=429, retry_after_s=5.0), ctx(), CFG, half) == TO_B
    # A 429 without Retry-After is not retried at once against a paused pool.
    assert decide(RateLimited("429", status=429), ctx(), CFG, half) == TO_B
    # A provider that keeps asking is waited out max_retries times, then left.
    again = RateLimited("429", status=429, retry_after_s=1.0)
    assert decide(again, ctx(tries=2), CFG, half) == Retry(1.0, in_place=True)
    assert decide(again, ctx(tries=3), CFG, half) == TO_B


def test_retry_after_is_never_undercut_by_the_backoff_chain() -> None:
    err = RateLimited("429", status=429, retry_after_s=5.0)
    decision = decide(err, ctx(), CFG, half, healthy=no_backup)
    assert isinstance(decision, Retry) and decision.delay_s >= 5.0


def test_backoff_grows_and_is_capped() -> None:
    pool = CFG.pools["a"]
    assert backoff_s(pool, 1, lambda: 1.0) == 0.5
    assert backoff_s(pool, 3, lambda: 1.0) == 2.0
    assert backoff_s(pool, 30, lambda: 1.0) == pool.backoff_max_s
    assert backoff_s(pool, 30, lambda: 0.0) == 0.25


def test_timeouts_and_auth_fail_over_at_once() -> None:
    for err in (ProviderTimeout("ttft"), AuthFailed("401", status=401)):
        assert decide(err, ctx(), CFG, half) == TO_B
        assert decide(err, ctx(), CFG, half, healthy=no_backup) == TO_B


def test_mid_stream_failure_moves_on_carrying_the_text() -> None:
    resumed = Requeue(pool="b", model="mb", rank=1, reset=False, resume=True)
    assert decide(StreamInterrupted("cut"), ctx(chunks=3), CFG, half) == resumed
    # Even to an unhealthy backup: the caller is waiting mid-answer.
    assert decide(StreamInterrupted("cut"), ctx(chunks=3), CFG, half, healthy=no_backup) == resumed


def test_mid_stream_policy_restart_voids_the_text_and_fail_ends_the_job() -> None:
    restart = decide(StreamInterrupted("cut"), ctx(route="redo", chunks=3), CFG, half)
    assert restart == Requeue(pool="b", model="mb", rank=1, reset=True, resume=False)
    failed = decide(StreamInterrupted("cut"), ctx(route="strict", chunks=3), CFG, half)
    assert isinstance(failed, Fail) and failed.code == "stream_interrupted"
    assert "midstream: fail" in failed.message and not failed.dead_letter


def test_mid_stream_failure_with_no_other_target_continues_on_the_same_pool() -> None:
    decision = decide(StreamInterrupted("cut"), ctx(route="solo", pool="c", chunks=2), CFG, half)
    assert decision == Requeue(pool="c", model="mc", rank=0, reset=False, resume=True)
    tried = [Attempt(pool="c", model="mc", code="stream_interrupted", message="cut")] * 2
    again = ctx(route="solo", pool="c", chunks=2, attempts=tried)
    exhausted = decide(StreamInterrupted("cut"), again, CFG, half)
    assert isinstance(exhausted, Fail) and exhausted.code == "all_providers_failed"


def test_an_answer_that_cannot_be_continued_is_a_clean_error() -> None:
    decision = decide(CannotContinue("no match"), ctx(chunks=0), CFG, half)
    assert decision == Fail("cannot_continue", "no match", dead_letter=False)


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


def test_a_wait_that_would_pass_the_deadline_fails_over_instead() -> None:
    err = RateLimited("429", retry_after_s=2.0)
    assert decide(err, ctx(remaining_s=1.0), CFG, half) == TO_B
    assert decide(err, ctx(remaining_s=1.0), CFG, half, healthy=no_backup) == TO_B
