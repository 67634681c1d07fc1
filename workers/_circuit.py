"""Circuit breakers of one pool, as seen by one worker: one per upstream model, one pool-wide.

Each key has a ``CircuitBreaker``:

    closed --(N consecutive failures, or failure rate over the window)--> open
    open   --(cooldown elapsed)--> half_open: exactly one probe is let through
    half_open --probe succeeds--> closed;  --probe fails--> open again

``Circuits`` holds the pool's breakers. A failure counts where it belongs
(``ProviderError.health`` and ``.pool_level``, broker/_errors.py): a 503 on
one model opens that model's circuit only, so the pool keeps serving its other
models; a connection error or a rejected key counts for the pool-level circuit,
which blocks every model (a rejected key opens it at once). Failures that say
nothing about the provider's health (429, bad request, content filter, context
length) count nowhere.

While a model's circuit is open the worker stops pulling the routes it serves
with that model (so JetStream hands them to backup pools) and forwards jobs it
already holds without calling upstream. The pull pump sleeps at most until the
next cooldown ends (``wake_in_s``), so the probe is pulled at once; the
heartbeat loop calls ``poll`` so the change to half-open is told even while idle.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Literal

from broker._config import CircuitSettings
from broker._errors import AuthFailed, CircuitOpen, ProviderError
from broker._protocol import Heartbeat
from workers._ratelimit import Clock

State = Literal["closed", "open", "half_open"]
OnChange = Callable[[str | None, State, State], None]

# Model names come from the config, so this is only a guard against a bug upstream.
MAX_MODELS = 256


class CircuitBreaker:
    """One key's state machine. A probe that gives no outcome (the job was cancelled,
    its deadline passed) is given up after ``cooldown_s``, and another is let through."""

    def __init__(self, settings: CircuitSettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._state: State = "closed"
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._probe_in_flight = False
        self._probe_at = 0.0

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self.settings.cooldown_s:
            self._state = "half_open"
            self._probe_in_flight = False
        return self._state

    def ready(self) -> bool:
        """Would ``allow`` say yes (without claiming the probe)?"""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._probe_claimed())

    def allow(self) -> bool:
        """May a request go upstream now? In half-open, only the single probe."""
        if not self.ready():
            return False
        if self._state == "half_open":
            self._probe_in_flight, self._probe_at = True, self._clock()
        return True

    def cooldown_left_s(self) -> float | None:
        """Seconds until an open circuit becomes half-open; None if it is not open."""
        if self.state != "open":
            return None
        return max(0.0, self._opened_at + self.settings.cooldown_s - self._clock())

    def record_success(self) -> State:
        """A call succeeded. An open circuit stays open: the call started before it
        opened (a probe succeeds only in half-open, which closes it)."""
        if self.state == "open":
            return self._state
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

    def release_probe(self) -> None:
        """The probe ended with an outcome that says nothing about this key: let another go."""
        self._probe_in_flight = False

    def trip(self) -> None:
        """Open now (also used for 401/403: the pool is misconfigured)."""
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_in_flight = False

    @property
    def failures_in_a_row(self) -> int:
        """Health failures since the last success."""
        return self._consecutive

    def _probe_claimed(self) -> bool:
        return self._probe_in_flight and self._clock() - self._probe_at < self.settings.cooldown_s

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


def _no_change(model: str | None, previous: State, new: State) -> None:
    return None


class Circuits:
    """The pool's breakers as seen by one worker: per upstream model, and pool-level.

    ``on_change(model, previous, new)`` is called once for every real change
    (``model`` None: the pool-level circuit), whichever call observes it first;
    ``poll`` observes the clock's open -> half_open.
    """

    def __init__(
        self,
        settings: CircuitSettings,
        *,
        clock: Clock = time.monotonic,
        on_change: OnChange = _no_change,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self._pool = CircuitBreaker(settings, clock)
        self._models: dict[str, CircuitBreaker] = {}
        self._seen: dict[str | None, State] = {}  # the last state told to on_change

    # --- a request ---------------------------------------------------------------------

    def allow(self, model: str) -> bool:
        """May a request for ``model`` go upstream now? In half-open it claims the probe
        (of the pool-level circuit, the model's, or both)."""
        breakers = [self._pool, self._breaker(model)]
        if not all(b.ready() for b in breakers):
            self._sync_all(model)
            return False
        for b in breakers:
            b.allow()
        self._sync_all(model)
        return True

    def record_success(self, model: str) -> None:
        """The provider answered: the model's circuit and the pool-level one close."""
        self._pool.record_success()
        self._breaker(model).record_success()
        self._sync_all(model)

    def record_failure(self, model: str, err: ProviderError) -> None:
        """Count ``err`` for the circuit it speaks of; a probe it does not count for is
        released, so the next request probes instead."""
        if isinstance(err, CircuitOpen):
            return  # no call was made: allow() said no and claimed nothing
        breaker = self._breaker(model)
        if not err.health:
            self._pool.release_probe()
            breaker.release_probe()
        elif isinstance(err, AuthFailed):  # the key is wrong for every model: open at once
            breaker.release_probe()
            self._pool.trip()
        elif err.pool_level:
            breaker.release_probe()
            self._pool.record_failure()
        else:
            self._pool.release_probe()
            breaker.record_failure()
        self._sync_all(model)

    # --- reading -------------------------------------------------------------------------

    def state(self, model: str | None = None) -> State:
        """The model's own circuit (closed if never seen); None: the pool-level one."""
        return self._sync(model)

    def failures_in_a_row(self, model: str) -> int:
        """Health failures of ``model`` (or of the pool) since the last success: more than
        one request's own means the provider is failing for others too."""
        return max(self._pool.failures_in_a_row, self._breaker(model).failures_in_a_row)

    def healthy(self, model: str) -> bool:
        """Neither the pool-level circuit nor the model's is open."""
        return self._sync(None) != "open" and self._sync(model) != "open"

    def route_pulls(self, model: str, free_slots: int) -> int:
        """Pulls a route served with ``model`` may keep outstanding: none while either
        circuit is open, at most one while one is half-open with its probe unclaimed."""
        states = (self._sync(None), self._sync(model))
        if states == ("closed", "closed"):
            return free_slots
        if "open" in states:
            return 0
        ready = self._pool.ready() and (model not in self._models or self._models[model].ready())
        return min(1, free_slots) if ready else 0

    def wake_in_s(self) -> float | None:
        """Seconds until the next open circuit becomes half-open; None if none is open."""
        self.poll()  # a cooldown that just ended is told now, not after a full idle wait
        waits = [b.cooldown_left_s() for b in (self._pool, *self._models.values())]
        left = [w for w in waits if w is not None]
        return min(left) if left else None

    def poll(self) -> None:
        """Apply the clock's open -> half_open and tell ``on_change`` about it."""
        self._sync(None)
        for model in list(self._models):
            self._sync(model)

    def snapshot(self) -> dict[str, State]:
        """The models whose circuit is not closed: model -> state."""
        states = {model: self._sync(model) for model in list(self._models)}
        return {model: state for model, state in states.items() if state != "closed"}

    # --- bookkeeping -------------------------------------------------------------------

    def _breaker(self, model: str) -> CircuitBreaker:
        breaker = self._models.get(model)
        if breaker is None:
            self._make_room()
            breaker = self._models[model] = CircuitBreaker(self.settings, self._clock)
        return breaker

    def _make_room(self) -> None:
        """Keep at most MAX_MODELS breakers: drop closed ones, else the oldest."""
        if len(self._models) < MAX_MODELS:
            return
        for model in [m for m in self._models if self._sync(m) == "closed"]:
            self._forget(model)
        while len(self._models) >= MAX_MODELS:
            self._forget(next(iter(self._models)))

    def _forget(self, model: str) -> None:
        del self._models[model]
        previous = self._seen.pop(model, "closed")
        if previous != "closed":
            self._on_change(model, previous, "closed")

    def _sync_all(self, model: str) -> None:
        self._sync(None)
        self._sync(model)

    def _sync(self, model: str | None) -> State:
        """The key's state now; tells ``on_change`` if it is not the one last told."""
        if model is None:
            state = self._pool.state
        elif model in self._models:
            state = self._models[model].state
        else:
            return "closed"
        previous = self._seen.get(model, "closed")
        if state != previous:
            self._seen[model] = state
            self._on_change(model, previous, state)
        return state


def target_healthy(
    circuits: Circuits, own_pool: str, peers: Mapping[str, Heartbeat], pool: str, model: str
) -> bool:
    """Is ``pool`` worth sending ``model`` requests to? This worker's own circuits for its
    own pool; for another, some live heartbeat with neither circuit open."""
    if pool == own_pool:
        return circuits.healthy(model)
    return any(
        hb.pool == pool and hb.circuit != "open" and hb.circuits.get(model) != "open"
        for hb in peers.values()
    )
