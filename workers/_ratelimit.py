"""Rate budgets: token buckets for requests/min and tokens/min.

A pool's limits are shared by its live workers: each worker's bucket refills at
``limit / live_workers`` (the count comes from the heartbeat KV), so N workers
together stay within the provider's limit. A 429 with Retry-After pauses the
whole pool (every worker) until then. Clocks are injected so tests need no
sleeping.

Charges come from job fields a client wrote (``max_tokens``) and from provider
usage, so they are clamped: a charge or refund is at most
``MAX_CHARGE_TOKENS``, and a bucket's debt at most ``MAX_DEBT_S`` of its
refill, so no single job can stop a pool from pulling for longer than that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from broker._protocol import Job

Clock = Callable[[], float]

# No one request costs more tokens (the largest context windows are ~2M).
MAX_CHARGE_TOKENS = 10_000_000
# A bucket owes at most this many seconds of its refill.
MAX_DEBT_S = 60.0


class TokenBucket:
    """``rate_per_s`` tokens per second, holding at most ``burst``; may go into debt."""

    def __init__(self, rate_per_s: float, burst: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._level = burst
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate_per_s)
        self._at = now

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    def try_take(self, n: float = 1.0) -> bool:
        self._refill()
        if self._level < n:
            return False
        self._level -= n
        return True

    def take(self, n: float) -> None:
        """Take ``n`` even if that leaves a debt (used to correct estimates), of at
        most ``MAX_DEBT_S`` of refill."""
        self._refill()
        self._level = max(-self.rate_per_s * MAX_DEBT_S, self._level - max(0.0, n))

    def give_back(self, n: float) -> None:
        self._refill()
        self._level = min(self.burst, self._level + max(0.0, n))

    def wait_s(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 if now)."""
        self._refill()
        missing = n - self._level
        if missing <= 0:
            return 0.0
        return missing / self.rate_per_s if self.rate_per_s > 0 else float("inf")

    def fill(self) -> None:
        self._level = self.burst
        self._at = self._clock()

    def set_rate(self, rate_per_s: float, burst: float) -> None:
        self._refill()
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._level = min(self._level, burst)


class MinuteCounter:
    """A sum over the last 60 s, in one-second buckets (what heartbeats report as used)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._buckets: deque[list[float]] = deque()

    def add(self, n: float) -> None:
        second = float(int(self._clock()))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([second, n])

    def total(self) -> int:
        horizon = self._clock() - 60.0
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()
        return max(0, int(sum(n for _, n in self._buckets)))


class RateBudget:
    """The pool's requests/min and tokens/min budget as seen by one worker.

    ``rpm``/``tpm`` of 0 mean unlimited. Requests are paced nearly smoothly: the
    bucket holds a small burst (5% of a second's share, at least one request) so
    that a late wake-up of the pull pump does not lose budget for good, and the
    refill rate is lowered by exactly that burst, so that no 60-second window
    holds more than the share of ``rpm`` (burst + rate * 60 = rpm / workers).
    """

    def __init__(self, rpm: int, tpm: int, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.rpm = rpm
        self.tpm = tpm
        self.share = 1
        self.paused_until = 0.0
        self.requests = TokenBucket(0, 0, clock)
        self.tokens = TokenBucket(0, 0, clock)
        self.set_share(1)
        self.requests.fill()
        self.tokens.fill()
        self.requests_used = MinuteCounter(clock)
        self.tokens_used = MinuteCounter(clock)

    def set_share(self, live_workers: int) -> None:
        """Split the pool's limits across ``live_workers`` workers."""
        self.share = max(1, live_workers)
        req_rate = self.rpm / 60 / self.share
        tok_rate = self.tpm / 60 / self.share
        burst = max(1.0, req_rate * 0.05)
        self.requests.set_rate(max(0.0, req_rate - burst / 60), burst)
        self.tokens.set_rate(tok_rate, max(1.0, tok_rate * 10))

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self._clock() + seconds)

    def pause_remaining_s(self) -> float:
        return max(0.0, self.paused_until - self._clock())

    def wait_s(self) -> float:
        """Seconds before one more request may start (0 = now)."""
        waits = [max(0.0, self.paused_until - self._clock())]
        if self.rpm:
            waits.append(self.requests.wait_s(1.0))
        if self.tpm:
            waits.append(self.tokens.wait_s(1.0))
        return max(waits)

    def try_acquire(self) -> bool:
        """Take one request from the budget if it allows one now."""
        if self.wait_s() > 0:
            return False
        if self.rpm:
            self.requests.take(1.0)
        return True

    def release_unused(self) -> None:
        """A pull that brought no job gives its request back."""
        if self.rpm:
            self.requests.give_back(1.0)

    def note_request(self) -> None:
        """A pull brought a job: count it as used (heartbeats report the last minute)."""
        self.requests_used.add(1)

    def charge_tokens(self, n: int) -> None:
        """Charge (or, negative, refund) tokens: estimate first, then the correction."""
        n = max(-MAX_CHARGE_TOKENS, min(MAX_CHARGE_TOKENS, n))
        self.tokens_used.add(n)
        if self.tpm and n:
            if n > 0:
                self.tokens.take(n)
            else:
                self.tokens.give_back(-n)


def estimate_tokens(text_chars: int, max_tokens: int | None, default_completion: int = 256) -> int:
    """Rough prompt+completion estimate before the call (~4 chars per token)."""
    completion = max_tokens if max_tokens is not None and max_tokens > 0 else default_completion
    return min(MAX_CHARGE_TOKENS, max(1, text_chars // 4) + completion)


def prompt_chars(job: Job) -> int:
    """The characters a job sends: its messages' text, or an embeddings job's inputs."""
    if job.embed is not None:
        return sum(len(text) for text in job.embed.input)
    return sum(len(m.content) for m in job.messages)


def job_estimate(job: Job) -> int:
    """What a job is charged before its call: an embeddings job writes nothing, so it
    costs its inputs alone (~4 chars per token)."""
    if job.embed is not None:
        return estimate_tokens(prompt_chars(job), None, default_completion=0)
    return estimate_tokens(prompt_chars(job), job.max_tokens)
