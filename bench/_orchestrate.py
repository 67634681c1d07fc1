"""Run a preset: start the processes, drive the load, gather every figure.

    report = anyio.run(run_preset, PRESETS["smoke"])

For each phase of a ``load`` preset the same load is sent twice from fresh
load-generator processes: straight at the fake provider (``direct``), then
through the broker; CPU and memory of every process (nats-server, workers,
providers, generators) are read from /proc over each side, connection reuse
from the workers' metrics and the provider's ``/stats``. A ``spike`` sends one
burst and samples queue depth and memory throughout. ``failover`` is in
``bench._failover``.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
from nats.aio.client import Client as NATS

from bench._cluster import Cluster, LoadProc, WorkerProc
from bench._loadgen import LoadResult, LoadSpec, Rec
from bench._procstat import MachineWatch, ProcUsage, ProcWatch
from bench._report import (
    BenchReport,
    Overhead,
    Reuse,
    RunResult,
    SideResult,
    machine_info,
    now_iso,
)
from bench._stats import summarize
from bench.presets import Phase, Preset
from broker._jsapi import consumer_info
from broker._server import CLIENT_USER, nats_server_binary
from broker._subjects import JOBS_STREAM, route_consumer

Log = Callable[[str], None]
SAMPLE_EVERY_S = 0.25
ROUTE = "chat"
MODEL = "gpt"
_REQUESTS_METRIC = "llmrelay_upstream_requests_total"
_OPENED_METRIC = "llmrelay_upstream_connections_opened_total"


def _stderr(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


# --- entry point ------------------------------------------------------------------------


async def run_preset(
    preset: Preset,
    *,
    command: str = "",
    log: Log = _stderr,
    keep_dir: Path | None = None,
    profile_dir: Path | None = None,
) -> BenchReport:
    """Run one preset end to end; every child process is gone when this returns or raises."""
    from bench._failover import failover_scenario

    scenarios: dict[str, Callable[[Cluster, Preset, Log], Awaitable[list[RunResult]]]] = {
        "load": load_scenario,
        "spike": load_scenario,
        "failover": failover_scenario,
    }
    t0 = time.monotonic()
    machine = machine_info(nats_server_binary())
    started = now_iso()
    with tempfile.TemporaryDirectory(prefix="llmrelay-bench-") as tmp:
        workdir = keep_dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(workdir)
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            cluster.profile_dir = profile_dir.resolve()
        try:
            runs = await _until_sigterm(scenarios[preset.scenario](cluster, preset, log))
        finally:
            cluster.close()  # synchronous: runs even while the loop is cancelled
    machine.loadavg_after = [round(x, 2) for x in os.getloadavg()]
    return BenchReport(
        preset=preset.name,
        description=preset.description,
        command=command,
        started_at=started,
        wall_s=round(time.monotonic() - t0, 1),
        machine=machine,
        settings=msgspec.to_builtins(preset),
        runs=runs,
    )


async def _until_sigterm(work: Awaitable[list[RunResult]]) -> list[RunResult]:
    """Run ``work``; SIGTERM cancels it (and clean-up runs) like Ctrl-C does."""
    result: list[RunResult] = []
    terminated = False

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal terminated
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                terminated = True
                scope.cancel()
                return

    async def main(tg: anyio.abc.TaskGroup) -> None:
        nonlocal result
        result = await work
        tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            tg.start_soon(main, tg)
    except BaseExceptionGroup as group:
        raise _sole(group) from None
    if terminated:
        raise KeyboardInterrupt("SIGTERM")
    return result


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside nested single-error groups (else the group itself)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


# --- configuration ------------------------------------------------------------------------


def pool_doc(url: str, slots: int, **settings: Any) -> dict[str, Any]:
    return {
        "kind": "openai",
        "base_url": f"{url}/v1",
        "api_key": "sk-bench",
        "concurrency": slots,
        "timeouts": {"connect_s": 5, "ttft_s": 60, "idle_s": 60},
        **settings,
    }


def config_doc(
    pools: dict[str, dict[str, Any]], targets: list[str], preset: Preset, **route: Any
) -> dict[str, Any]:
    return {
        "streams": {"queue_capacity": preset.queue_capacity},
        "pools": pools,
        "routes": {
            ROUTE: {
                "targets": [{"pool": p, "model": MODEL} for p in targets],
                "deadline_s": preset.deadline_s,
                **route,
            }
        },
    }


# --- the load scenario ------------------------------------------------------------------


async def load_scenario(cluster: Cluster, preset: Preset, log: Log) -> list[RunResult]:
    log(f"starting nats-server, fake provider, {preset.workers} worker(s)")
    cluster.start_nats()
    mock = cluster.start_mock("mock-a", preset.provider)
    pool = pool_doc(mock.url, preset.slots, rpm=preset.rpm)
    cluster.write_config(config_doc({"a": pool}, ["a"], preset))
    nc = await cluster.connect()
    try:
        workers = [cluster.start_worker("a", i) for i in range(preset.workers)]
        await cluster.wait_ready(nc, workers)
        for w in workers:
            cluster.profile(w)
        runs = []
        for phase in preset.phases:
            runs.append(await _load_phase(cluster, nc, preset, phase, log))
        return runs
    finally:
        await nc.close()


async def _load_phase(
    cluster: Cluster, nc: NATS, preset: Preset, phase: Phase, log: Log
) -> RunResult:
    direct = None
    if preset.direct:
        log(f"{phase.name}: direct to the fake provider")
        direct = (await Side(cluster, preset, phase, "direct").run()).result
    log(f"{phase.name}: through the broker")
    sampler = QueueSampler(nc) if preset.scenario == "spike" else None
    side = Side(cluster, preset, phase, "broker")
    broker = (await side.run(sampler)).result
    await cluster.purge_jobs(nc, ROUTE)
    extra: dict[str, Any] = {}
    if preset.memory_per_stream:
        extra["memory_per_stream"] = memory_per_stream(side)
    if sampler is not None:
        extra["spike"] = spike_figures(side, sampler, preset)
    return RunResult(
        name=phase.name,
        load=load_shape(preset, phase),
        broker=broker,
        direct=direct,
        overhead=overhead(broker, direct),
        extra=extra,
    )


def load_shape(preset: Preset, phase: Phase) -> dict[str, Any]:
    p = preset.provider
    shape: dict[str, Any] = {"mode": phase.mode}
    if phase.mode == "open":
        shape["rate"] = phase.rate
    else:
        shape["concurrency"] = phase.concurrency
    if phase.mode == "burst":
        shape["requests"] = phase.requests
    else:
        shape |= {"duration_s": phase.duration_s, "warmup_s": phase.warmup_s}
    return shape | {
        "tokens": p.tokens,
        "provider_ttft_ms": p.ttft_ms,
        "provider_token_delay_ms": p.token_delay_ms,
        "workers": preset.workers,
        "slots": preset.slots,
        "rpm": preset.rpm,
        "loadgen_procs": preset.loadgen_procs,
        "direct_loadgen_procs": preset.direct_loadgen_procs or preset.loadgen_procs,
    }


def overhead(broker: SideResult, direct: SideResult | None) -> Overhead | None:
    if direct is None or not broker.completed or not direct.completed:
        return None
    return Overhead(
        ttft_p50_ms=round(broker.ttft_ms.p50 - direct.ttft_ms.p50, 3),
        ttft_p99_ms=round(broker.ttft_ms.p99 - direct.ttft_ms.p99, 3),
        total_p50_ms=round(broker.total_ms.p50 - direct.total_ms.p50, 3),
        total_p99_ms=round(broker.total_ms.p99 - direct.total_ms.p99, 3),
    )


# --- one side of a phase -------------------------------------------------------------------


Sampler = Callable[[float], Awaitable[None]]


class QueueSampler:
    """Queue depth of the route's consumer over time: (seconds, waiting, delivered-unacked)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.timeline: list[tuple[float, int, int]] = []
        self._last = -1.0

    async def __call__(self, t: float) -> None:
        if t - self._last < 0.5:
            return
        self._last = t
        info = await consumer_info(self.nc, JOBS_STREAM, route_consumer(ROUTE))
        self.timeline.append((round(t, 2), int(info["num_pending"]), int(info["num_ack_pending"])))


class SideOutcome(msgspec.Struct):
    result: SideResult
    records: list[Rec]
    loadgen_results: list[LoadResult]


class Side:
    """One target (broker or direct) taking one phase's load from fresh generators."""

    def __init__(
        self,
        cluster: Cluster,
        preset: Preset,
        phase: Phase,
        target: str,
        *,
        workers: list[WorkerProc] | None = None,
    ) -> None:
        self.cluster = cluster
        self.preset = preset
        self.phase = phase
        self.target = target
        self.workers = cluster.workers if workers is None else workers
        self.watches: list[ProcWatch] = []
        self.t_begin = 0.0
        self.provider_stats: dict[str, dict[str, Any]] = {}
        self.outcome: SideOutcome | None = None
        self.procs: list[LoadProc] = []
        self._machine = MachineWatch()

    def specs(self) -> list[LoadSpec]:
        ph, pre = self.phase, self.preset
        n = max(1, pre.loadgen_procs)
        if self.target == "direct" and pre.direct_loadgen_procs:
            n = pre.direct_loadgen_procs
        mock = next(iter(self.cluster.mocks.values()))
        conns = max(1, pre.slots * pre.workers // n)
        assert self.cluster.nats is not None
        return [
            LoadSpec(
                target="broker" if self.target == "broker" else "direct",
                mode=ph.mode,
                rate=ph.rate / n,
                concurrency=_share(ph.concurrency, n, i),
                requests=_share(ph.requests, n, i),
                duration_s=ph.duration_s,
                warmup_s=ph.warmup_s,
                drain_s=pre.drain_s,
                nats_url=self.cluster.nats.url_for(CLIENT_USER),
                route=ROUTE,
                deadline_s=pre.deadline_s,
                provider_url=mock.url,
                model=MODEL,
                connections=conns,
                index=i,
            )
            for i in range(n)
        ]

    async def run(self, sampler: Sampler | None = None) -> SideOutcome:
        specs = self.specs()
        before = _worker_counters(self.workers) if self.target == "broker" else (0, 0)
        for mock in self.cluster.mocks.values():
            httpx.post(f"{mock.url}/control/reset").raise_for_status()
        procs = await anyio.to_thread.run_sync(self.cluster.start_loadgens, specs)
        self.procs = procs
        try:
            results = await self._drive(procs, sampler)
        finally:
            self.cluster.end_loadgens(procs)
        reported = {p.pid: (r.cpu_s, r.peak_rss_kb) for p, r in zip(procs, results, strict=True)}
        usage = [w.end(reported.get(w.pid)) for w in self.watches]
        machine_pct, steal_pct = self._machine.end()
        after = _worker_counters(self.workers) if self.target == "broker" else (0, 0)
        self.provider_stats = {n: m.stats() for n, m in self.cluster.mocks.items()}
        records = [r for res in results for r in res.records]
        warmup = sum(res.warmup_sent for res in results)
        for u in usage:
            u.cpu_ms_per_request = round(1000 * u.cpu_s / max(1, len(records) + warmup), 3)
        result = side_result(self.target, records, usage, machine_pct)
        result.warmup_sent = warmup
        result.steal_cpu_pct = steal_pct
        result.reuse = self._reuse(before, after)
        self.outcome = SideOutcome(result, records, results)
        return self.outcome

    async def _drive(self, procs: list[LoadProc], sampler: Sampler | None) -> list[LoadResult]:
        self.watches = self._watches(procs)
        for w in self.watches:
            w.begin()
        self._machine.begin()
        self.t_begin = time.monotonic()
        for p in procs:
            p.go()
        ph = self.phase
        timeout_s = ph.warmup_s + ph.duration_s + self.preset.drain_s + 60
        results: list[LoadResult | None] = [None] * len(procs)

        async def collect(i: int, p: LoadProc) -> None:
            results[i] = await anyio.to_thread.run_sync(p.result, timeout_s, abandon_on_cancel=True)

        async with anyio.create_task_group() as tg:
            for i, p in enumerate(procs):
                tg.start_soon(collect, i, p)
            while any(r is None for r in results):
                t = time.monotonic() - self.t_begin
                for w in self.watches:
                    w.sample()
                if sampler is not None:
                    await sampler(t)
                await anyio.sleep(SAMPLE_EVERY_S)
        return [r for r in results if r is not None]

    def _watches(self, procs: list[LoadProc]) -> list[ProcWatch]:
        c = self.cluster
        watches = [ProcWatch("orchestrator", "orchestrator", os.getpid())]
        if c.nats is not None and c.nats.pid is not None:
            watches.append(ProcWatch("nats-server", "nats", c.nats.pid))
        watches += [w.watch() for w in self.workers if w.proc.poll() is None]
        for name, mock in c.mocks.items():
            if mock.process is not None:
                watches.append(ProcWatch(name, "provider", mock.process.pid))
        return watches + [p.watch() for p in procs]

    def _reuse(self, before: tuple[int, int], after: tuple[int, int]) -> list[Reuse]:
        out = []
        if self.target == "broker" and self.workers:
            requests, opened = after[0] - before[0], after[1] - before[1]
            out.append(_reuse("worker-metrics", requests, opened))
        for name, stats in self.provider_stats.items():
            # The /stats request that read these figures opened one connection itself.
            opened = max(0, int(stats["connections"]) - 1)
            out.append(_reuse(f"provider-stats {name}", int(stats["requests"]), opened))
        return out


def _share(total: int, n: int, i: int) -> int:
    return total // n + (1 if i < total % n else 0)


def _reuse(source: str, requests: int, opened: int) -> Reuse:
    ratio = 1 - opened / requests if requests else 0.0
    return Reuse(
        source=source,
        requests=requests,
        connections_opened=opened,
        ratio=round(min(1.0, max(0.0, ratio)), 5),
    )


def _worker_counters(workers: list[WorkerProc]) -> tuple[int, int]:
    """(upstream requests, connections opened), summed over the live workers."""
    requests = opened = 0
    for w in workers:
        for key, value in w.metrics().items():
            if key.startswith(_REQUESTS_METRIC + "{"):
                requests += int(value)
            elif key.startswith(_OPENED_METRIC + "{"):
                opened += int(value)
    return requests, opened


def side_result(
    target: str, records: list[Rec], usage: list[ProcUsage], machine_pct: float
) -> SideResult:
    ok = [r for r in records if not r.code]
    codes = Counter(r.code for r in records if r.code)
    first_sent = min((r.sent for r in records), default=0.0)
    last_sent = max((r.sent for r in records), default=0.0)
    last_answer = max((r.sent + r.total_ms / 1000 for r in records), default=0.0)
    window = max(1e-9, last_answer - first_sent)
    send_window = last_sent - first_sent
    tokens = statistics.mode([r.chunks for r in ok]) if ok else 0
    ours = sum(u.cpu_pct for u in usage)
    return SideResult(
        target=target,
        sent=len(records),
        completed=len(ok),
        errors=len(records) - len(ok),
        errors_by_code=dict(codes),
        warmup_sent=0,
        incomplete_answers=sum(1 for r in ok if r.chunks != tokens),
        window_s=round(window, 3),
        send_rate=round((len(records) - 1) / send_window, 1) if send_window > 0 else 0.0,
        achieved_rate=round(len(ok) / window, 1) if records else 0.0,
        ttft_ms=summarize([r.ttft_ms for r in ok if r.ttft_ms >= 0]),
        total_ms=summarize([r.total_ms for r in ok]),
        send_lag_ms=summarize([r.lag_ms for r in records]),
        queued_ms=summarize([r.queued_ms for r in ok if r.queued_ms >= 0]),
        worker_ttft_ms=summarize([r.worker_ttft_ms for r in ok if r.worker_ttft_ms >= 0]),
        reuse=[],
        processes=usage,
        machine_cpu_pct=machine_pct,
        others_cpu_pct=round(max(0.0, machine_pct - ours), 1),
    )


# --- scenario figures -----------------------------------------------------------------------


def memory_per_stream(side: Side) -> dict[str, Any]:
    """Worker RSS idle vs. while the streams run, per concurrent stream."""
    watch = next((w for w in side.watches if w.role == "worker"), None)
    stats = next(iter(side.provider_stats.values()), {})
    streams = int(stats.get("peak_concurrency", 0)) or side.phase.concurrency
    if watch is None or len(watch.samples_kb) < 3:
        return {}
    samples = watch.samples_kb
    idle_kb = samples[0]
    middle = samples[len(samples) // 4 : 3 * len(samples) // 4] or samples
    loaded_kb = statistics.median(middle)
    assert side.outcome is not None
    usage = next(u for u in side.outcome.result.processes if u.pid == watch.pid)
    return {
        "concurrent_streams": streams,
        "worker_rss_idle_mb": round(idle_kb / 1024, 1),
        "worker_rss_loaded_mb": round(loaded_kb / 1024, 1),
        "worker_peak_rss_mb": usage.peak_rss_mb,
        "kb_per_stream": round((loaded_kb - idle_kb) / max(1, streams), 1),
        "target_peak_rss_mb": 150,
    }


def spike_figures(side: Side, sampler: QueueSampler, preset: Preset) -> dict[str, Any]:
    assert side.outcome is not None
    records = side.outcome.records
    ok = [r for r in records if not r.code]
    first_sent = min((r.sent for r in records), default=0.0)
    last_sent = max((r.sent for r in records), default=0.0)
    answers = sorted(r.sent + r.total_ms / 1000 for r in ok)
    drain_rate = (len(answers) - 1) / (answers[-1] - answers[0]) if len(answers) > 1 else 0.0
    depth = [pending + unacked for _, pending, unacked in sampler.timeline]
    rss = {
        w.name: [round(min(w.samples_kb) / 1024, 1), round(max(w.samples_kb) / 1024, 1)]
        for w in side.watches
        if w.samples_kb
    }
    return {
        "jobs": len(records),
        "queue_capacity": preset.queue_capacity,
        "rate_limit_per_s": round(preset.rpm / 60, 1),
        "submit_s": round(last_sent - first_sent, 2),
        "drain_s": round((answers[-1] - first_sent) if answers else 0.0, 2),
        "drain_rate_per_s": round(drain_rate, 1),
        "max_queue_depth": max(depth, default=0),
        "lost": len(records) - len(ok),
        "rss_mb_min_max": rss,
        "depth_timeline": [list(x) for x in sampler.timeline],
    }
