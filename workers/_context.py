"""What a job gets from its worker: the pool's settings, connections and shared state.

A ``JobRun`` (``_job.py``) and the checks on a delivered job (``_intake.py``)
see the worker only through a ``PoolContext``, never the ``Worker`` itself, the
way an arq job gets its ``ctx``. The worker builds one after it has connected
(``_worker.py``); the circuits, budget and metrics in it are the worker's own
objects, shared by every job of the pool. ``Circuits`` tells the worker about
its own changes (``_peers.Peers.circuit_changed``); ``target_healthy`` reads the
other workers' circuits from their heartbeats (``peers``).

The pool-wide actions a job can take live here too: answer a job (only on a
plain ``llm.reply.`` subject, ``broker/_validate.is_reply_subject``), dead-letter
it (DLQ publish, metric, ``dead`` event) and pause the whole pool after a 429.
Answering and dead-lettering never raise for NATS trouble: they log and report
whether it worked, so that a failure to park one bad job never reaches the
worker's task group (the caller decides what becomes of the message).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from msgspec import UnsetType
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from broker._config import Config, PoolConfig
from broker._cost import attempt_cost, usage_cost
from broker._errors import ProviderError, RelayError
from broker._nats import nats_errors
from broker._protocol import (
    Attempt,
    DeadLetter,
    Done,
    Error,
    Event,
    Job,
    LifecycleEvent,
    PoolPause,
    Usage,
    encode,
    now_ms,
)
from broker._subjects import dlq_subject, events_subject, pause_subject
from broker._validate import is_reply_subject, preview
from workers._circuit import Circuits, target_healthy
from workers._decide import attempt_record
from workers._http import HttpShards
from workers._metrics import WorkerMetrics
from workers._ratelimit import RateBudget, prompt_chars
from workers._scheduler import PeerView

if TYPE_CHECKING:  # imported only when tracing is on (README "Tracing")
    from workers._delivery import Delivery
    from workers._tracing import JobTrace, JobTracer

log = logging.getLogger("llmrelay.worker")

DLQ_TIMEOUT_S = 5.0
# A final event on a replicated cluster: each try's wait for its PubAck, the pause
# between tries (a stream electing a leader answers nothing), and how long past the
# job's deadline it is tried before it goes out plain.
FINAL_TIMEOUT_S = 1.0
FINAL_RETRY_S = 0.25
FINAL_GRACE_S = 5.0
# Room for the headers of a DLQ publish below the server's max payload.
_HEADER_ROOM_BYTES = 4096


def known_models(config: Config, pool_name: str) -> frozenset[str]:
    """The upstream models a pool may be asked for: its own list and its route targets."""
    routed = {t.model for _, _, t in config.routes_of_pool(pool_name)}
    return frozenset(config.pools[pool_name].models) | routed


@dataclass(frozen=True, kw_only=True, eq=False)
class PoolContext:
    """One pool as its jobs see it (built once per worker, after connecting)."""

    config: Config
    pool_name: str
    worker_id: str
    nc: NATS
    http: HttpShards
    metrics: WorkerMetrics
    circuits: Circuits
    budget: RateBudget
    peers: PeerView
    # Models that refused a prefilled continuation (``_continuation.Continuation``):
    # this worker stops sending them prefills.
    prefill_refused: set[str] = field(default_factory=set)
    # The worker's spans (``_tracing.py``); None: tracing is off.
    tracer: JobTracer | None = None

    @property
    def pool(self) -> PoolConfig:
        return self.config.pools[self.pool_name]

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    @cached_property
    def _known_models(self) -> frozenset[str]:
        return known_models(self.config, self.pool_name)

    def model_for(self, job: Job) -> str | None:
        """Upstream model for a job: its route's target for this pool, or a pinned model."""
        model = self.config.model_for(job.route, self.pool_name)
        if model is not None:
            return model
        if job.pool == self.pool_name and (not self.pool.models or job.route in self.pool.models):
            return job.route  # pinned to this pool with an upstream model name as the route
        return None

    def trace_delivery(self, delivery: Delivery) -> JobTrace | None:
        """The spans of one delivery, or None when tracing is off (the run's only cost then)."""
        return None if self.tracer is None else self.tracer.delivery(delivery)

    def model_label(self, model: str) -> str:
        """A bounded metric label: configured models by name, anything else as "other"."""
        return model if model in self._known_models else "other"

    def priced(self, job: Job, usage: Usage, done: Done) -> Done:
        """``done`` with what its attempt's own ``usage`` cost (``Done.cost_usd``), counted."""
        done.cost_usd = usage_cost(self.config.price_for(job.route, self.pool_name), usage)
        self._spent(job.route, done.model, done.cost_usd)
        return done

    def log_fields(self, job: Job, attempt: int) -> dict[str, object]:
        """What a run's JSON log lines carry (cli/_common.JsonFormatter); never content."""
        return {"request_id": job.id, "route": job.route, "pool": self.pool_name,
                "attempt": attempt, "worker_id": self.worker_id}  # fmt: skip

    def attempt_record(self, job: Job | None, err: ProviderError, **record: Any) -> Attempt:
        """``_decide.attempt_record`` with what the failed try cost (``Attempt.cost_usd``,
        its prompt estimated as in ``_job``), counted; ``job`` None: not yet read."""
        attempt = attempt_record(err, **record)
        if job is not None:
            price = self.config.price_for(job.route, self.pool_name)
            attempt.cost_usd = attempt_cost(price, attempt, max(1, prompt_chars(job) // 4))
            self._spent(job.route, attempt.model, attempt.cost_usd)
        return attempt

    def _spent(self, route: str, model: str, cost_usd: float | UnsetType) -> None:
        if not isinstance(cost_usd, UnsetType):
            self.metrics.spent(route, self.model_label(model), cost_usd)

    def target_healthy(self, pool: str, model: str) -> bool:
        """Is ``pool`` worth sending ``model`` requests to? True until the peers'
        heartbeats are known; this worker's own circuits for its own pool."""
        if not self.peers.known:
            return True
        return target_healthy(self.circuits, self.pool_name, self.peers.peers, pool, model)

    async def reply(self, subject: str, event: Event, deadline_ms: int) -> None:
        """Publish one event of a job's answer (its run checked ``subject``).

        Replies are core NATS messages, captured by ``LLM_REPLIES``. On a replicated
        cluster (``streams.replicas`` > 1) a final event (done, error) is published
        to JetStream instead and waited for, retried through a leader election, so
        it is stored before the job is acked: a caller whose node died reads it back
        from ``LLM_REPLIES``, and a redelivery finds it and only acks. Past the job's
        deadline (plus ``FINAL_GRACE_S``) it is sent plain, as the best left to do.
        """
        data = encode(event)
        if self.config.streams.replicas < 2 or not isinstance(event, Done | Error):
            await self.nc.publish(subject, data)
            return
        until_s = deadline_ms / 1000 + FINAL_GRACE_S
        # A try whose PubAck was lost may have been stored: the stream keeps one copy.
        # (Live readers may get two identical ones; they take the first.)
        once = {"Nats-Msg-Id": f"{subject}:{event.attempt}"}
        while True:
            try:
                with nats_errors(f"the final event on {subject}"):
                    await self.js.publish(subject, data, timeout=FINAL_TIMEOUT_S, headers=once)
                return
            except RelayError as exc:
                if time.time() >= until_s:
                    log.warning("%s was not stored (%s); sent plain", subject, exc)
                    await self.nc.publish(subject, data)
                    return
            await anyio.sleep(FINAL_RETRY_S)

    async def answer(self, reply_to: str, event: Event) -> bool:
        """Publish ``event`` to a job's reply subject; False if it is not a plain
        ``llm.reply.`` subject (a job must not make a worker publish elsewhere) or
        NATS did not take it."""
        if not is_reply_subject(reply_to):
            return False
        try:
            with nats_errors(f"answer on {reply_to}"):
                await self.nc.publish(reply_to, encode(event))
        except RelayError as exc:
            log.warning("could not answer on %s: %s", reply_to, exc)
            return False
        return True

    async def park(self, job: Job, code: str, message: str, attempts: list[Attempt]) -> bool:
        """Park ``job`` (with ``attempts``) in the DLQ; False if JetStream did not take it."""
        job = msgspec.structs.replace(job, attempts=attempts)
        letter = DeadLetter(code=code, message=message, at_ms=now_ms(), route=job.route, job=job)
        return await self.dead_letter(letter)

    async def dead_letter(self, letter: DeadLetter) -> bool:
        """Park ``letter`` in the DLQ; False (logged) if JetStream did not take it."""
        subject = dlq_subject(letter.route)
        try:
            with nats_errors(f"dead-letter to {subject}"):
                await self.js.publish(subject, self._fitting(letter), timeout=DLQ_TIMEOUT_S)
        except RelayError as exc:
            rid = letter.job.id if letter.job else "an undecodable job"
            log.error("could not dead-letter %s (%s): %s", rid, letter.code, exc)
            return False
        self.metrics.dead_lettered(letter.route, letter.code)
        rid = letter.job.id if letter.job else ""
        await self.announce("dead", rid, letter.route, f"{letter.code}: {letter.message}")
        return True

    async def announce(self, kind: str, request_id: str, route: str, detail: str) -> None:
        """One line on ``llm.events.<kind>`` (``llmrelay tail``); NATS trouble is logged."""
        event = LifecycleEvent(
            kind=kind,
            request_id=request_id,
            route=route,
            pool=self.pool_name,
            at_ms=now_ms(),
            detail=detail,
        )
        try:
            with nats_errors(f"the {kind} event"):
                await self.nc.publish(events_subject(kind), encode(event))
        except RelayError as exc:
            log.warning("the %s event of %s was not sent: %s", kind, request_id or "-", exc)

    def _fitting(self, letter: DeadLetter) -> bytes:
        """The letter, encoded within the server's max payload: a job too large to
        embed whole is kept as a preview of its encoding, like a bad payload."""
        data = encode(letter)
        if letter.job is None or len(data) <= self.nc.max_payload - _HEADER_ROOM_BYTES:
            return data
        job = encode(letter.job)
        return encode(
            msgspec.structs.replace(letter, job=None, raw=preview(job), raw_bytes=len(job))
        )

    async def pause_pool(self, seconds: float) -> None:
        """Pause every worker of this pool (an upstream 429 with Retry-After)."""
        self.budget.pause(seconds)
        pause = PoolPause(until_ms=now_ms() + int(seconds * 1000))
        await self.nc.publish(pause_subject(self.pool_name), encode(pause))
