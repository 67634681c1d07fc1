"""The failover scenario: how fast a job moves to the backup pool.

Route ``chat`` = pool ``primary`` (rank 0), then pool ``backup`` (rank 1), one
worker each, each with its own fake provider. Three runs, one after another:

1. ``baseline``: requests one at a time, primary healthy: the normal time to
   first token through the broker, for comparison.
2. ``503->backup``: the primary's provider answers 503 at once (fault
   ``status=503``), the pool has ``max_retries: 0`` and a circuit breaker that
   never opens (so every job really calls upstream). One request at a time, so
   the provider's request log pairs with the requests in order: the latency is
   from the 503 (the provider's log timestamp) to the client receiving the
   backup's first chunk. Cross-checked against ``Done.attempts[0].at_ms`` (when
   the primary worker recorded the failure, millisecond resolution) and against
   the client's time to first token minus the baseline's.
3. ``sigkill``: jobs flow at ``kill_rate``; the primary worker is killed with
   SIGKILL ``trials`` times (restarted in between). The latency of one trial is
   from the kill to the first chunk any client receives from the backup. With
   arrivals every 1/rate seconds, up to that gap is waiting for the next job.
   A job the primary held when it died is redelivered after ``ack_wait_s`` (2 s
   here); it is counted as ``stranded``, and nothing may be lost.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS

from bench._cluster import Cluster, WorkerProc
from bench._loadgen import Rec
from bench._report import RunResult
from bench._scenario import Log, Side, bench_config, load_shape
from bench._stats import summarize
from bench.presets import Phase, Preset

ACK_WAIT_S = 2.0
NEVER_OPEN = {"consecutive_failures": 1_000_000, "min_requests": 1_000_000}
SETTLE_S = 0.5  # after a restart: pulls in place, jobs back on the primary
OBSERVE_S = 0.5  # after a kill: time for the backup to take over


async def failover_scenario(cluster: Cluster, preset: Preset, log: Log) -> list[RunResult]:
    log("starting nats-server, two fake providers, a primary and a backup worker")
    cluster.start_nats()
    primary = cluster.start_provider("mock-primary", preset.provider)
    backup = cluster.start_provider("mock-backup", preset.provider)
    settings: dict[str, dict[str, Any]] = {
        "primary": {"max_retries": 0, "ack_wait_s": ACK_WAIT_S, "circuit": NEVER_OPEN},
        "backup": {"ack_wait_s": ACK_WAIT_S},
    }
    urls = {"primary": primary.url, "backup": backup.url}
    cluster.write_config(bench_config(preset, urls, settings))
    nc = await cluster.connect()
    try:
        first = cluster.start_worker("primary", 0)
        second = cluster.start_worker("backup", 0)
        await cluster.wait_ready(nc, [first, second])
        log("failover: baseline, primary healthy")
        base = await _sequential(cluster, preset, "baseline")
        primary.set_fault("status=503")
        log("failover: primary answers 503")
        requeue = await _requeue_run(cluster, preset, base)
        primary.set_fault(None)
        log(f"failover: {preset.trials} SIGKILLs of the primary worker")
        kill = await _sigkill_run(cluster, nc, preset, first, second, log)
        return [base, requeue, kill]
    finally:
        await nc.close()


def _sequential_phase(preset: Preset, name: str) -> Phase:
    return Phase(
        name=name,
        mode="closed",
        concurrency=1,
        requests=preset.requests,
        duration_s=600,
        warmup_s=0.3,
    )


async def _sequential(cluster: Cluster, preset: Preset, name: str) -> RunResult:
    phase = _sequential_phase(preset, name)
    pre = _one_at_a_time(preset)
    side = Side(cluster, pre, phase, "broker")
    outcome = await side.run()
    load = load_shape(pre, phase) | {"requests": preset.requests}
    return RunResult(name=name, load=load, broker=outcome.result)


def _one_at_a_time(preset: Preset) -> Preset:
    return msgspec.structs.replace(preset, loadgen_procs=1)


async def _requeue_run(cluster: Cluster, preset: Preset, base: RunResult) -> RunResult:
    phase = _sequential_phase(preset, "503->backup")
    pre = _one_at_a_time(preset)
    side = Side(cluster, pre, phase, "broker")
    outcome = await side.run()
    log_times = sorted(e["t"] for e in side.provider_stats.get("mock-primary", {}).get("log", []))
    warmup = sum(r.warmup_sent for r in outcome.loadgen_results)
    records = sorted(outcome.records, key=lambda r: r.sent)
    extra = requeue_figures(records, log_times[warmup:], base)
    return RunResult(
        name="503->backup",
        load=load_shape(pre, phase) | {"requests": preset.requests, "primary_fault": "status=503"},
        broker=outcome.result,
        extra={"requeue_503": extra},
    )


def requeue_figures(records: list[Rec], log_times: list[float], base: RunResult) -> dict[str, Any]:
    """From each request's 503 to its first chunk from the backup (ms)."""
    paired = len(records) == len(log_times)
    from_log = [
        (_first_chunk_s(r) - t) * 1000
        for r, t in zip(records, log_times, strict=False)
        if r.ttft_ms >= 0
    ]
    from_attempt = [
        _first_chunk_s(r) * 1000 - r.failed_at_ms
        for r in records
        if r.failed_at_ms and r.ttft_ms >= 0
    ]
    latency = summarize(from_log if paired else from_attempt)
    broker = base.broker
    failover_ttft = summarize([r.ttft_ms for r in records if r.ttft_ms >= 0])
    return {
        "method": "provider log" if paired else "Done.attempts at_ms (log did not pair)",
        "served_by_backup": sum(1 for r in records if r.pool == "backup"),
        "samples": latency.n,
        "p50_ms": latency.p50,
        "p90_ms": latency.p90,
        "p99_ms": latency.p99,
        "max_ms": latency.max,
        "target_p99_ms": 100,
        "cross_check_from_worker_record_ms": msgspec.to_builtins(summarize(from_attempt)),
        "client_ttft_minus_baseline_ms": {
            "p50": round(failover_ttft.p50 - broker.ttft_ms.p50, 3) if broker else None,
            "p99": round(failover_ttft.p99 - broker.ttft_ms.p99, 3) if broker else None,
        },
    }


def _first_chunk_s(r: Rec) -> float:
    return r.sent + r.ttft_ms / 1000


# --- SIGKILL of the primary worker -----------------------------------------------------


async def _sigkill_run(
    cluster: Cluster, nc: NATS, preset: Preset, primary: WorkerProc, backup: WorkerProc, log: Log
) -> RunResult:
    phase = Phase(name="sigkill", mode="open", rate=preset.kill_rate, duration_s=3600, warmup_s=1.0)
    pre = _one_at_a_time(preset)
    # Only the backup worker is watched and counted: the primary is killed and replaced.
    side = Side(cluster, pre, phase, "broker", workers=[backup])
    kills: list[float] = []

    async def kill_loop() -> None:
        nonlocal primary
        while not side.procs or not side.t_begin:
            await anyio.sleep(0.05)
        await anyio.sleep(phase.warmup_s + SETTLE_S)
        for k in range(preset.trials):
            kills.append(time.time())
            primary.kill()
            cluster.drop_worker(primary)
            await anyio.sleep(OBSERVE_S)
            primary = cluster.start_worker("primary", k + 1)
            await cluster.wait_ready(nc, [primary])
            await anyio.sleep(SETTLE_S)
            log(f"failover: trial {k + 1}/{preset.trials} done")
        for p in side.procs:
            p.stop_sending()

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_loop)
        outcome = await side.run()
    return RunResult(
        name="sigkill",
        load=load_shape(pre, phase)
        | {"trials": preset.trials, "ack_wait_s": ACK_WAIT_S, "duration_s": "until the trials end"},
        broker=outcome.result,
        extra={"sigkill": sigkill_figures(outcome.records, kills, preset)},
    )


def sigkill_figures(records: list[Rec], kills: list[float], preset: Preset) -> dict[str, Any]:
    served = sorted(_first_chunk_s(r) for r in records if r.pool == "backup" and r.ttft_ms >= 0)
    bounds = [*kills[1:], float("inf")]
    gaps: list[float] = []
    for t_kill, t_next in zip(kills, bounds, strict=True):
        after = next((t for t in served if t_kill <= t < t_next), None)
        if after is not None:
            gaps.append((after - t_kill) * 1000)
    before = [r for r in records if kills and r.sent < kills[0]]
    latency = summarize(gaps)
    return {
        "trials": len(kills),
        "trials_with_backup_answer": len(gaps),
        "p50_ms": latency.p50,
        "p90_ms": latency.p90,
        "p99_ms": latency.p99,
        "max_ms": latency.max,
        "target_p99_ms": 20,
        "arrival_gap_ms": round(1000 / preset.kill_rate, 2),
        "backup_share_before_first_kill": round(
            sum(1 for r in before if r.pool == "backup") / max(1, len(before)), 4
        ),
        "stranded_then_redelivered": sum(
            1 for r in records if not r.code and r.total_ms > ACK_WAIT_S * 1000 * 0.9
        ),
        "lost": sum(1 for r in records if r.code),
        "gaps_ms": [round(g, 2) for g in gaps],
    }
