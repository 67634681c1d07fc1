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

from bench._failover import cut_figures, cut_tokens, requeue_figures, sigkill_figures
from bench._loadgen import Rec, _Request
from bench._stats import percentile, summarize
from bench.presets import PRESETS, Overrides, apply_overrides
from broker._protocol import Notice
from broker._server import llmrelay_command

REPO = Path(__file__).resolve().parent.parent
BENCH = [*llmrelay_command(), "bench"]
TINY = ["--preset", "smoke", "--duration", "1", "--warmup", "0.2", "--rate", "20"]


def _ordered(summary: dict[str, Any]) -> bool:
    return bool(summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"])


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


def test_a_cluster_run_reports_every_node_and_stores_each_job_three_times(
    tmp_path: Path,
) -> None:
    """``--cluster 3``: the broker side on a 3-node cluster with R3 streams. Each node's
    store holds LLM_JOBS (a replica), and each node's CPU is reported."""
    out = subprocess.run(
        [*BENCH, *TINY, "--cluster", "3", "--no-direct", "--keep-dir", str(tmp_path), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert (report["settings"]["nats_nodes"], report["settings"]["replicas"]) == (3, 3)
    assert any("3-node JetStream cluster" in note for note in report["notes"])
    (run,) = report["runs"]
    assert run["direct"] is None
    _check_side(run["broker"], "broker")
    nats = [p for p in run["broker"]["processes"] if p["role"] == "nats"]
    assert sorted(p["name"] for p in nats) == [f"nats-server-n{i}" for i in (1, 2, 3)]
    assert len({p["pid"] for p in nats}) == 3
    assert all(p["cpu_s"] > 0 for p in nats), nats  # each node replicated the jobs
    assert "replicas: 3" in (tmp_path / "llmrelay-bench.yaml").read_text()
    for node in ("n1", "n2", "n3"):
        streams = tmp_path / "nats-cluster" / node / "jetstream" / "$G" / "streams"
        assert (streams / "LLM_JOBS").is_dir(), f"{node} stores no replica of LLM_JOBS"


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
    names = ("smoke", "steady", "ceiling", "spike", "failover", "long-streams", "gateway")
    for name in (*names, "gateway-ceiling"):
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


def test_gateway_ceiling_sends_the_same_load_direct_and_through_the_gateway() -> None:
    """A tiny gateway-ceiling run: every request answered on both sides, the gateway's
    CPU counted per request and per chunk, time to first token added reported."""
    tiny = ["--preset", "gateway-ceiling", "--rate", "20", "--duration", "1", "--warmup", "0.2"]
    out = subprocess.run(
        [*BENCH, *tiny, "--json"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = json.loads(out.stdout)["runs"]
    _check_side(run["direct"], "direct")
    _check_side(run["broker"], "gateway")
    side = run["broker"]
    assert side["errors"] == 0 and side["incomplete_answers"] == 0, side["errors_by_code"]
    (gateway,) = [p for p in side["processes"] if p["role"] == "gateway"]
    assert gateway["cpu_ms_per_request"] > 0 and gateway["cpu_us_per_chunk"] > 0
    assert run["overhead"]["ttft_p50_ms"] == pytest.approx(
        side["ttft_ms"]["p50"] - run["direct"]["ttft_ms"]["p50"], abs=1e-3
    )


# --- the failover figures (pure functions over records) ------------------------------------


def _rec(
    sent: float,
    ttft_ms: float,
    total_ms: float,
    *,
    code: str = "",
    pool: str = "backup",
    chars: int = 40,
    max_gap_ms: float = 2.0,
    failed_attempts: int = 1,
    failed_at_ms: int = 0,
) -> Rec:
    return Rec(
        sent, ttft_ms, total_ms, code, pool, 8, 0.0, failed_at_ms, 1.0, 1.0,
        chars, max_gap_ms, failed_attempts,
    )  # fmt: skip


def test_rec_without_the_new_fields_still_decodes() -> None:
    import msgspec

    old = msgspec.json.encode([1.0, 2.0, 3.0, "", "primary", 8, 0.0, 0, 1.0, 1.0])
    rec = msgspec.json.decode(old, type=Rec)
    assert (rec.chars, rec.max_gap_ms, rec.failed_attempts) == (0, 0.0, 0)


def test_request_keeps_text_across_a_resume_and_drops_it_on_a_reset() -> None:
    req = _Request()
    for _ in range(4):
        req.chunk(1, 5)
    req.notice(Notice(kind="failover", attempt=1, resume=True, offset=20))
    req.notice(Notice(kind="resumed", attempt=1025, resume=True, offset=20))
    for _ in range(4):
        req.chunk(1025, 3)
    assert (req.chunks, req.chars, req.attempt) == (8, 32, 1025)
    rec = req.record(0.0, 0.0, 0.0)
    assert rec.chars == 32 and rec.max_gap_ms >= 0
    req.notice(Notice(kind="failover", attempt=1025, reset=True))
    assert (req.chunks, req.chars) == (0, 0)
    req.chunk(2049, 7)  # a newer attempt with no resume before it starts over
    assert (req.chunks, req.chars) == (1, 7)


def test_request_max_gap_is_the_longest_wait_between_chunks() -> None:
    req = _Request()
    req.chunk(1, 1)
    time.sleep(0.03)
    req.chunk(1, 1)
    req.chunk(1, 1)
    rec = req.record(0.0, 0.0, 0.0)
    assert 25 <= rec.max_gap_ms < 1000


def _baseline() -> list[Rec]:
    return [
        _rec(i, 2.0 + i / 100, 20.0 + i / 100, pool="primary", failed_attempts=0)
        for i in range(100)
    ]


def test_requeue_figures_from_the_503s_in_each_requests_window() -> None:
    records = [_rec(10.0 * i, 8.0, 30.0, failed_at_ms=int(10_000 * i + 2)) for i in range(1, 4)]
    # two 503s per request (the immediate retry), 1 ms and 3 ms after the send; a warm-up one
    log = [0.5] + [t for i in range(1, 4) for t in (10.0 * i + 0.001, 10.0 * i + 0.003)]
    figures = requeue_figures(records, log, _baseline(), expected_chars=40)
    assert figures["method"] == "provider log"
    assert figures["samples"] == 3 and figures["served_by_backup"] == 3
    assert figures["p50_ms"] == pytest.approx(7.0, abs=1e-3)  # from the first 503
    assert figures["from_last_503_ms"]["p50"] == pytest.approx(5.0, abs=1e-3)
    assert figures["primary_calls_per_request"] == {"2": 3}
    assert figures["cross_check_from_worker_record_ms"]["p50"] == pytest.approx(6.0, abs=0.01)
    assert figures["ttft_minus_baseline_ms"]["p50"] == pytest.approx(8.0 - 2.49, abs=1e-3)
    assert figures["total_minus_baseline_ms"]["p99"] == pytest.approx(30.0 - 20.98, abs=1e-3)
    assert (figures["complete"], figures["lost"]) == (3, 0)
    unpaired = requeue_figures(records, [], _baseline(), expected_chars=40)
    assert unpaired["method"].startswith("Done.attempts")


def test_cut_figures_compare_with_the_baseline() -> None:
    records = [_rec(i, 3.0, 25.0 + i, max_gap_ms=6.0 + i / 10) for i in range(10)]
    records.append(_rec(11, 3.0, 30.0, chars=20))  # an answer that came back short
    records.append(_rec(12, -1.0, 120_000.0, code="unfinished", chars=0))
    figures = cut_figures(records, _baseline(), expected_chars=40, cut=4)
    assert figures["cut_after_tokens"] == 4
    assert (figures["complete"], figures["lost"], figures["continued_by_backup"]) == (10, 1, 11)
    assert figures["ttft_minus_baseline_ms"]["p50"] == pytest.approx(3.0 - 2.49, abs=1e-3)
    assert figures["total_minus_baseline_ms"]["p50"] == pytest.approx(30.0 - 20.49, abs=1e-3)
    assert figures["max_gap_ms"]["p99"] == pytest.approx(6.9)
    assert figures["baseline_max_gap_ms"]["p50"] == 2.0
    assert figures["max_gap_minus_baseline_ms"]["p99"] == pytest.approx(4.9)
    empty = cut_figures([], _baseline(), expected_chars=40, cut=4)
    assert empty["ttft_minus_baseline_ms"] == {"p50": None, "p99": None}
    assert cut_tokens(PRESETS["failover"]) == PRESETS["failover"].provider.tokens // 2


def test_sigkill_figures_time_each_kill_to_the_backups_next_answer() -> None:
    records = [_rec(0.5, 1.0, 10.0, pool="primary", failed_attempts=0)]
    records += [_rec(1.0 + k + 0.005, 3.0, 10.0) for k in range(3)]
    records.append(_rec(2.1, 1.0, 2_500.0, pool="primary"))  # held by a killed worker
    figures = sigkill_figures(records, [1.0, 2.0, 3.0], PRESETS["failover"])
    assert figures["trials"] == figures["trials_with_backup_answer"] == 3
    assert figures["p50_ms"] == pytest.approx(8.0, abs=1e-3)
    assert figures["backup_share_before_first_kill"] == 0.0
    assert (figures["stranded_then_redelivered"], figures["lost"]) == (1, 0)
