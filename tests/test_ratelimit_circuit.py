"""Pure logic with injected clocks: token buckets, rate budget, circuit breaker."""

from __future__ import annotations

import itertools

from broker._config import CircuitSettings
from workers._circuit import CircuitBreaker
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
    assert cb.state == "open" and not cb.allow() and cb.pulls_allowed(8) == 0
    clock.now += 5.0
    assert cb.state == "half_open" and cb.pulls_allowed(8) == 1
    assert cb.allow() and not cb.allow()  # exactly one probe
    cb.record_success()
    assert cb.state == "closed" and cb.pulls_allowed(8) == 8


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
