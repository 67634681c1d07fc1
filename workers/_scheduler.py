"""Pull scheduling: which consumer gets each free slot of the worker, and when.

A worker reads one ``Puller`` per consumer (``_puller.py``): its pool's own
``llm.pool.<pool>`` subject and every route it serves, at the priority of its
rank. One pump (``PullScheduler.pump``) keeps ``busy + outstanding pulls <=
slots``: a pull is issued only for a free slot and only when the rate budget
allows a request, and a route's pull only when the circuits of the model the
pool serves it with allow one (``_circuit.Circuits.route_pulls``), so the pool
never takes work it cannot start. The pool's own subject keeps pulling whatever
the circuits say: a job there that cannot go upstream is failed over at once.
The pump sleeps no longer than the next circuit cooldown, so the half-open
probe is pulled the moment it may go. Which consumer gets a slot follows the
route config: primaries weigh more than backups, a failover-only backup pulls
only while no better target is healthy (the peers' heartbeats, ``_peers.py``,
with the circuits of the target's model), and a backlog-only backup asks for a
minimum backlog.

The scheduler counts busy slots; the worker (``_worker.py``) gets each pulled
job through ``dispatch`` and reports its end with ``job_finished``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

import anyio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker._config import Config
from broker._protocol import Heartbeat
from broker._subjects import pool_consumer, route_consumer
from workers._circuit import Circuits, target_healthy
from workers._metrics import WorkerMetrics
from workers._puller import Puller
from workers._ratelimit import RateBudget

ROTATING_PULL_EXPIRY_S = 1.0
# Route pull weights: a pool's main job is the routes it is primary for.
_WEIGHT_PRIMARY, _WEIGHT_BACKUP = 2.0, 1.0
# Without a wake-up, the pump looks again after this long.
_IDLE_WAIT_S = 1.0
# Pulls made while disconnected would wait in a buffer and outlive their slot.
_DISCONNECTED_WAIT_S = 0.5

Dispatch = Callable[[Msg, str | None], None]


class PeerView(Protocol):
    """The peers' heartbeats as the scheduler reads them (``_peers.Peers``)."""

    @property
    def known(self) -> bool: ...

    @property
    def peers(self) -> Mapping[str, Heartbeat]: ...


class Wakeup:
    """Wakes the pump (and a drain waiting for free slots) when something changed."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float | None = None) -> None:
        with anyio.move_on_after(timeout_s if timeout_s is not None else _IDLE_WAIT_S):
            await self._event.wait()
        self._event = anyio.Event()


def top_rank(config: Config, route: str) -> int:
    return min(rank for rank, _ in config.routes[route].ranks())


def make_pullers(nc: NATS, config: Config, pool_name: str) -> list[Puller]:
    """The pool's own subject first, then one puller per route target of the pool."""
    pullers = [Puller(nc, consumer=pool_consumer(pool_name), route=None, rank=0, priority=0)]
    for route, rank, _target in config.routes_of_pool(pool_name):
        r = config.routes[route]
        backlog_only = r.spill == "backlog" and rank > top_rank(config, route)
        puller = Puller(
            nc,
            consumer=route_consumer(route),
            route=route,
            rank=rank,
            priority=min(rank, 9),
            min_pending=r.min_pending if backlog_only else None,
        )
        pullers.append(puller)
    return pullers


class PullScheduler:
    """Hands the worker's free slots to its pullers."""

    def __init__(
        self,
        nc: NATS,
        pullers: list[Puller],
        *,
        config: Config,
        pool_name: str,
        slots: int,
        circuits: Circuits,
        budget: RateBudget,
        metrics: WorkerMetrics,
        peers: PeerView,
        wake: Wakeup,
        stopping: anyio.Event,
        dispatch: Dispatch,
    ) -> None:
        self.config = config
        self.pool_name = pool_name
        self.slots = slots
        self.busy = 0
        self.pullers = pullers  # the pool's own subject first (``make_pullers``)
        # route -> the upstream model this pool serves it with (looked up on every pull)
        self._route_models = {
            p.route: config.model_for(p.route, pool_name) or p.route
            for p in pullers
            if p.route is not None
        }
        self._nc = nc
        self._circuits = circuits
        self._budget = budget
        self._metrics = metrics
        self._peers = peers
        self._wake = wake
        self._stopping = stopping
        self._dispatch = dispatch
        self._own_turn = True  # one-slot workers alternate between own subject and routes

    async def start(self) -> None:
        for p in self.pullers:
            await p.start(self._on_job, self._on_idle)

    async def stop_pulling(self) -> None:
        for p in self.pullers:
            await p.stop()

    def forget_pulls(self) -> int:
        """The connection was lost, and every waiting pull with it; return how many."""
        return sum(p.forget_all() for p in self.pullers)

    def write_off_stale(self) -> int:
        return sum(p.write_off_stale() for p in self.pullers)

    async def pump(self) -> None:
        """The one place pulls are issued."""
        while not self._stopping.is_set():
            wait_s = await self._issue_pulls()
            await self._wake.wait(_sooner(wait_s, self._circuits.wake_in_s()))

    def job_finished(self) -> None:
        self.busy -= 1
        self._metrics.slots(self.busy, self.slots)
        self._wake.set()

    # --- issuing pulls -------------------------------------------------------------------

    async def _issue_pulls(self) -> float | None:
        if not self._nc.is_connected:
            return _DISCONNECTED_WAIT_S
        outstanding = sum(p.outstanding for p in self.pullers)
        free = self.slots - self.busy - outstanding
        if self.pullers[0].outstanding == 0 and self.busy < self.slots and self.slots > 1:
            # Waiting route pulls may hold every slot that is not busy; the own subject
            # (failovers, pinned jobs) still gets its pull, or its jobs would wait in
            # line behind idle route pulls, one at a time. A route job that then
            # arrives too waits for a connection (``_pick``).
            free = max(free, 1)
        room = self._route_room()
        while free > 0:
            wait_s = self._budget.wait_s()
            if wait_s > 0:
                self._metrics.rate_limited_wait()
                return wait_s
            puller = self._pick(room)
            if puller is None:
                return None
            self._budget.try_acquire()
            await puller.pull(min_pending=self._min_pending(puller), expires_s=self._expiry(puller))
            free -= 1
            if puller.is_route:
                room[self._model(puller)] -= 1
                room[None] -= 1
        return None

    def _route_room(self) -> Counter[str | None]:
        """Route pulls that may still be issued, by the upstream model the route is served
        with (the circuits share that model's breaker), and in all (key None: while the
        pool-level circuit is half-open, one probe for every model together)."""
        serving = self.slots - self.busy
        out: Counter[str | None] = Counter()
        for p in self.pullers[1:]:
            out[self._model(p)] += p.outstanding
        room: Counter[str | None] = Counter()
        for model in {self._model(p) for p in self.pullers[1:]}:
            room[model] = self._circuits.route_pulls(model, serving) - out[model]
        pool_state = self._circuits.state()
        total = serving if pool_state == "closed" else (1 if pool_state == "half_open" else 0)
        room[None] = total - sum(out.values())
        return room

    def _model(self, p: Puller) -> str:
        """The upstream model this pool serves the puller's route with."""
        assert p.route is not None
        return self._route_models[p.route]

    def _pick(self, room: Counter[str | None]) -> Puller | None:
        """Which consumer gets the next free slot.

        The pool's own subject (failovers from other pools, pinned jobs) keeps
        exactly one pull, so a failover starts in milliseconds even while the
        routes are busy; every other free slot goes to the routes, rank-0 routes
        weighted above backup routes. A one-slot worker alternates.

        That own pull is re-issued as soon as a slot is not busy, even when
        waiting route pulls hold every free slot: a pull cannot be taken back,
        and failovers must not queue behind idle pulls (a backup during an
        outage of its primary gets both at once). So for a moment a worker may
        hold a few more jobs than ``concurrency``: the extra ones wait for one
        of its ``concurrency`` connections, within their time-to-first-token limit.
        """
        own = self.pullers[0]
        if own.outstanding == 0 and (self.slots > 1 or self._own_turn):
            self._own_turn = False
            return own
        best: Puller | None = None
        best_key = (float("inf"), float("inf"))
        if room[None] <= 0:
            return None
        for p in self.pullers[1:]:
            if room[self._model(p)] <= 0 or not self._may_pull_route(p):
                continue
            # Ties go to the route pulled least recently, so no route starves
            # when there are fewer slots than routes.
            key = ((p.outstanding + 1) / self._weight(p), p.last_pull_at)
            if key < best_key:
                best, best_key = p, key
        return best

    def _expiry(self, p: Puller) -> float | None:
        """Fewer route slots than routes: short pulls, so the slots rotate between routes."""
        if p.is_route and self.slots - 1 < len(self.pullers) - 1:
            return ROTATING_PULL_EXPIRY_S
        return None

    def _weight(self, p: Puller) -> float:
        assert p.route is not None
        return _WEIGHT_PRIMARY if p.rank == top_rank(self.config, p.route) else _WEIGHT_BACKUP

    def _may_pull_route(self, p: Puller) -> bool:
        """Backups of a failover-only route pull only while no better pool is healthy."""
        assert p.route is not None
        route = self.config.routes[p.route]
        if route.spill != "failover" or p.rank == top_rank(self.config, p.route):
            return True
        # A pull cannot be taken back, so wait for the first full view of the peers.
        return self._peers.known and not self._better_pool_healthy(p.route, p.rank)

    def _min_pending(self, p: Puller) -> int | None:
        if p.min_pending is None or p.route is None:
            return None
        # A backlog-only backup still takes everything once no better pool is healthy.
        return p.min_pending if self._better_pool_healthy(p.route, p.rank) else None

    def _better_pool_healthy(self, route: str, rank: int) -> bool:
        """Is a better target of the route healthy: its pool live, with neither the
        pool-level circuit nor the target model's open?"""
        better = {(t.pool, t.model) for r, t in self.config.routes[route].ranks() if r < rank}
        peers = self._peers.peers
        own = self.pool_name
        return any(target_healthy(self._circuits, own, peers, *t) for t in better)

    # --- pull results --------------------------------------------------------------------

    def _on_job(self, msg: Msg, puller: Puller) -> None:
        self._own_turn = puller.is_route
        self.busy += 1
        self._budget.note_request()
        self._metrics.slots(self.busy, self.slots)
        self._dispatch(msg, puller.route)
        if not puller.is_route:
            self._wake.set()  # the own subject's pull again, now (``_issue_pulls``)

    def _on_idle(self, puller: Puller) -> None:
        self._budget.release_unused()
        if puller.is_route:
            self._own_turn = True
        self._wake.set()


def _sooner(a_s: float | None, b_s: float | None) -> float | None:
    waits = [w for w in (a_s, b_s) if w is not None]
    return min(waits) if waits else None
