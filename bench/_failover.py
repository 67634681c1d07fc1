"""The failover scenario: how fast a job moves to the backup pool, and what the caller waits.

Route ``chat`` = pool ``primary`` (rank 0), then pool ``backup`` (rank 1), one
worker each, each with its own fake provider (the preset's answer length and
timing). The primary's circuit breaker never opens, so every job of the fault
runs really calls the failing provider and fails over. Five runs, one after
another:

1. ``baseline``: requests one at a time, primary healthy: the time to first
   token, the total time and the longest gap between two chunks of an
   undisturbed request, for comparison.
2. ``503->backup``: the primary's provider answers 503 at once (fault
   ``status=503``); with the default route settings (``retry_before_failover:
   1``) the primary worker retries once at once, then re-queues the job to the
   backup. One request at a time, so the provider's request log falls into each
   request's window: the latency is from the request's first (and from its last)
   503 (the provider's log timestamps) to the client receiving the backup's first
   chunk. Cross-checked against ``Done.attempts[0].at_ms`` (when the primary
   worker recorded the first failure, millisecond resolution).
3. ``baseline@Dms/token``: as 1, with both providers sending their tokens
   ``cut_token_delay_ms`` apart (fault ``token_delay_ms=D``), so that a cut lands
   in the middle of an answer the caller is reading; the baseline of run 4.
4. ``cut->backup``: with that timing, the primary's provider streams about half
   the answer, then closes the connection without ending it (fault ``cut=N``);
   the job is re-queued to the backup with the text so far, and the backup
   continues it (assistant prefill). The caller keeps its text
   (``Notice(resume=True)``), so a complete answer is exactly the primary's
   full answer.
5. ``sigkill``: jobs flow at ``kill_rate``; the primary worker is killed with
   SIGKILL ``trials`` times (restarted in between). The latency of one trial is
   from the kill to the first chunk any client receives from the backup. With
   arrivals every 1/rate seconds, up to that gap is waiting for the next job.
   A job the primary held when it died is redelivered after ``ack_wait_s`` (2 s
   here); it is counted as ``stranded``, and nothing may be lost.

For runs 2 and 4, "the time the caller waits beyond an undisturbed request" is
``ttft_minus_baseline_ms`` and ``total_minus_baseline_ms``: a percentile of the
run minus the same percentile of its baseline (1, resp. 3; requests are not paired),
p50 and p99; for the cut also ``max_gap_ms`` against the baseline's. An answer
is ``complete`` when it has the full expected length; ``lost`` ended in an error.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS

from bench._cluster import Cluster, WorkerProc
from bench._loadgen import Rec
from bench._report import RunResult
from bench._scenario import Log, Side, bench_config, load_shape
from bench._stats import Summary, summarize
from bench.presets import Phase, Preset
from devstack import expected_answer

ACK_WAIT_S = 2.0
NEVER_OPEN = {"consecutive_failures": 1_000_000, "min_requests": 1_000_000}
SETTLE_S = 0.5  # after a restart: pulls in place, jobs back on the primary
OBSERVE_S = 0.5  # after a kill: time for the backup to take over
PRIMARY, BACKUP = "mock-primary", "mock-backup"


async def failover_scenario(cluster: Cluster, preset: Preset, log: Log) -> list[RunResult]:
    log("starting nats-server, two fake providers, a primary and a backup worker")
    cluster.start_nats()
    primary = cluster.start_provider(PRIMARY, preset.provider)
    backup = cluster.start_provider(BACKUP, preset.provider)
    settings: dict[str, dict[str, Any]] = {
        "primary": {"ack_wait_s": ACK_WAIT_S, "circuit": NEVER_OPEN},
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
        base, base_records = await _baseline(cluster, preset, "baseline")
        primary.set_fault("status=503")
        log("failover: primary answers 503")
        requeue = await _requeue_run(cluster, preset, base_records)
        delay = f"token_delay_ms={preset.cut_token_delay_ms:g}"
        primary.set_fault(delay)
        backup.set_fault(delay)
        log(f"failover: baseline with tokens {preset.cut_token_delay_ms:g} ms apart")
        slow_base, slow_records = await _baseline(
            cluster, preset, f"baseline@{preset.cut_token_delay_ms:g}ms/token", delay
        )
        cut = cut_tokens(preset)
        primary.set_fault(f"cut={cut}+{delay}")
        log(f"failover: primary's stream is cut after {cut} of {preset.provider.tokens} tokens")
        midstream = await _cut_run(cluster, preset, slow_records, cut, delay)
        primary.set_fault(None)
        backup.set_fault(None)
        log(f"failover: {preset.trials} SIGKILLs of the primary worker")
        kill = await _sigkill_run(cluster, nc, preset, first, second, log)
        return [base, requeue, slow_base, midstream, kill]
    finally:
        await nc.close()


def cut_tokens(preset: Preset) -> int:
    """Where the primary's stream is cut: after about half the answer's tokens."""
    return max(1, preset.provider.tokens // 2)


def _sequential_phase(preset: Preset, name: str) -> Phase:
    return Phase(
        name=name,
        mode="closed",
        concurrency=1,
        requests=preset.requests,
        duration_s=600,
        warmup_s=0.3,
    )


async def _sequential(
    cluster: Cluster, preset: Preset, name: str, **load: Any
) -> tuple[RunResult, Side, list[Rec]]:
    """``preset.requests`` requests one at a time; the result, its side and its records."""
    phase = _sequential_phase(preset, name)
    pre = _one_at_a_time(preset)
    side = Side(cluster, pre, phase, "broker")
    outcome = await side.run()
    shape = load_shape(pre, phase) | {"requests": preset.requests} | load
    records = sorted(outcome.records, key=lambda r: r.sent)
    return RunResult(name=name, load=shape, broker=outcome.result), side, records


def _one_at_a_time(preset: Preset) -> Preset:
    return msgspec.structs.replace(preset, loadgen_procs=1)


def _chars(name: str, preset: Preset) -> int:
    return len(expected_answer(name, preset.provider.tokens))


async def _baseline(
    cluster: Cluster, preset: Preset, name: str, fault: str = ""
) -> tuple[RunResult, list[Rec]]:
    load = {"providers_fault": fault} if fault else {}
    run, _, records = await _sequential(cluster, preset, name, **load)
    run.extra = {"answers": answer_figures(records, _chars(PRIMARY, preset))}
    return run, records


def answer_figures(records: list[Rec], expected_chars: int) -> dict[str, Any]:
    """Whole answers and the longest stall inside them."""
    ok = [r for r in records if not r.code]
    return {
        "expected_chars": expected_chars,
        "complete": sum(1 for r in ok if r.chars == expected_chars),
        "lost": len(records) - len(ok),
        "max_gap_ms": msgspec.to_builtins(summarize([r.max_gap_ms for r in ok])),
    }


def extra_wait(records: list[Rec], base: list[Rec]) -> dict[str, dict[str, float | None]]:
    """The time the caller waits beyond an undisturbed request, at p50 and p99.

    A percentile of the run minus the same percentile of the baseline (completed
    requests; not paired request by request, so not a per-request delay).
    """
    ok, base_ok = [r for r in records if not r.code], [r for r in base if not r.code]
    return {
        "ttft_minus_baseline_ms": _minus(
            summarize([r.ttft_ms for r in ok if r.ttft_ms >= 0]),
            summarize([r.ttft_ms for r in base_ok if r.ttft_ms >= 0]),
        ),
        "total_minus_baseline_ms": _minus(
            summarize([r.total_ms for r in ok]), summarize([r.total_ms for r in base_ok])
        ),
    }


def _minus(run: Summary, base: Summary) -> dict[str, float | None]:
    if not run.n or not base.n:
        return {"p50": None, "p99": None}
    return {"p50": round(run.p50 - base.p50, 3), "p99": round(run.p99 - base.p99, 3)}


# --- 503 of the primary's provider -------------------------------------------------------


async def _requeue_run(cluster: Cluster, preset: Preset, base: list[Rec]) -> RunResult:
    run, side, records = await _sequential(
        cluster, preset, "503->backup", primary_fault="status=503"
    )
    log = side.provider_stats.get(PRIMARY, {}).get("log", [])
    log_times = sorted(e["t"] for e in log)
    run.extra = {"requeue_503": requeue_figures(records, log_times, base, _chars(BACKUP, preset))}
    return run


def requeue_figures(
    records: list[Rec], log_times: list[float], base: list[Rec], expected_chars: int
) -> dict[str, Any]:
    """From each request's 503s (the primary provider's log) to its first chunk from the backup.

    Requests ran one at a time, so the 503s of a request are the log entries
    between its send and its first chunk (warm-up requests fall outside every
    window); with ``retry_before_failover`` there are two.
    """
    from_first: list[float] = []
    from_last: list[float] = []
    calls: list[int] = []
    answered = [r for r in records if r.ttft_ms >= 0]
    for r in answered:
        first_chunk = _first_chunk_s(r)
        lo = bisect.bisect_left(log_times, r.sent)
        hi = bisect.bisect_right(log_times, first_chunk)
        if hi > lo:
            from_first.append((first_chunk - log_times[lo]) * 1000)
            from_last.append((first_chunk - log_times[hi - 1]) * 1000)
            calls.append(hi - lo)
    paired = bool(answered) and len(from_first) == len(answered)
    from_attempt = [
        _first_chunk_s(r) * 1000 - r.failed_at_ms
        for r in records
        if r.failed_at_ms and r.ttft_ms >= 0
    ]
    latency = summarize(from_first if paired else from_attempt)
    return {
        "method": "provider log" if paired else "Done.attempts at_ms (log did not pair)",
        "served_by_backup": sum(1 for r in records if r.pool == "backup"),
        "samples": latency.n,
        "p50_ms": latency.p50,
        "p90_ms": latency.p90,
        "p99_ms": latency.p99,
        "max_ms": latency.max,
        "target_p99_ms": 100,
        "from_last_503_ms": msgspec.to_builtins(summarize(from_last)),
        "primary_calls_per_request": _histogram(calls),
        "failed_attempts_per_request": _histogram(
            [r.failed_attempts for r in records if not r.code]
        ),
        "cross_check_from_worker_record_ms": msgspec.to_builtins(summarize(from_attempt)),
        **extra_wait(records, base),
        **answer_figures(records, expected_chars),
    }


def _histogram(values: list[int]) -> dict[str, int]:
    return {str(v): values.count(v) for v in sorted(set(values))}


def _first_chunk_s(r: Rec) -> float:
    return r.sent + r.ttft_ms / 1000


# --- the primary's stream cut in the middle of the answer -----------------------------


async def _cut_run(
    cluster: Cluster, preset: Preset, base: list[Rec], cut: int, delay: str
) -> RunResult:
    run, _, records = await _sequential(
        cluster, preset, "cut->backup", primary_fault=f"cut={cut}+{delay}", backup_fault=delay
    )
    run.extra = {"cut": cut_figures(records, base, _chars(PRIMARY, preset), cut)}
    return run


def cut_figures(
    records: list[Rec], base: list[Rec], expected_chars: int, cut: int
) -> dict[str, Any]:
    """What a caller whose stream broke after ``cut`` tokens waited, against the baseline."""
    ok, base_ok = [r for r in records if not r.code], [r for r in base if not r.code]
    gap, base_gap = (summarize([r.max_gap_ms for r in rs]) for rs in (ok, base_ok))
    return {
        "cut_after_tokens": cut,
        "continued_by_backup": sum(1 for r in ok if r.pool == "backup" and r.failed_attempts),
        **extra_wait(records, base),
        "max_gap_ms": {"p50": gap.p50, "p99": gap.p99, "max": gap.max},
        "baseline_max_gap_ms": {"p50": base_gap.p50, "p99": base_gap.p99, "max": base_gap.max},
        "max_gap_minus_baseline_ms": _minus(gap, base_gap),
        "expected_chars": expected_chars,
        "complete": sum(1 for r in ok if r.chars == expected_chars),
        "lost": len(records) - len(ok),
    }


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
