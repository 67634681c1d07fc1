"""`llmrelay bench`: the smoke preset at a tiny scale gives complete, consistent figures.

Speed is never asserted here (the figures depend on the machine); what is checked
is that every figure is there and that they agree with each other, and that no
process outlives the benchmark, even when it is interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench._stats import percentile, summarize
from bench.presets import PRESETS, Overrides, apply_overrides
from broker._server import llmrelay_command

REPO = Path(__file__).resolve().parent.parent
BENCH = [*llmrelay_command(), "bench"]
TINY = ["--preset", "smoke", "--duration", "1", "--warmup", "0.2", "--rate", "20"]


def _ordered(summary: dict[str, Any]) -> bool:
    return summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def _check_side(side: dict[str, Any], target: str) -> None:
    assert side["target"] == target
    assert side["sent"] > 0
    assert side["completed"] + side["errors"] == side["sent"]
    assert sum(side["errors_by_code"].values()) == side["errors"]
    assert side["completed"] > 0, side["errors_by_code"]
    for key in ("ttft_ms", "total_ms", "send_lag_ms"):
        assert _ordered(side[key]), (key, side[key])
    assert side["ttft_ms"]["n"] == side["completed"] == side["total_ms"]["n"]
    assert side["ttft_ms"]["p50"] <= side["total_ms"]["p50"]
    assert side["achieved_rate"] > 0
    assert side["reuse"], "connection reuse is reported"
    for reuse in side["reuse"]:
        assert 0.0 <= reuse["ratio"] <= 1.0
        assert reuse["connections_opened"] >= 0
    roles = {p["role"] for p in side["processes"]}
    assert {"nats", "worker", "provider", "loadgen"} <= roles
    for proc in side["processes"]:
        assert proc["cpu_s"] >= 0 and proc["cpu_pct"] >= 0
        assert proc["peak_rss_mb"] > 0, proc
    assert side["machine_cpu_pct"] >= 0 and side["others_cpu_pct"] >= 0
    assert side["steal_cpu_pct"] >= 0


def test_smoke_json_is_complete_and_consistent() -> None:
    started = time.monotonic()
    out = subprocess.run(
        [*BENCH, *TINY, "--json"], cwd=REPO, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["preset"] == "smoke"
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["loadavg_before"]) == 3
    assert report["wall_s"] <= time.monotonic() - started + 1
    (run,) = report["runs"]
    _check_side(run["broker"], "broker")
    _check_side(run["direct"], "direct")
    parts = run["broker"]["queued_ms"], run["broker"]["worker_ttft_ms"]
    assert all(p["n"] == run["broker"]["completed"] and _ordered(p) for p in parts)
    assert {r["source"] for r in run["broker"]["reuse"]} >= {"worker-metrics"}
    overhead = run["overhead"]
    assert overhead["ttft_p50_ms"] == pytest.approx(
        run["broker"]["ttft_ms"]["p50"] - run["direct"]["ttft_ms"]["p50"], abs=1e-3
    )
    assert run["load"]["rate"] == 20


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_ctrl_c_leaves_no_process_behind() -> None:
    proc = subprocess.Popen(
        [*BENCH, "--preset", "smoke", "--duration", "30"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until the load is flowing
        if "direct to the fake provider" in line:
            break
    time.sleep(1.0)
    children = _descendants(proc.pid)
    assert len(children) >= 4  # nats-server, provider, worker, load generator
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)]


def test_percentiles_are_nearest_rank_and_ordered() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert percentile(samples, 50) == 50 and percentile(samples, 99) == 99
    s = summarize([5.0, 1.0, 3.0])
    assert (s.n, s.p50, s.p90, s.p99, s.max) == (3, 3.0, 5.0, 5.0, 5.0)
    assert summarize([]).n == 0


def test_overrides_change_only_what_is_given() -> None:
    base = PRESETS["steady"]
    one = apply_overrides(base, Overrides(rate=300, duration_s=2))
    assert [(p.mode, p.rate, p.duration_s) for p in one.phases] == [("open", 300, 2)]
    assert one.provider == base.provider and one.slots == base.slots
    assert apply_overrides(base, Overrides()) == base
    assert apply_overrides(PRESETS["failover"], Overrides(rate=50)).kill_rate == 50


def test_every_preset_is_listed() -> None:
    out = subprocess.run([*BENCH, "--list"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for name in ("smoke", "steady", "ceiling", "spike", "failover", "long-streams", "gateway"):
        assert name in out.stdout
    assert os.path.exists(REPO / "bench" / "RESULTS.md")


def test_gateway_preset_measures_all_three_paths() -> None:
    out = subprocess.run(
        [*BENCH, "--preset", "gateway", "--requests", "5", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"direct", "gateway", "gateway+sdk"}
    for path in report.values():
        assert path["n"] == 5
        assert 0 < path["p50"] <= path["p90"] <= path["p99"] <= path["max"]
