"""What a benchmark run reports: the structs behind ``--json``, and the text tables.

One ``BenchReport`` per invocation: the machine (and how loaded it was), the
preset's settings, and one ``RunResult`` per phase. A run's ``broker`` and
``direct`` sides carry the same figures (sent, completed, errors, rates,
percentiles, connection reuse, per-process CPU and memory); ``overhead`` is
broker minus direct at p50 and p99. Scenario-specific figures (queue depth,
failover latency, memory per stream) are in ``extra``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec

from bench._procstat import ProcUsage
from bench._stats import Summary


class Reuse(msgspec.Struct, kw_only=True):
    """Upstream connection reuse: the share of requests that opened no new connection."""

    source: str  # "worker-metrics" or "provider-stats"
    requests: int
    connections_opened: int
    ratio: float


class SideResult(msgspec.Struct, kw_only=True):
    target: str  # broker | direct
    sent: int
    completed: int
    errors: int
    errors_by_code: dict[str, int]
    warmup_sent: int  # sent before the measured window (not in the figures below)
    incomplete_answers: int  # completed, but shorter or longer than the usual answer
    window_s: float  # first measured send -> last answer
    send_rate: float  # requests sent per second over the sending window
    achieved_rate: float  # completed per second over the whole window
    ttft_ms: Summary
    total_ms: Summary
    send_lag_ms: Summary  # open loop: how late sends were against their schedule
    # broker only, from Done.timings: where the time to first token went
    queued_ms: Summary  # submit -> a worker starts the job (publish, queue, pull)
    worker_ttft_ms: Summary  # job start -> first upstream token (HTTP to the provider)
    reuse: list[Reuse]
    processes: list[ProcUsage]
    machine_cpu_pct: float  # all processes on the machine, 200 = both cores busy
    others_cpu_pct: float  # machine minus the processes of this run
    steal_cpu_pct: float = 0.0  # taken by the hypervisor from this VM (VMs only)


class Overhead(msgspec.Struct, kw_only=True):
    """Broker minus direct, in milliseconds (of the percentiles, not per request)."""

    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float


class RunResult(msgspec.Struct, kw_only=True):
    name: str
    load: dict[str, Any]
    broker: SideResult | None = None
    direct: SideResult | None = None
    overhead: Overhead | None = None
    extra: dict[str, Any] = {}


class Machine(msgspec.Struct, kw_only=True):
    cpus: int
    cpu_model: str
    memory_mb: int
    kernel: str
    python: str
    nats_server: str
    loadavg_before: list[float]
    loadavg_after: list[float] = []


class BenchReport(msgspec.Struct, kw_only=True):
    preset: str
    description: str
    command: str
    started_at: str
    wall_s: float
    machine: Machine
    settings: dict[str, Any]
    runs: list[RunResult]
    notes: list[str] = []


def machine_info(nats_binary: str) -> Machine:
    return Machine(
        cpus=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        memory_mb=_mem_total_mb(),
        kernel=platform.release(),
        python=platform.python_version(),
        nats_server=_nats_version(nats_binary),
        loadavg_before=[round(x, 2) for x in os.getloadavg()],
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _nats_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or out.stderr.strip() or "unknown"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def to_json(report: BenchReport) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


# --- text -----------------------------------------------------------------------------


def render_text(report: BenchReport) -> str:
    m = report.machine
    lines = [
        f"llmrelay bench --preset {report.preset}: {report.description}",
        f"machine: {m.cpus} cores ({m.cpu_model}), {m.memory_mb} MB, Linux {m.kernel}, "
        f"Python {m.python}, {m.nats_server}",
        f"load average before: {_triple(m.loadavg_before)}; after: {_triple(m.loadavg_after)}; "
        f"took {report.wall_s:.0f} s",
    ]
    for run in report.runs:
        lines += ["", *_render_run(run)]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _triple(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) or "-"


_HEAD = (
    f"{'':8} {'sent':>7} {'done':>7} {'err':>5} {'rate/s':>8} | "
    f"{'ttft p50':>8} {'p90':>7} {'p99':>7} {'max':>7} | "
    f"{'total p50':>9} {'p90':>7} {'p99':>7} {'max':>7}  (ms)"
)


def _render_run(run: RunResult) -> list[str]:
    load = ", ".join(f"{k}={v}" for k, v in run.load.items())
    lines = [f"== {run.name}: {load}"]
    sides = [s for s in (run.direct, run.broker) if s is not None]
    if sides:
        lines.append(_HEAD)
        lines += [_side_row(s) for s in sides]
    if run.overhead is not None:
        o = run.overhead
        lines.append(
            f"{'overhead':8} {'broker - direct':>30} | {o.ttft_p50_ms:8.2f} {'':7} "
            f"{o.ttft_p99_ms:7.2f} {'':7} | {o.total_p50_ms:9.2f} {'':7} {o.total_p99_ms:7.2f}"
        )
    for side in sides:
        lines += _side_details(side)
    lines += _extra_lines(run.extra)
    return lines


def _side_row(s: SideResult) -> str:
    t, d = s.ttft_ms, s.total_ms
    return (
        f"{s.target:8} {s.sent:7d} {s.completed:7d} {s.errors:5d} {s.achieved_rate:8.1f} | "
        f"{t.p50:8.2f} {t.p90:7.2f} {t.p99:7.2f} {t.max:7.2f} | "
        f"{d.p50:9.2f} {d.p90:7.2f} {d.p99:7.2f} {d.max:7.2f}"
    )


def _side_details(s: SideResult) -> list[str]:
    out = [f"  {s.target}: sent at {s.send_rate:.1f}/s (lag p99 {s.send_lag_ms.p99:.1f} ms)"]
    if s.queued_ms.n:
        q, w = s.queued_ms, s.worker_ttft_ms
        out.append(
            f"    time to first token, parts (p50/p99 ms): queued {q.p50:.2f}/{q.p99:.2f}, "
            f"worker start -> upstream token {w.p50:.2f}/{w.p99:.2f}"
        )
    if s.errors_by_code:
        out[0] += f"; errors {s.errors_by_code}"
    if s.incomplete_answers:
        out[0] += f"; {s.incomplete_answers} answers of the wrong length"
    for r in s.reuse:
        out.append(
            f"    connection reuse ({r.source}): {100 * r.ratio:.2f}% "
            f"({r.connections_opened} opened for {r.requests} requests)"
        )
    procs = "; ".join(
        f"{p.name} {p.cpu_pct:.0f}% cpu ({p.cpu_ms_per_request:.2f} ms/req, "
        f"{p.cpu_us_per_chunk:.1f} µs/chunk) "
        f"{p.peak_rss_mb:.0f} MB peak"
        for p in s.processes
    )
    out.append(f"    processes: {procs}")
    out.append(
        f"    machine cpu {s.machine_cpu_pct:.0f}% of {100 * (os.cpu_count() or 1)}% "
        f"(other processes: {s.others_cpu_pct:.0f}%; stolen by the hypervisor: "
        f"{s.steal_cpu_pct:.0f}%)"
    )
    return out


def _extra_lines(extra: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in extra.items():
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if not isinstance(v, list)}
            out.append(f"  {key}: {msgspec.json.encode(shown).decode()}")
        elif not isinstance(value, list):
            out.append(f"  {key}: {value}")
    return out
