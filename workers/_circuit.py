"""Circuit breaker for one pool, as seen by one worker.

    closed --(N consecutive failures, or failure rate over the window)--> open
    open   --(cooldown elapsed)--> half_open: exactly one probe is let through
    half_open --probe succeeds--> closed;  --probe fails--> open again

While open the worker stops pulling route jobs (so JetStream hands them to
backup pools) and forwards jobs it already holds without calling upstream.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Literal

from broker._config import CircuitSettings
from workers._ratelimit import Clock

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(self, settings: CircuitSettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._state: State = "closed"
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._probe_in_flight = False

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self.settings.cooldown_s:
            self._state = "half_open"
            self._probe_in_flight = False
        return self._state

    def allow(self) -> bool:
        """May a request go upstream now? In half-open, only the single probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def pulls_allowed(self, free_slots: int) -> int:
        """How many route pulls the worker may keep outstanding."""
        state = self.state
        if state == "closed":
            return free_slots
        if state == "half_open" and not self._probe_in_flight:
            return min(1, free_slots)
        return 0

    def record_success(self) -> State:
        self._consecutive = 0
        self._observe(ok=True)
        self._probe_in_flight = False
        if self._state != "closed":
            self._state = "closed"
            self._window.clear()
        return self._state

    def record_failure(self) -> State:
        self._consecutive += 1
        self._observe(ok=False)
        self._probe_in_flight = False
        if self._state == "half_open" or self._tripped():
            self.trip()
        return self._state

    def trip(self) -> None:
        """Open now (also used for 401/403: the pool is misconfigured)."""
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_in_flight = False

    def _observe(self, ok: bool) -> None:
        now = self._clock()
        self._window.append((now, ok))
        horizon = now - self.settings.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _tripped(self) -> bool:
        s = self.settings
        if self._consecutive >= s.consecutive_failures:
            return True
        if len(self._window) < s.min_requests:
            return False
        failures = sum(1 for _, ok in self._window if not ok)
        return failures / len(self._window) >= s.failure_rate
