"""A worker process serving one pool.

One ``httpx.AsyncClient`` whose connection limit equals the slots (keep-alive
on, so connections are reused), one ``Puller`` per consumer the pool reads
(its own ``llm.pool.<pool>`` subject and every route it serves, at the priority
of its rank), and one pump that keeps ``busy + outstanding pulls <= slots``:
a pull is issued only for a free slot and only when the rate budget allows a
request, so the pool never takes work it cannot start.

Background loops: heartbeats into the ``llm_workers`` KV (which also tell each
worker how many peers share the pool's rate limits and which pools are
healthy), in-progress acks for long streams, write-off of forgotten pulls, and
dead-lettering of jobs that hit the consumer's max deliveries.

Shutdown (``stop()``, SIGTERM): no new pulls; in-flight jobs get ``drain_s`` to
finish, then are handed back (nak) for another worker.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

import anyio
import httpx
import msgspec
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from broker._config import Config, PoolConfig
from broker._errors import InternalError, RelayError, UnknownRoute
from broker._nats import connect
from broker._protocol import (
    DeadLetter,
    Error,
    Heartbeat,
    Job,
    LifecycleEvent,
    PoolPause,
    decode_heartbeat,
    decode_job,
    decode_pause,
    encode,
    now_ms,
)
from broker._subjects import (
    JOBS_STREAM,
    MAX_DELIVERIES_ADVISORY,
    WORKER_INBOX_PREFIX,
    WORKERS_BUCKET,
    cancel_all_subject,
    dlq_subject,
    events_subject,
    pause_subject,
    pool_consumer,
    route_consumer,
)
from broker._topology import ensure_topology
from workers._circuit import CircuitBreaker
from workers._http import HttpShards
from workers._job import JobRun
from workers._metrics import WorkerMetrics
from workers._puller import Puller
from workers._ratelimit import RateBudget

log = logging.getLogger("llmrelay.worker")

VERSION = "0.1.0"
ROTATING_PULL_EXPIRY_S = 1.0
# Route pull weights: a pool's main job is the routes it is primary for.
_WEIGHT_PRIMARY, _WEIGHT_BACKUP = 2.0, 1.0


class Worker:
    """Serve one pool until ``stop()``. Use ``await worker.run()`` in a task group."""

    def __init__(
        self,
        config: Config,
        pool_name: str,
        *,
        nats_url: str | None = None,
        concurrency: int | None = None,
        metrics_port: int | None = None,
        worker_id: str | None = None,
        drain_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if pool_name not in config.pools:
            raise UnknownRoute(f"no pool named {pool_name!r} (pools: {', '.join(config.pools)})")
        self.config = config
        self.pool_name = pool_name
        self.pool: PoolConfig = config.pools[pool_name]
        self.slots = concurrency or self.pool.concurrency
        self.nats_url = nats_url or config.nats.url
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics_port = metrics_port
        self.drain_s = drain_s
        self._transport = transport
        self.metrics = WorkerMetrics(pool_name)
        self.breaker = CircuitBreaker(self.pool.circuit)
        self.budget = RateBudget(self.pool.rpm, self.pool.tpm)
        self.busy = 0
        self.running: dict[str, JobRun] = {}
        self.pullers: list[Puller] = []
        self.peers: dict[str, Heartbeat] = {}
        self._own_turn = True  # one-slot workers alternate between own subject and routes
        self._circuit_seen = "closed"
        self._peers_known = False
        self._metrics_server: Any = None
        self._known_models = set(self.pool.models) | {
            t.model for _, _, t in config.routes_of_pool(pool_name)
        }
        self._wake = anyio.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._tg: TaskGroup | None = None
        self._nc: NATS | None = None
        self.http: HttpShards | None = None
        self._kv: KeyValue | None = None

    # --- public --------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "worker not started"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    def stop(self) -> None:
        """Begin a graceful shutdown. Safe to call twice."""
        self._stopping.set()
        self._poke()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve until ``stop()``, drain, disconnect."""
        try:
            await self._start()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._start_pullers()
                for loop in (
                    self._pump,
                    self._heartbeat_loop,
                    self._housekeeping_loop,
                    self._watch_peers,
                ):
                    tg.start_soon(loop)
                task_status.started()
                await self._stopping.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            await self._close()
            self._stopped.set()

    # --- start / stop ------------------------------------------------------------------

    async def _start(self) -> None:
        self._nc = await connect(
            self.config.nats,
            url=self.nats_url,
            name=f"llmrelay-worker-{self.pool_name}",
            inbox_prefix=WORKER_INBOX_PREFIX,
            reconnected=self._on_reconnected,
        )
        await ensure_topology(self._nc, self.config)
        self._kv = await self.js.key_value(WORKERS_BUCKET)
        self.http = HttpShards(
            self.pool, self.slots, on_request=self._trace_request, transport=self._transport
        )
        await self.nc.subscribe(cancel_all_subject(), cb=self._on_cancel)
        await self.nc.subscribe(pause_subject(self.pool_name), cb=self._on_pause)
        await self.nc.subscribe(
            MAX_DELIVERIES_ADVISORY, queue="llmrelay-dlq", cb=self._on_max_deliveries
        )
        if self.metrics_port is not None:
            self._metrics_server = self.metrics.serve(self.metrics_port)
        self.metrics.slots(0, self.slots)
        self.metrics.circuit_state("closed")
        log.info(
            "worker %s serving pool %s with %d slots", self.worker_id, self.pool_name, self.slots
        )

    async def _trace_request(self, request: httpx.Request) -> None:
        request.extensions["trace"] = self._on_trace

    async def _on_trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.metrics.connection_opened()

    async def _start_pullers(self) -> None:
        own = Puller(
            self.nc, consumer=pool_consumer(self.pool_name), route=None, rank=0, priority=0
        )
        self.pullers = [own]
        for route, rank, _target in self.config.routes_of_pool(self.pool_name):
            r = self.config.routes[route]
            min_pending = (
                r.min_pending if (r.spill == "backlog" and rank > self._top_rank(route)) else None
            )
            self.pullers.append(
                Puller(
                    self.nc,
                    consumer=route_consumer(route),
                    route=route,
                    rank=rank,
                    priority=min(rank, 9),
                    min_pending=min_pending,
                )
            )
        for p in self.pullers:
            await p.start(self._on_job, self._on_idle)

    async def _drain(self) -> None:
        for p in self.pullers:
            await p.stop()
        with anyio.move_on_after(self.drain_s):
            while self.busy:
                await self._wait_wake()
        for run in list(self.running.values()):
            run.cancel_scope.cancel()
        with anyio.move_on_after(2.0):
            while self.busy:
                await self._wait_wake()
        await self._delete_heartbeat()

    async def _close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.drain()

    # --- pulling -------------------------------------------------------------------------

    def _poke(self) -> None:
        self._wake.set()

    async def _wait_wake(self, timeout_s: float | None = None) -> None:
        with anyio.move_on_after(timeout_s if timeout_s is not None else 1.0):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _pump(self) -> None:
        """The one place pulls are issued."""
        while not self._stopping.is_set():
            wait_s = await self._issue_pulls()
            await self._wait_wake(wait_s)

    async def _issue_pulls(self) -> float | None:
        if not self.nc.is_connected:
            return 0.5  # pulls made now would wait in a buffer and outlive their slot
        outstanding = sum(p.outstanding for p in self.pullers)
        free = self.slots - self.busy - outstanding
        route_out = sum(p.outstanding for p in self.pullers if p.is_route)
        route_room = self.breaker.pulls_allowed(self.slots - self.busy) - route_out
        while free > 0:
            wait_s = self.budget.wait_s()
            if wait_s > 0:
                self.metrics.rate_limited_wait()
                return wait_s
            puller = self._pick(route_room)
            if puller is None:
                return None
            self.budget.try_acquire()
            await puller.pull(min_pending=self._min_pending(puller), expires_s=self._expiry(puller))
            free -= 1
            route_room -= 1 if puller.is_route else 0
        return None

    def _pick(self, route_room: int) -> Puller | None:
        """Which consumer gets the next free slot.

        The pool's own subject (failovers from other pools, pinned jobs) keeps
        exactly one pull, so a failover starts in milliseconds even while the
        routes are busy; every other free slot goes to the routes, rank-0 routes
        weighted above backup routes. A one-slot worker alternates.
        """
        own = self.pullers[0]
        if own.outstanding == 0 and (self.slots > 1 or self._own_turn):
            self._own_turn = False
            return own
        best: Puller | None = None
        best_key = (float("inf"), float("inf"))
        for p in self.pullers[1:]:
            if route_room <= 0 or not self._may_pull_route(p):
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
        return _WEIGHT_PRIMARY if p.rank == self._top_rank(p.route) else _WEIGHT_BACKUP

    def _top_rank(self, route: str) -> int:
        return min(rank for rank, _ in self.config.routes[route].ranks())

    def _may_pull_route(self, p: Puller) -> bool:
        """Backups of a failover-only route pull only while no better pool is healthy."""
        assert p.route is not None
        if self.config.routes[p.route].spill != "failover" or p.rank == self._top_rank(p.route):
            return True
        # A pull cannot be taken back, so wait for the first full view of the peers.
        return self._peers_known and not self._better_pool_healthy(p.route, p.rank)

    def _min_pending(self, p: Puller) -> int | None:
        if p.min_pending is None or p.route is None:
            return None
        # A backlog-only backup still takes everything once no better pool is healthy.
        return p.min_pending if self._better_pool_healthy(p.route, p.rank) else None

    def _better_pool_healthy(self, route: str, rank: int) -> bool:
        better = {t.pool for r, t in self.config.routes[route].ranks() if r < rank}
        return any(hb.pool in better and hb.circuit != "open" for hb in self.peers.values())

    def _on_job(self, msg: Msg, puller: Puller) -> None:
        self._own_turn = puller.is_route
        self.busy += 1
        self.budget.note_request()
        self.metrics.slots(self.busy, self.slots)
        if self._tg is None or self._stopping.is_set():
            self._tg_spawn_nak(msg)
            return
        self._tg.start_soon(self._run_job, msg, puller.route)

    def _tg_spawn_nak(self, msg: Msg) -> None:
        async def hand_back() -> None:
            await msg.nak()
            self._job_finished()

        if self._tg is not None:
            self._tg.start_soon(hand_back)

    def _on_idle(self, puller: Puller) -> None:
        self.budget.release_unused()
        if puller.is_route:
            self._own_turn = True
        self._poke()

    async def _run_job(self, msg: Msg, route: str | None) -> None:
        run = JobRun(self, msg, route)
        key = msg.reply or ""
        self.running[key] = run
        try:
            await run.run()
        except Exception:
            log.exception("bug while running a job; dead-lettering it")
            await self._bug(run)
        finally:
            self.running.pop(key, None)
            self._job_finished()

    def _job_finished(self) -> None:
        self.busy -= 1
        self.metrics.slots(self.busy, self.slots)
        self._poke()

    async def _bug(self, run: JobRun) -> None:
        job = run.job
        route = job.route if job else "_invalid"
        with anyio.CancelScope(shield=True):
            if job is not None:
                err = Error(
                    code=InternalError.code,
                    message="llmrelay failed on this job; it was dead-lettered",
                )
                await self.nc.publish(job.reply_to, encode(err))
            await self.dead_letter(
                DeadLetter(
                    code=InternalError.code,
                    message="worker bug",
                    at_ms=now_ms(),
                    route=route,
                    job=job,
                    raw=None if job else run.msg.data.decode(errors="replace"),
                )
            )
            await run.msg.term()

    # --- routing helpers used by JobRun ---------------------------------------------------

    def model_for(self, job: Job, from_route: str | None) -> str | None:
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
        rid = letter.job.id if letter.job else ""
        await self.nc.publish(
            events_subject("dead"),
            encode(
                LifecycleEvent(
                    kind="dead",
                    request_id=rid,
                    route=letter.route,
                    pool=self.pool_name,
                    at_ms=letter.at_ms,
                    detail=f"{letter.code}: {letter.message}",
                )
            ),
        )

    async def pause_pool(self, seconds: float) -> None:
        """Pause every worker of this pool (an upstream 429 with Retry-After)."""
        self.budget.pause(seconds)
        pause = PoolPause(until_ms=now_ms() + int(seconds * 1000))
        await self.nc.publish(pause_subject(self.pool_name), encode(pause))

    def circuit_changed(self, state: str) -> None:
        """Called after every breaker update; publishes real changes."""
        self.metrics.circuit_state(state)
        self._poke()
        if state != self._circuit_seen:
            previous, self._circuit_seen = self._circuit_seen, state
            if self._tg is not None:
                self._tg.start_soon(self._announce_circuit, previous, state)

    async def _announce_circuit(self, previous: str, state: str) -> None:
        """Tell `llm.events.circuit` and the heartbeat KV at once, not at the next beat."""
        log.warning(
            "pool %s circuit %s -> %s (worker %s)", self.pool_name, previous, state, self.worker_id
        )
        event = LifecycleEvent(
            kind="circuit",
            request_id="",
            pool=self.pool_name,
            at_ms=now_ms(),
            detail=f"{previous} -> {state}",
        )
        await self.nc.publish(events_subject("circuit"), encode(event))
        await self._put_heartbeat()

    # --- subscriptions ----------------------------------------------------------------

    async def _on_reconnected(self) -> None:
        """Pulls do not survive a lost connection: free their slots and pull again."""
        lost = sum(p.forget_all() for p in self.pullers)
        log.warning("reconnected to NATS; re-issuing %d pulls", lost)
        if self._tg is not None:  # a brand-new server has no streams yet
            self._tg.start_soon(self._reensure_topology)
        self._poke()

    async def _reensure_topology(self) -> None:
        """JetStream may take a moment after a restart; the memory KV is gone with it."""
        for delay_s in (0.1, 0.25, 0.5, 1, 2, 4, 8):
            try:
                await ensure_topology(self.nc, self.config)
                self._poke()
                return
            except (RelayError, nats.errors.Error) as exc:
                log.info("topology not ready after reconnect (%r); again in %gs", exc, delay_s)
                await anyio.sleep(delay_s)
        log.warning("could not re-create the topology after reconnecting")

    async def _on_cancel(self, msg: Msg) -> None:
        rid = msg.subject.rsplit(".", 1)[-1]
        for run in self.running.values():
            if run.job is not None and run.job.id == rid:
                run.cancelled_by_client = True
                run.cancel_scope.cancel()

    async def _on_pause(self, msg: Msg) -> None:
        try:
            pause = decode_pause(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.budget.pause(max(0.0, (pause.until_ms - now_ms()) / 1000))

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """A job delivered max_deliver times without an answer: dead-letter it."""
        try:
            seq = int(msgspec.json.decode(msg.data)["stream_seq"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return
        try:
            stored = await self.js.get_msg(JOBS_STREAM, seq)
        except NotFoundError:
            return
        await self._dead_letter_poison(stored.data or b"", seq)

    async def _dead_letter_poison(self, data: bytes, seq: int) -> None:
        try:
            job: Job | None = decode_job(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            job = None
        reason = (
            f"delivered {self.config.streams.max_deliver} times without an answer (workers died?)"
        )
        letter = DeadLetter(
            code=InternalError.code,
            message=reason,
            at_ms=now_ms(),
            route=job.route if job else "_invalid",
            job=job,
            raw=None if job else data.decode(errors="replace"),
        )
        await self.dead_letter(letter)
        if job is not None:
            await self.nc.publish(
                job.reply_to, encode(Error(code=InternalError.code, message=reason))
            )
        await self.js.delete_msg(JOBS_STREAM, seq)

    # --- background loops ----------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            pool=self.pool_name,
            worker_id=self.worker_id,
            slots=self.slots,
            busy=self.busy,
            circuit=self.breaker.state,
            version=VERSION,
            at_ms=now_ms(),
            metrics_port=self.metrics_port,
            rpm_used=self.budget.requests_used.total(),
            tpm_used=self.budget.tokens_used.total(),
        )

    async def _heartbeat_loop(self) -> None:
        interval = self.config.streams.heartbeat_ttl_s / 3
        while True:
            try:
                await self._put_heartbeat()
            except nats.errors.Error as exc:  # server away: the next beat will do
                log.debug("heartbeat not stored: %r", exc)
            state = self.breaker.state  # open -> half_open happens by the clock
            if state != self._circuit_seen:
                self.circuit_changed(state)
            await anyio.sleep(interval)

    async def _put_heartbeat(self) -> None:
        assert self._kv is not None
        await self._kv.put(f"{self.pool_name}.{self.worker_id}", encode(self.heartbeat()))

    async def _delete_heartbeat(self) -> None:
        """Best effort: if it fails, the key expires after heartbeat_ttl_s anyway."""
        if self._kv is not None and self.nc.is_connected:
            try:
                await self._kv.delete(f"{self.pool_name}.{self.worker_id}")
            except nats.errors.Error as exc:
                log.info("heartbeat not deleted (%r); it will expire", exc)

    async def _watch_peers(self) -> None:
        """Follow every worker's heartbeat; restart the watch if the connection drops."""
        while True:
            try:
                await self._follow_peers()
            except nats.errors.Error as exc:
                log.debug("peer watch interrupted: %r", exc)
            await anyio.sleep(1.0)

    async def _follow_peers(self) -> None:
        assert self._kv is not None
        watcher = await self._kv.watchall()
        async for entry in watcher:
            if entry is None:  # end of the initial snapshot
                self._peers_known = True
                self._poke()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.peers.pop(entry.key, None)
            else:
                try:
                    self.peers[entry.key] = decode_heartbeat(entry.value)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    continue
            live = sum(1 for hb in self.peers.values() if hb.pool == self.pool_name)
            self.budget.set_share(live)
            self._poke()

    async def _housekeeping_loop(self) -> None:
        """In-progress acks for long streams; write off pulls the server forgot."""
        interval = min(1.0, self.pool.ack_wait_s / 3)
        while True:
            await anyio.sleep(interval)
            now = time.monotonic()
            for run in list(self.running.values()):
                if now - run.last_progress >= self.pool.ack_wait_s / 3 and self.nc.is_connected:
                    run.last_progress = now
                    await run.msg.in_progress()
            if sum(p.write_off_stale() for p in self.pullers):
                self._poke()
