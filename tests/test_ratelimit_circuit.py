"""Pure logic with injected clocks: token buckets, rate budget, circuit breakers."""

from __future__ import annotations

import itertools

import pytest

from broker._config import CircuitSettings
from broker._errors import (
    AuthFailed,
    CannotContinue,
    CircuitOpen,
    ContentFiltered,
    ContextLengthExceeded,
    ProviderError,
    RateLimited,
    StreamInterrupted,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers._circuit import MAX_MODELS, CircuitBreaker, Circuits, State
from workers._ratelimit import RateBudget, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_at_its_rate_and_caps_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, burst=4.0, clock=clock)
    assert [bucket.try_take() for _ in range(5)] == [True, True, True, True, False]
    clock.now += 0.5
    assert bucket.try_take() and not bucket.try_take()
    clock.now += 100
    assert bucket.level == 4.0


def test_rpm_budget_never_exceeds_limit_in_any_minute() -> None:
    clock = FakeClock()
    budget = RateBudget(rpm=120, tpm=0, clock=clock)
    starts: list[float] = []
    for _ in range(20_000):  # 200 simulated seconds in 10 ms steps
        while budget.try_acquire():
            starts.append(clock.now)
        clock.now += 0.01
    worst = max(sum(1 for t in starts if s <= t < s + 60) for s in starts)
    assert worst <= 121  # the limit plus the one-request burst
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(starts[1:]))
    assert len(starts) >= 0.97 * 120 * 200 / 60


def test_share_splits_the_limit_between_workers() -> None:
    clock = FakeClock()
    budget = RateBudget(rpm=600, tpm=0, clock=clock)
    budget.set_share(3)
    taken = 0
    for _ in range(6000):  # 60 s
        taken += budget.try_acquire()
        clock.now += 0.01
    assert 190 <= taken <= 201


def test_pause_blocks_until_retry_after() -> None:
    clock = FakeClock()
    budget = RateBudget(rpm=0, tpm=0, clock=clock)
    budget.pause(2.0)
    assert not budget.try_acquire()
    assert budget.wait_s() == 2.0
    clock.now += 2.0
    assert budget.try_acquire()


def test_tpm_budget_blocks_after_debt_and_refunds() -> None:
    clock = FakeClock()
    budget = RateBudget(rpm=0, tpm=600, clock=clock)  # 10 tokens/s, burst 100
    budget.charge_tokens(150)
    assert not budget.try_acquire()
    budget.charge_tokens(-100)
    assert budget.try_acquire()


def test_circuit_opens_on_consecutive_failures_and_probes_once() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(CircuitSettings(consecutive_failures=3, cooldown_s=5.0), clock=clock)
    for _ in range(3):
        assert cb.allow()
        cb.record_failure()
    assert cb.state == "open" and not cb.ready() and not cb.allow()
    clock.now += 5.0
    assert cb.state == "half_open" and cb.ready()
    assert cb.allow() and not cb.allow()  # exactly one probe
    cb.record_success()
    assert cb.state == "closed" and cb.ready()


def test_failed_probe_reopens() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(CircuitSettings(consecutive_failures=1, cooldown_s=1.0), clock=clock)
    cb.record_failure()
    clock.now += 1.0
    assert cb.allow()
    cb.record_failure()
    assert cb.state == "open"


def test_circuit_opens_on_failure_rate_over_window() -> None:
    clock = FakeClock()
    settings = CircuitSettings(
        consecutive_failures=100, failure_rate=0.5, min_requests=10, window_s=30
    )
    cb = CircuitBreaker(settings, clock=clock)
    for i in range(10):
        (cb.record_failure if i % 2 else cb.record_success)()
        clock.now += 1
    assert cb.state == "open"


# --- Circuits: per (pool, upstream model), plus the pool-level one --------------------

Change = tuple[str | None, State, State]
SETTINGS = CircuitSettings(consecutive_failures=3, cooldown_s=5.0)
OUTAGE = UpstreamUnavailable("503", status=503)


def circuits(settings: CircuitSettings = SETTINGS) -> tuple[Circuits, FakeClock, list[Change]]:
    clock, changes = FakeClock(), []
    cs = Circuits(settings, clock=clock, on_change=lambda *change: changes.append(change))
    return cs, clock, changes


def fail(cs: Circuits, model: str, err: ProviderError = OUTAGE, times: int = 3) -> None:
    for _ in range(times):
        assert cs.allow(model)
        cs.record_failure(model, err)


def test_one_models_failures_open_only_its_own_circuit() -> None:
    cs, _, changes = circuits()
    fail(cs, "gpt-x")
    assert (cs.state("gpt-x"), cs.state("claude"), cs.state()) == ("open", "closed", "closed")
    assert not cs.allow("gpt-x") and cs.allow("claude")
    assert not cs.healthy("gpt-x") and cs.healthy("claude")
    assert (cs.route_pulls("gpt-x", 8), cs.route_pulls("claude", 8)) == (0, 8)
    assert cs.snapshot() == {"gpt-x": "open"}
    assert changes == [("gpt-x", "closed", "open")]


@pytest.mark.parametrize(
    "err",
    [
        RateLimited("429", status=429, retry_after_s=1.0),
        UpstreamRejected("400", status=400),
        ContentFiltered("filtered"),
        ContextLengthExceeded("too long"),
        CircuitOpen("open"),
        CannotContinue("broke"),
    ],
    ids=lambda e: e.code,
)
def test_failures_about_the_request_never_count(err: ProviderError) -> None:
    cs, _, changes = circuits(CircuitSettings(consecutive_failures=1, min_requests=1))
    fail(cs, "gpt-x", err, times=10)
    assert (cs.state("gpt-x"), cs.state()) == ("closed", "closed")
    assert cs.snapshot() == {} and changes == []


@pytest.mark.parametrize("err", [UpstreamConnectError("refused"), AuthFailed("401", status=401)])
def test_pool_level_failures_block_every_model(err: ProviderError) -> None:
    cs, _, changes = circuits()
    fail(cs, "gpt-x", err, times=1 if isinstance(err, AuthFailed) else 3)
    assert (cs.state(), cs.state("gpt-x")) == ("open", "closed")
    assert not any(cs.allow(m) or cs.healthy(m) for m in ("gpt-x", "claude", "never-seen"))
    assert cs.route_pulls("claude", 8) == 0
    assert cs.snapshot() == {}  # the models' own circuits stay closed
    assert changes == [(None, "closed", "open")]


def test_auth_failure_opens_the_pool_level_circuit_at_once() -> None:
    cs, _, _ = circuits(CircuitSettings(consecutive_failures=100))
    fail(cs, "gpt-x", AuthFailed("403", status=403), times=1)
    assert cs.state() == "open"


def test_success_closes_the_models_and_the_pool_level_circuit() -> None:
    cs, clock, changes = circuits()
    fail(cs, "gpt-x")
    fail(cs, "claude", UpstreamConnectError("refused"))
    clock.now += 5.0
    assert cs.allow("gpt-x")  # the probe of both circuits
    cs.record_success("gpt-x")
    assert (cs.state(), cs.state("gpt-x")) == ("closed", "closed")
    assert cs.snapshot() == {} and cs.allow("claude")
    assert changes[-2:] == [(None, "half_open", "closed"), ("gpt-x", "half_open", "closed")]


def test_half_open_lets_exactly_one_probe_through() -> None:
    cs, clock, _ = circuits()
    fail(cs, "gpt-x")
    clock.now += 5.0
    assert cs.state("gpt-x") == "half_open" and cs.route_pulls("gpt-x", 8) == 1
    assert cs.allow("gpt-x") and not cs.allow("gpt-x")
    assert cs.route_pulls("gpt-x", 8) == 0  # the probe is out
    assert cs.allow("claude")  # other models are not probing
    cs.record_failure("gpt-x", StreamInterrupted("cut"))
    assert cs.state("gpt-x") == "open" and cs.wake_in_s() == 5.0


def test_a_probe_that_is_not_counted_lets_the_next_request_probe() -> None:
    cs, clock, _ = circuits()
    fail(cs, "gpt-x")
    clock.now += 5.0
    assert cs.allow("gpt-x")
    cs.record_failure("gpt-x", RateLimited("429", status=429))
    assert cs.state("gpt-x") == "half_open" and cs.allow("gpt-x")


def test_a_probe_without_an_outcome_is_given_up_after_the_cooldown() -> None:
    cs, clock, _ = circuits()
    fail(cs, "gpt-x")
    clock.now += 5.0
    assert cs.allow("gpt-x")  # then cancelled: neither success nor failure is recorded
    clock.now += 4.9
    assert not cs.allow("gpt-x")
    clock.now += 0.1
    assert cs.allow("gpt-x")


def test_pool_level_half_open_allows_one_probe_for_all_models() -> None:
    cs, clock, _ = circuits()
    fail(cs, "gpt-x", UpstreamConnectError("refused"))
    clock.now += 5.0
    assert cs.route_pulls("gpt-x", 8) == 1 and cs.route_pulls("claude", 8) == 1
    assert cs.allow("claude") and not cs.allow("gpt-x")
    assert cs.route_pulls("gpt-x", 8) == 0


def test_wake_in_s_is_the_remaining_cooldown_of_the_next_open_circuit() -> None:
    cs, clock, _ = circuits()
    assert cs.wake_in_s() is None
    fail(cs, "gpt-x")
    clock.now += 2.0
    fail(cs, "claude")
    assert cs.wake_in_s() == 3.0
    clock.now += 1.5
    assert cs.wake_in_s() == 1.5
    clock.now += 1.5
    assert cs.wake_in_s() == 2.0  # gpt-x is half-open now; claude is next
    clock.now += 2.0
    assert cs.wake_in_s() is None


def test_poll_tells_the_clocks_open_to_half_open_once() -> None:
    cs, clock, changes = circuits()
    fail(cs, "gpt-x")
    cs.poll()
    assert changes == [("gpt-x", "closed", "open")]
    clock.now += 5.0
    cs.poll()
    cs.poll()
    assert changes[1:] == [("gpt-x", "open", "half_open")]
    assert cs.snapshot() == {"gpt-x": "half_open"}


def test_route_pulls_never_exceed_the_free_slots() -> None:
    cs, clock, _ = circuits()
    assert cs.route_pulls("gpt-x", 3) == 3
    fail(cs, "gpt-x")
    clock.now += 5.0
    assert cs.route_pulls("gpt-x", 0) == 0 and cs.route_pulls("gpt-x", 3) == 1


def test_the_model_breakers_are_bounded_keeping_open_ones() -> None:
    cs, _, _ = circuits()
    fail(cs, "broken")
    for i in range(MAX_MODELS * 2):
        assert cs.allow(f"m{i}")
        cs.record_success(f"m{i}")
    assert len(cs._models) <= MAX_MODELS
    assert cs.snapshot() == {"broken": "open"}
