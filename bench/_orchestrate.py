"""Run a preset: start the processes, drive the load, gather every figure.

    report = anyio.run(run_preset, PRESETS["smoke"])

For each phase of a ``load`` preset the same load is sent twice from fresh
load-generator processes: straight at the fake provider (``direct``), then
through the broker; CPU and memory of every process (nats-server, workers,
providers, generators) are read from /proc over each side, connection reuse
from the workers' metrics and the provider's ``/stats``. A ``spike`` sends one
burst and samples queue depth and memory throughout. A ``gateway`` preset is a
load preset whose broker side is streamed HTTP to an ``llmrelay gateway``
process in front of the workers. ``failover`` is in
``bench._failover``; what the scenarios share (the config, ``Side``) is in
``bench._scenario``, which both import.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS

from bench._cluster import Cluster
from bench._failover import failover_scenario
from bench._loadgen import Target
from bench._report import BenchReport, RunResult, machine_info, now_iso
from bench._scenario import GATEWAY_KEY, ROUTE, Log, Side, bench_config, load_shape, overhead
from bench.presets import Phase, Preset
from broker._cluster import node_name
from broker._jsapi import consumer_info
from broker._server import free_port, nats_server_binary
from broker._subjects import JOBS_STREAM, route_consumer
from devstack import GatewayProcess

__all__ = ["QueueSampler", "load_scenario", "run_preset"]

Scenario = Callable[[Cluster, Preset, Log], Awaitable[list[RunResult]]]


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
    nats_nodes: int = 1,
    nats_conf: Path | None = None,
) -> BenchReport:
    """Run one preset end to end; every child process is gone when this returns or raises.

    ``nats_nodes=3``: against a local 3-node cluster with ``streams.replicas: 3``;
    ``nats_conf``: the nats-server config file (default nats.conf / nats-cluster.conf).
    """
    scenarios: dict[str, Scenario] = {
        "load": load_scenario,
        "spike": load_scenario,
        "failover": failover_scenario,
        "gateway": load_scenario,
    }
    t0 = time.monotonic()
    machine = machine_info(nats_server_binary())
    started = now_iso()
    with tempfile.TemporaryDirectory(prefix="llmrelay-bench-") as tmp:
        workdir = keep_dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(workdir, nats_nodes=nats_nodes, nats_conf=nats_conf)
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
        settings=msgspec.to_builtins(preset) | _nats_settings(nats_nodes, nats_conf),
        runs=runs,
        notes=_nats_notes(nats_nodes),
    )


def _nats_settings(nodes: int, conf: Path | None) -> dict[str, Any]:
    """What the broker side ran on: nats-server nodes, the streams' replicas, the config."""
    return {"nats_nodes": nodes, "replicas": nodes, "nats_conf": str(conf or "")}


def _nats_notes(nodes: int) -> list[str]:
    if nodes == 1:
        return []
    names = ", ".join(f"nats-server-{node_name(i)}" for i in range(nodes))
    return [
        f"broker side on a local {nodes}-node JetStream cluster, streams.replicas {nodes}; "
        f"nats-server CPU is that of {names} together"
    ]


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


# --- the load scenario ------------------------------------------------------------------


async def load_scenario(cluster: Cluster, preset: Preset, log: Log) -> list[RunResult]:
    servers = f"{cluster.nats_nodes} nats-server nodes (R{cluster.nats_nodes})"
    log(f"starting {servers if cluster.nats else 'nats-server'}, fake provider, "
        f"{preset.workers} worker(s)")  # fmt: skip
    cluster.start_nats()
    mock = cluster.start_provider("mock-a", preset.provider)
    doc = bench_config(preset, {"a": mock.url}, {"a": {"rpm": preset.rpm}})
    gateway_port = free_port()
    if preset.scenario == "gateway":  # the broker side is an llmrelay gateway's HTTP clients
        doc = doc.gateway(port=gateway_port, api_keys=[GATEWAY_KEY])
    cluster.write_config(doc)
    nc = await cluster.connect()
    try:
        workers = [cluster.start_worker("a", i) for i in range(preset.workers)]
        await cluster.wait_ready(nc, workers)
        if preset.scenario == "gateway":
            log("starting the gateway")
            await _start_gateway(cluster, gateway_port)
        for w in workers:
            cluster.profile(w)
        runs = []
        for phase in preset.phases:
            runs.append(await _load_phase(cluster, nc, preset, phase, log))
        return runs
    finally:
        await nc.close()


async def _start_gateway(cluster: Cluster, port: int) -> None:
    gateway = GatewayProcess(cluster.config_path, cluster.client_url, cluster.work_dir, port=port)
    await cluster.add_gateway(gateway).wait_ready()
    cluster.profile(gateway)


async def _load_phase(
    cluster: Cluster, nc: NATS, preset: Preset, phase: Phase, log: Log
) -> RunResult:
    direct = None
    if preset.direct:
        log(f"{phase.name}: direct to the fake provider")
        direct = (await Side(cluster, preset, phase, "direct").run()).result
    target: Target = "gateway" if preset.scenario == "gateway" else "broker"
    log(f"{phase.name}: through the {target}")
    sampler = QueueSampler(nc) if preset.scenario == "spike" else None
    side = Side(cluster, preset, phase, target)
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


# --- the spike scenario's queue sampler ---------------------------------------------------


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
