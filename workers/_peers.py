"""Heartbeats: this worker's own, and its view of every worker's.

Each worker puts a ``Heartbeat`` under ``<pool>.<worker_id>`` in the
``llm_workers`` KV every ``heartbeat_ttl_s / 3``; the bucket's TTL and limit
marker make a dead worker's key vanish with a ``PURGE`` that the others see
(NATS-NOTES.md). Watching the whole bucket tells a worker how many workers
share its pool's rate limits (``RateBudget.set_share``) and which pools are
healthy, which the pull scheduler (``_scheduler.py``) reads to decide whether a
backup may pull. A change of one of this worker's circuits (a model's, or the
pool-level one, ``_circuit.Circuits``) is told at once, on ``llm.events.circuit``
and with a fresh heartbeat, not at the next beat; the heartbeat carries the
pool-level state (``circuit``) and every model circuit that is not closed
(``circuits``).

A NATS outage never ends these loops: a missed beat waits for the next one, a
broken watch starts again a second later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from broker._errors import RelayError
from broker._nats import nats_errors
from broker._protocol import Heartbeat, LifecycleEvent, decode_heartbeat, encode, now_ms
from broker._subjects import WORKERS_BUCKET, events_subject
from workers._circuit import Circuits, State
from workers._metrics import WorkerMetrics
from workers._ratelimit import RateBudget

log = logging.getLogger("llmrelay.worker")

Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]

PEER_WATCH_RESTART_S = 1.0


class Peers:
    """This worker's heartbeat and circuit announcements; ``peers``: every worker's heartbeat."""

    def __init__(
        self,
        *,
        pool_name: str,
        worker_id: str,
        interval_s: float,
        circuits: Circuits,
        budget: RateBudget,
        metrics: WorkerMetrics,
        beat: Callable[[], Heartbeat],
        poke: Callable[[], None],
        spawn: Spawn,
    ) -> None:
        self.pool_name = pool_name
        self.worker_id = worker_id
        self.peers: dict[str, Heartbeat] = {}  # by KV key, this worker included
        self.known = False  # the first full snapshot of the bucket was read
        self._interval_s = interval_s
        self._circuits = circuits
        self._budget = budget
        self._metrics = metrics
        self._beat = beat
        self._poke = poke
        self._spawn = spawn
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None

    async def open(self, nc: NATS) -> None:
        self._nc = nc
        self._kv = await nc.jetstream().key_value(WORKERS_BUCKET)

    @property
    def _key(self) -> str:
        return f"{self.pool_name}.{self.worker_id}"

    # --- this worker's heartbeat ------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        while True:
            self._circuits.poll()  # open -> half_open happens by the clock
            await self._put_or_skip()
            await anyio.sleep(self._interval_s)

    async def _put_or_skip(self) -> None:
        try:
            await self.put()
        except RelayError as exc:  # server away: the next beat will do
            log.debug("heartbeat not stored: %r", exc)

    async def put(self) -> None:
        assert self._kv is not None
        with nats_errors("storing the heartbeat"):
            await self._kv.put(self._key, encode(self._beat()))

    async def delete(self) -> None:
        """Best effort: if it fails, the key expires after heartbeat_ttl_s anyway."""
        if self._kv is None or self._nc is None or not self._nc.is_connected:
            return
        try:
            with nats_errors("deleting the heartbeat"):
                await self._kv.delete(self._key)
        except RelayError as exc:
            log.info("heartbeat not deleted (%r); it will expire", exc)

    def circuit_changed(self, model: str | None, previous: State, state: State) -> None:
        """``Circuits.on_change``: a real change of a model's circuit (None: the pool's)."""
        self._metrics.circuit_state(model, state)
        self._poke()
        what = "pool" if model is None else f"model {model}"
        self._spawn(partial(self._announce_circuit, f"{what}: {previous} -> {state}"))

    async def _announce_circuit(self, detail: str) -> None:
        """Tell `llm.events.circuit` and the heartbeat KV at once, not at the next beat."""
        log.warning("pool %s circuit %s (worker %s)", self.pool_name, detail, self.worker_id)
        event = LifecycleEvent(
            kind="circuit", request_id="", pool=self.pool_name, at_ms=now_ms(), detail=detail
        )
        assert self._nc is not None
        try:
            with nats_errors("the circuit event"):
                await self._nc.publish(events_subject("circuit"), encode(event))
        except RelayError as exc:  # the heartbeat still tells the other workers
            log.info("circuit event not sent: %r", exc)
        await self._put_or_skip()

    # --- every worker's heartbeat -------------------------------------------------------

    async def watch(self) -> None:
        """Follow every worker's heartbeat; restart the watch if the connection drops."""
        while True:
            try:
                with nats_errors("watching the heartbeats"):
                    await self._follow()
            except RelayError as exc:
                log.debug("peer watch interrupted: %r", exc)
            await anyio.sleep(PEER_WATCH_RESTART_S)

    async def _follow(self) -> None:
        assert self._kv is not None
        watcher = await self._kv.watchall()
        async for entry in watcher:
            if entry is None:  # end of the initial snapshot
                self.known = True
                self._poke()
                continue
            if not self._note(entry):
                continue
            live = sum(1 for hb in self.peers.values() if hb.pool == self.pool_name)
            self._budget.set_share(live)
            self._poke()

    def _note(self, entry: KeyValue.Entry) -> bool:
        """Record one KV entry; False if it could not be read."""
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.peers.pop(entry.key, None)
            return True
        try:
            self.peers[entry.key] = decode_heartbeat(entry.value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return False
        return True
