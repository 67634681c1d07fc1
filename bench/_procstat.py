"""CPU time and memory of one process, read from /proc (Linux; no dependency).

``/proc/<pid>/stat`` gives user and system CPU time in clock ticks;
``/proc/<pid>/status`` gives the resident set (``VmRSS``) and its high-water
mark (``VmHWM``). Writing ``5`` to ``/proc/<pid>/clear_refs`` resets the
high-water mark (Linux 4.0+), so each phase of a run reports its own peak; where
that is refused the peak is the highest RSS sampled during the phase instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class ProcUsage(msgspec.Struct, kw_only=True):
    """What one process used during one phase."""

    name: str
    role: str
    pid: int
    cpu_s: float
    cpu_pct: float  # of one core: 100 = one core busy for the whole phase
    cpu_ms_per_request: float = 0.0  # cpu_s over every request of the phase (warmup too)
    # cpu_s over every chunk the provider streamed in the phase (requests x tokens):
    # what relaying one chunk costs, which dominates long answers.
    cpu_us_per_chunk: float = 0.0
    peak_rss_mb: float
    rss_mb: float
    rss_min_mb: float
    rss_max_mb: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` so far (0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: split after its closing paren.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; (0, 0) if the process is gone."""
    rss = hwm = 0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS; False if the kernel refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class ProcWatch:
    """CPU and memory of one process over one phase: ``begin()``, ``sample()``..., ``end()``."""

    def __init__(self, name: str, role: str, pid: int) -> None:
        self.name = name
        self.role = role
        self.pid = pid
        self._cpu0 = 0.0
        self._t0 = 0.0
        self._peak_reset = False
        self.samples_kb: list[int] = []

    def begin(self) -> None:
        self._cpu0 = cpu_seconds(self.pid)
        self._t0 = time.monotonic()
        self._peak_reset = reset_peak(self.pid)
        self.samples_kb = []
        self.sample()

    def sample(self) -> None:
        rss, _ = memory_kb(self.pid)
        if rss:
            self.samples_kb.append(rss)

    def end(self, reported: tuple[float, int] | None = None) -> ProcUsage:
        """Usage since ``begin``; ``reported`` = (cpu_s, peak_kb) from a process that exited."""
        self.sample()
        wall = max(1e-9, time.monotonic() - self._t0)
        cpu = max(0.0, cpu_seconds(self.pid) - self._cpu0)
        rss, hwm = memory_kb(self.pid)
        sampled = self.samples_kb or [rss]
        peak = hwm if self._peak_reset and hwm else max(sampled)
        if reported is not None:
            cpu, peak = reported
        return ProcUsage(
            name=self.name,
            role=self.role,
            pid=self.pid,
            cpu_s=round(cpu, 3),
            cpu_pct=round(100 * cpu / wall, 1),
            peak_rss_mb=_mb(max(peak, max(sampled))),
            rss_mb=_mb(rss or sampled[-1]),
            rss_min_mb=_mb(min(sampled)),
            rss_max_mb=_mb(max(sampled)),
        )


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all cores, all processes.

    Busy counts user, nice, system, irq and softirq time; stolen is the time the
    hypervisor ran something else while this VM wanted to run.
    """
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
    return busy / _TICKS_PER_S, ticks[7] / _TICKS_PER_S


class MachineWatch:
    """The whole machine's CPU over one phase, to tell our load from everyone else's."""

    def __init__(self) -> None:
        self._busy0 = self._steal0 = 0.0
        self._t0 = 0.0

    def begin(self) -> None:
        self._busy0, self._steal0 = machine_cpu_s()
        self._t0 = time.monotonic()

    def end(self) -> tuple[float, float]:
        """(busy, stolen) since ``begin``, in percent of one core (200 = two cores)."""
        wall = max(1e-9, time.monotonic() - self._t0)
        busy, steal = machine_cpu_s()
        return (
            round(100 * (busy - self._busy0) / wall, 1),
            round(100 * (steal - self._steal0) / wall, 1),
        )
