"""A worker process serving one pool: its lifecycle, and the modules it wires together.

``Worker.run`` connects, makes sure the streams and consumers exist, then runs
its loops in one anyio task group until ``stop()`` (SIGTERM). The parts:

- ``_scheduler.PullScheduler``: one ``Puller`` per consumer the pool reads, and
  the pump that hands free slots to them within the rate budget and circuits;
- ``_peers.Peers``: this worker's heartbeat and circuit announcements in the
  ``llm_workers`` KV, and the view of every worker's (budget share, healthy pools);
- ``_control.Control``: the cancel, pause and max-deliveries subscriptions;
- ``_job.JobRun``: one delivery of one job, given a ``_context.PoolContext``
  (config, connection, HTTP shards, circuits, budget, metrics, peers), never the worker;
- ``_circuit.Circuits``: the pool's circuit breakers, one per upstream model and
  one pool-level, as this worker sees them.

The worker itself starts a ``JobRun`` for each pulled job (``_run_job``, the
one place a bug in a job is caught: the job is dead-lettered, the worker goes
on), sends in-progress acks for long streams, writes off forgotten pulls, and
re-creates the topology after NATS comes back.

Shutdown (``stop()``, SIGTERM): no new pulls; in-flight jobs get ``drain_s`` to
finish, then are handed back (nak) for another worker.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker._config import Config, PoolConfig
from broker._errors import RelayError, UnknownRoute
from broker._nats import connect, nats_errors
from broker._protocol import Heartbeat, now_ms
from broker._subjects import WORKER_INBOX_PREFIX
from broker._topology import ensure_topology
from broker._tracing import sdk_missing
from workers._circuit import Circuits, State
from workers._context import PoolContext, known_models
from workers._control import Control, dead_letter_bug
from workers._http import HttpShards
from workers._job import JobRun
from workers._metrics import WorkerMetrics
from workers._peers import Peers
from workers._ratelimit import RateBudget
from workers._scheduler import PullScheduler, Wakeup, make_pullers

if TYPE_CHECKING:
    from workers._tracing import JobTracer

log = logging.getLogger("llmrelay.worker")

VERSION = "0.1.0"
# After a reconnect, JetStream may need a moment before the topology can be re-created.
_TOPOLOGY_RETRY_S = (0.1, 0.25, 0.5, 1, 2, 4, 8)
# After the drain, cancelled jobs get this long to hand their message back.
_CANCEL_GRACE_S = 2.0


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
        metrics_host: str = "127.0.0.1",
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
        self.metrics = WorkerMetrics(
            pool_name,
            host=metrics_host,
            routes=config.routes,
            models=known_models(config, pool_name),
        )
        self.circuits = Circuits(self.pool.circuit, on_change=self._circuit_changed)
        self.budget = RateBudget(self.pool.rpm, self.pool.tpm)
        self.running: dict[str, JobRun] = {}
        self._wake = Wakeup()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._peers = Peers(
            pool_name=pool_name,
            worker_id=self.worker_id,
            interval_s=config.streams.heartbeat_ttl_s / 3,
            circuits=self.circuits,
            budget=self.budget,
            metrics=self.metrics,
            beat=self.heartbeat,
            poke=self._wake.set,
            spawn=self._spawn,
        )
        self._tg: TaskGroup | None = None
        self._nc: NATS | None = None
        self._ctx: PoolContext | None = None
        self._control: Control | None = None
        self._scheduler: PullScheduler | None = None
        self._metrics_server: Any = None
        self._tracer: JobTracer | None = None

    # --- public --------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "worker not started"
        return self._nc

    @property
    def peers(self) -> dict[str, Heartbeat]:
        """Every worker's last heartbeat, by KV key (this worker's included)."""
        return self._peers.peers

    @property
    def busy(self) -> int:
        return self._scheduler.busy if self._scheduler is not None else 0

    def stop(self) -> None:
        """Begin a graceful shutdown. Safe to call twice."""
        self._stopping.set()
        self._wake.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve until ``stop()``, drain, disconnect."""
        try:
            await self._start()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._sched.start()
                tg.start_soon(self._sched.pump)
                tg.start_soon(self._peers.heartbeat_loop)
                tg.start_soon(self._housekeeping_loop)
                tg.start_soon(self._peers.watch)
                task_status.started()
                await self._stopping.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            await self._close()
            self._stopped.set()

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            pool=self.pool_name,
            worker_id=self.worker_id,
            slots=self.slots,
            busy=self.busy,
            circuit=self.circuits.state(),
            circuits={model: state for model, state in self.circuits.snapshot().items()},
            version=VERSION,
            at_ms=now_ms(),
            metrics_port=self.metrics_port,
            rpm_used=self.budget.requests_used.total(),
            tpm_used=self.budget.tokens_used.total(),
            cost_usd=dict(self.metrics.spend_by_route),
        )

    def _circuit_changed(self, model: str | None, previous: State, state: State) -> None:
        self._peers.circuit_changed(model, previous, state)

    # --- start / stop ------------------------------------------------------------------

    @property
    def _sched(self) -> PullScheduler:
        assert self._scheduler is not None, "worker not started"
        return self._scheduler

    @property
    def _context(self) -> PoolContext:
        assert self._ctx is not None, "worker not started"
        return self._ctx

    async def _start(self) -> None:
        self._nc = nc = await connect(
            self.config.nats,
            url=self.nats_url,
            name=f"llmrelay-worker-{self.pool_name}",
            inbox=WORKER_INBOX_PREFIX,
            reconnected=self._on_reconnected,
        )
        await ensure_topology(nc, self.config)
        await self._peers.open(nc)
        self._tracer = self._job_tracer()
        self._ctx = self._pool_context(nc)
        self._control = Control(self._ctx, self.running)
        await self._control.subscribe()
        self._scheduler = self._pull_scheduler(nc)
        if self.metrics_port is not None:
            self._metrics_server = self.metrics.serve(self.metrics_port)
        self.metrics.slots(0, self.slots)
        self.metrics.circuit_state(None, "closed")
        log.info(
            "worker %s serving pool %s with %d slots", self.worker_id, self.pool_name, self.slots
        )

    def _pool_context(self, nc: NATS) -> PoolContext:
        http = HttpShards(
            self.pool, self.slots, on_connect=self.metrics.connection_opened,
            transport=self._transport,
        )  # fmt: skip
        return PoolContext(
            config=self.config,
            pool_name=self.pool_name,
            worker_id=self.worker_id,
            nc=nc,
            http=http,
            metrics=self.metrics,
            circuits=self.circuits,
            budget=self.budget,
            peers=self._peers,
            tracer=self._tracer,
        )

    def _job_tracer(self) -> JobTracer | None:
        """The worker's spans, or None: with tracing off nothing of OpenTelemetry is imported."""
        if not self.config.tracing.enabled:
            return None
        try:
            from workers._tracing import JobTracer
        except ModuleNotFoundError as exc:
            raise sdk_missing(exc) from exc
        return JobTracer.start(self.config, self.pool_name, self.worker_id)

    def _pull_scheduler(self, nc: NATS) -> PullScheduler:
        return PullScheduler(
            nc,
            make_pullers(nc, self.config, self.pool_name),
            config=self.config,
            pool_name=self.pool_name,
            slots=self.slots,
            circuits=self.circuits,
            budget=self.budget,
            metrics=self.metrics,
            peers=self._peers,
            wake=self._wake,
            stopping=self._stopping,
            dispatch=self._dispatch,
        )

    async def _drain(self) -> None:
        await self._sched.stop_pulling()
        with anyio.move_on_after(self.drain_s):
            while self.busy:
                await self._wake.wait()
        for run in list(self.running.values()):
            run.cancel_scope.cancel()
        with anyio.move_on_after(_CANCEL_GRACE_S):
            while self.busy:
                await self._wake.wait()
        await self._peers.delete()

    async def _close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await ctx.http.aclose()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.drain()
        tracer, self._tracer = self._tracer, None
        if tracer is not None:
            tracer.close()  # the spans still held go out

    # --- jobs ----------------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn)

    def _dispatch(self, msg: Msg, route: str | None) -> None:
        """A pull brought a job (its slot is counted busy already): run it, or hand it back."""
        if self._tg is None or self._stopping.is_set():
            self._spawn(partial(self._hand_back, msg))
            return
        self._tg.start_soon(self._run_job, msg, route)

    async def _hand_back(self, msg: Msg) -> None:
        await msg.nak()
        self._sched.job_finished()

    async def _run_job(self, msg: Msg, route: str | None) -> None:
        ctx = self._context
        run = JobRun(ctx, msg, route)
        key = msg.reply or ""
        self.running[key] = run
        try:
            await run.run()
        except Exception:
            # The one place a job's unexpected failure is caught. It never reaches
            # the task group: dead_letter_bug logs NATS trouble instead of raising.
            rid = run.job.id if run.job is not None else "(not decoded)"
            log.exception("bug while running job %s; dead-lettering it", rid)
            await dead_letter_bug(ctx, run)
        finally:
            self.running.pop(key, None)
            self._sched.job_finished()

    # --- reconnects and housekeeping -----------------------------------------------------

    async def _on_reconnected(self) -> None:
        """Pulls do not survive a lost connection: free their slots and pull again."""
        lost = self._scheduler.forget_pulls() if self._scheduler is not None else 0
        log.warning("reconnected to NATS; re-issuing %d pulls", lost)
        self._spawn(self._reensure_topology)  # a brand-new server has no streams yet
        self._wake.set()

    async def _reensure_topology(self) -> None:
        """JetStream may take a moment after a restart; the memory KV is gone with it."""
        for delay_s in _TOPOLOGY_RETRY_S:
            try:
                with nats_errors("re-creating the topology"):
                    await ensure_topology(self.nc, self.config)
                self._wake.set()
                return
            except RelayError as exc:
                log.info("topology not ready after reconnect (%r); again in %gs", exc, delay_s)
                await anyio.sleep(delay_s)
        log.warning("could not re-create the topology after reconnecting")

    async def _housekeeping_loop(self) -> None:
        """In-progress acks for long streams; write off pulls the server forgot."""
        interval = min(1.0, self.pool.ack_wait_s / 6)
        while True:
            await anyio.sleep(interval)
            await self._touch_long_runs()
            if self._sched.write_off_stale():
                self._wake.set()

    async def _touch_long_runs(self) -> None:
        """Extend the ack deadline of runs that have not been touched for a third of it.

        A run whose lease already lapsed (this process was stopped or starved, or
        cut off from NATS, past its ack deadline) is not extended: the job may be
        with a redelivery by now. It is cancelled and ends without a word
        (``_delivery.Delivery``).
        """
        now = time.monotonic()
        for run in list(self.running.values()):
            delivery = run.delivery
            if now - delivery.last_progress < self.pool.ack_wait_s / 3 or not self.nc.is_connected:
                continue
            if not await delivery.touch():
                log.warning("attempt %d lost its lease; stopping it", delivery.attempt)
                run.cancel_scope.cancel()
