"""What a job gets from its worker: the pool's settings, connections and shared state.

A ``JobRun`` (``_job.py``) and the checks on a delivered job (``_intake.py``)
see the worker only through a ``PoolContext``, never the ``Worker`` itself, the
way an arq job gets its ``ctx``. The worker builds one after it has connected
(``_worker.py``); the breaker, budget and metrics in it are the worker's own
objects, shared by every job of the pool. ``circuit_changed`` is the worker's
hook (``_peers.Peers.circuit_changed``), called after every breaker update.

The pool-wide actions a job can take live here too: dead-letter a job (DLQ
publish, metric, ``dead`` event) and pause the whole pool after a 429.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from broker._config import Config, PoolConfig
from broker._protocol import DeadLetter, Job, LifecycleEvent, PoolPause, encode, now_ms
from broker._subjects import dlq_subject, events_subject, pause_subject
from workers._circuit import CircuitBreaker
from workers._http import HttpShards
from workers._metrics import WorkerMetrics
from workers._ratelimit import RateBudget


@dataclass(frozen=True, kw_only=True, eq=False)
class PoolContext:
    """One pool as its jobs see it (built once per worker, after connecting)."""

    config: Config
    pool_name: str
    worker_id: str
    nc: NATS
    http: HttpShards
    metrics: WorkerMetrics
    breaker: CircuitBreaker
    budget: RateBudget
    circuit_changed: Callable[[str], None]

    @property
    def pool(self) -> PoolConfig:
        return self.config.pools[self.pool_name]

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    @cached_property
    def _known_models(self) -> frozenset[str]:
        routed = {t.model for _, _, t in self.config.routes_of_pool(self.pool_name)}
        return frozenset(self.pool.models) | routed

    def model_for(self, job: Job) -> str | None:
        """Upstream model for a job: its route's target for this pool, or a pinned model."""
        model = self.config.model_for(job.route, self.pool_name)
        if model is not None:
            return model
        if job.pool == self.pool_name and (not self.pool.models or job.route in self.pool.models):
            return job.route  # pinned to this pool with an upstream model name as the route
        return None

    def model_label(self, model: str) -> str:
        """A bounded metric label: configured models by name, anything else as "other"."""
        return model if model in self._known_models else "other"

    async def dead_letter(self, letter: DeadLetter) -> None:
        subject = dlq_subject(letter.route)
        await self.js.publish(subject, encode(letter), timeout=5.0)
        self.metrics.dead_lettered(letter.route, letter.code)
        event = LifecycleEvent(
            kind="dead",
            request_id=letter.job.id if letter.job else "",
            route=letter.route,
            pool=self.pool_name,
            at_ms=letter.at_ms,
            detail=f"{letter.code}: {letter.message}",
        )
        await self.nc.publish(events_subject("dead"), encode(event))

    async def pause_pool(self, seconds: float) -> None:
        """Pause every worker of this pool (an upstream 429 with Retry-After)."""
        self.budget.pause(seconds)
        pause = PoolPause(until_ms=now_ms() + int(seconds * 1000))
        await self.nc.publish(pause_subject(self.pool_name), encode(pause))
