"""What every bench scenario shares: the route, the config it writes, one side of a phase.

A scenario (``_orchestrate``'s load and spike, ``_failover``'s failover) starts
its processes in a ``Cluster``, writes ``bench_config`` for route ``chat``, and
drives load at one target, the broker or the fake provider directly, as a
``Side``: fresh load-generator processes, CPU and memory of every process from
/proc, connection reuse from the workers' metrics and the provider's ``/stats``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx
import msgspec

from bench._cluster import Cluster, LoadProc, WorkerProc
from bench._loadgen import LoadResult, LoadSpec, Rec, Target
from bench._procstat import MachineWatch, ProcUsage, ProcWatch
from bench._report import Overhead, Reuse, SideResult
from bench._stats import summarize
from bench.presets import Phase, Preset
from devstack import ConfigDoc

__all__ = [
    "MODEL",
    "ROUTE",
    "Log",
    "Sampler",
    "Side",
    "SideOutcome",
    "bench_config",
    "load_shape",
    "overhead",
    "side_result",
]

Log = Callable[[str], None]
SAMPLE_EVERY_S = 0.25
ROUTE = "chat"
MODEL = "gpt"
_REQUESTS_METRIC = "llmrelay_upstream_requests_total"
_OPENED_METRIC = "llmrelay_upstream_connections_opened_total"
GATEWAY_KEY = "sk-bench-gateway"  # the gateway scenario's API key
_TIMEOUTS = {"connect_s": 5, "ttft_s": 60, "idle_s": 60}


# --- configuration ------------------------------------------------------------------------


def bench_config(
    preset: Preset,
    urls: Mapping[str, str],
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> ConfigDoc:
    """Route ``chat`` over the pools of ``urls`` (fake-provider URLs) in rank order.

    Each pool gets the preset's slots and lenient timeouts, plus its own
    ``settings`` (e.g. ``{"a": {"rpm": 600}}``).
    """
    doc = ConfigDoc().streams(queue_capacity=preset.queue_capacity)
    for name, url in urls.items():
        extra = (settings or {}).get(name, {})
        doc.pool(
            name, base_url=f"{url}/v1", api_key="sk-bench",
            concurrency=preset.slots, timeouts=_TIMEOUTS, **extra,
        )  # fmt: skip
    return doc.route(ROUTE, [(name, MODEL) for name in urls], deadline_s=preset.deadline_s)


def load_shape(preset: Preset, phase: Phase) -> dict[str, Any]:
    """The load a run was under, as the report shows it."""
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


# --- one side of a phase -------------------------------------------------------------------


Sampler = Callable[[float], Awaitable[None]]


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
        target: Target,
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
        gw = self.cluster.gateways[0] if self.target == "gateway" else None
        return [
            LoadSpec(
                target=self.target,
                mode=ph.mode,
                rate=ph.rate / n,
                concurrency=_share(ph.concurrency, n, i),
                requests=_share(ph.requests, n, i),
                duration_s=ph.duration_s,
                warmup_s=ph.warmup_s,
                drain_s=pre.drain_s,
                nats_url=self.cluster.client_url,
                route=ROUTE,
                deadline_s=pre.deadline_s,
                provider_url=mock.url,
                model=MODEL,
                connections=conns,
                gateway_url=f"{gw.url}/v1" if gw else "",
                api_key=GATEWAY_KEY if gw else "",
                index=i,
            )
            for i in range(n)
        ]

    async def run(self, sampler: Sampler | None = None) -> SideOutcome:
        specs = self.specs()
        via_workers = self.target != "direct"
        before = _worker_counters(self.workers) if via_workers else (0, 0)
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
        after = _worker_counters(self.workers) if via_workers else (0, 0)
        self.provider_stats = {n: m.stats() for n, m in self.cluster.mocks.items()}
        records = [r for res in results for r in res.records]
        warmup = sum(res.warmup_sent for res in results)
        chunks = (len(records) + warmup) * self.preset.provider.tokens
        for u in usage:
            u.cpu_ms_per_request = round(1000 * u.cpu_s / max(1, len(records) + warmup), 3)
            u.cpu_us_per_chunk = round(1e6 * u.cpu_s / max(1, chunks), 2)
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
        watches += c.nats_watches()  # every node of a cluster
        watches += [w.watch() for w in self.workers if w.proc.poll() is None]
        if self.target == "gateway":
            watches += [ProcWatch(g.name, "gateway", g.pid) for g in c.gateways]
        for name, mock in c.mocks.items():
            if mock.process is not None:
                watches.append(ProcWatch(name, "provider", mock.process.pid))
        return watches + [p.watch() for p in procs]

    def _reuse(self, before: tuple[int, int], after: tuple[int, int]) -> list[Reuse]:
        out = []
        if self.target != "direct" and self.workers:
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


def overhead(broker: SideResult, direct: SideResult | None) -> Overhead | None:
    if direct is None or not broker.completed or not direct.completed:
        return None
    return Overhead(
        ttft_p50_ms=round(broker.ttft_ms.p50 - direct.ttft_ms.p50, 3),
        ttft_p99_ms=round(broker.ttft_ms.p99 - direct.ttft_ms.p99, 3),
        total_p50_ms=round(broker.total_ms.p50 - direct.total_ms.p50, 3),
        total_p99_ms=round(broker.total_ms.p99 - direct.total_ms.p99, 3),
    )


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
    # An answer's length, not its chunk count, says whether it came whole: tokens that
    # arrive in one read are one chunk.
    length = statistics.mode([r.chars for r in ok]) if ok else 0
    ours = sum(u.cpu_pct for u in usage)
    return SideResult(
        target=target,
        sent=len(records),
        completed=len(ok),
        errors=len(records) - len(ok),
        errors_by_code=dict(codes),
        warmup_sent=0,
        incomplete_answers=sum(1 for r in ok if r.chars != length),
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
