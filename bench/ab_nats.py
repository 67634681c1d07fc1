"""Alternate bench runs over nats-server setups: R1 or R3, default fsync or sync always.

    python -m bench.ab_nats 3 r1,r3 --preset smoke --rate 100
    python -m bench.ab_nats 3 r1,r1-sync --preset ceiling --no-direct --duration 10

Setups: ``r1`` (one nats-server from nats.conf), ``r3`` (``--cluster 3``: three
nodes, ``streams.replicas: 3``), ``r1-sync`` and ``r3-sync`` (the same with the
``sync_interval: always`` line that nats.conf documents uncommented, in a temp
copy, via ``--nats-conf``). Each round runs every setup once, in turn, so the
drift of a shared machine falls on all of them alike. One line per run: req/s,
time to first token (and its overhead over direct, if the preset has a direct
side), CPU ms per request by process kind (nats-server: all nodes together),
the other processes' CPU and the load average. ``AB_NATS_OUT=DIR`` keeps every
JSON report there.

    python -m bench.ab_nats puback 3 r1,r3,r1-sync,r3-sync [JOBS]

times what JetStream alone adds in each setup: JOBS (default 2,000) sequential
job publishes (300 bytes, to ``llm.jobs.chat`` of llmrelay's topology) on an
otherwise idle broker, no worker, no client load; PubAck latency p50/p99/max.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from bench._stats import percentile
from broker._cluster import NatsCluster
from broker._nats import connect_nats
from broker._server import WORKER_USER, NatsServer
from broker._topology import ensure_topology
from devstack import ConfigDoc

REPO = Path(__file__).resolve().parent.parent
SYNC_ALWAYS_LINE = "  # sync_interval: always\n"
SETUPS = ("r1", "r3", "r1-sync", "r3-sync")


def sync_always_confs(into: Path) -> tuple[Path, Path]:
    """nats.conf with its documented sync line uncommented, and nats-cluster.conf beside it."""
    text = (REPO / "nats.conf").read_text()
    if text.count(SYNC_ALWAYS_LINE) != 1:
        raise SystemExit(f"nats.conf does not document {SYNC_ALWAYS_LINE.strip()!r} once")
    (into / "nats.conf").write_text(text.replace(SYNC_ALWAYS_LINE, "  sync_interval: always\n"))
    shutil.copy(REPO / "nats-cluster.conf", into / "nats-cluster.conf")
    return into / "nats.conf", into / "nats-cluster.conf"


def setup_options(setup: str, confs: tuple[Path, Path]) -> list[str]:
    options = ["--cluster", "3"] if setup.startswith("r3") else []
    if setup.endswith("-sync"):
        options += ["--nats-conf", str(confs[1] if setup.startswith("r3") else confs[0])]
    return options


def run(options: list[str], out: Path) -> dict[str, Any]:
    """One ``llmrelay bench`` run; its JSON report."""
    command = [sys.executable, "-c", "from cli.main import main; main()", "bench", *options]
    subprocess.run([*command, "--out", str(out)], cwd=REPO, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def summary(report: dict[str, Any]) -> str:
    phase = report["runs"][0]
    broker, overhead = phase["broker"], phase.get("overhead")
    procs: dict[str, float] = {p["name"]: p["cpu_ms_per_request"] for p in broker["processes"]}

    def total(prefix: str) -> float:
        return sum(v for name, v in procs.items() if name.startswith(prefix))

    ttft = broker["ttft_ms"]
    added = ""
    if overhead:
        added = f"  overhead p50 {overhead['ttft_p50_ms']:+.2f} p99 {overhead['ttft_p99_ms']:+.2f}"
    return (
        f"{broker['achieved_rate']:7.1f} req/s ({broker['errors']} errors)  ttft p50 "
        f"{ttft['p50']:.2f} p99 {ttft['p99']:.2f} ms{added}  CPU ms/req: "
        f"workers {total('worker'):.2f} nats-server {total('nats-server'):.2f} client "
        f"{total('loadgen'):.2f} provider {total('mock'):.2f}  (others "
        f"{broker['others_cpu_pct']:.0f} %, load {report['machine']['loadavg_before'][0]:.2f})"
    )


# --- PubAck latency alone ------------------------------------------------------------


async def puback_ms(setup: str, confs: tuple[Path, Path], jobs: int) -> list[float]:
    """Sequential publishes to a fresh broker of ``setup``; each one's PubAck wait, ms."""
    sync = setup.endswith("-sync")
    with tempfile.TemporaryDirectory() as store, _servers(setup, confs, sync, store) as url:
        doc = ConfigDoc().streams(replicas=3 if setup.startswith("r3") else 1)
        doc.pool("a", base_url="http://127.0.0.1:9/v1", api_key="sk-x").route("chat", [("a", "m")])
        nc = await connect_nats(url, name="ab-nats-puback")
        try:
            await ensure_topology(nc, doc.parse())
            js, body, waits = nc.jetstream(), b"x" * 300, []
            for _ in range(jobs):
                t0 = time.perf_counter()
                await js.publish("llm.jobs.chat", body)
                waits.append(1000 * (time.perf_counter() - t0))
            return waits
        finally:
            await nc.close()


@contextlib.contextmanager
def _servers(setup: str, confs: tuple[Path, Path], sync: bool, store: str) -> Iterator[str]:
    if setup.startswith("r3"):
        with NatsCluster(size=3, store_dir=store, config_file=confs[1] if sync else None) as c:
            yield c.urls_for(WORKER_USER)
    else:
        with NatsServer(store_dir=store, config_file=confs[0] if sync else None) as server:
            yield server.url_for(WORKER_USER)


def puback_main(rounds: int, setups: list[str], jobs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        confs = sync_always_confs(Path(tmp))
        for r in range(rounds):
            for setup in setups:
                waits = sorted(anyio.run(puback_ms, setup, confs, jobs))
                p50, p99 = percentile(waits, 50), percentile(waits, 99)
                print(
                    f"round {r} {setup:8} {jobs} PubAcks: p50 {p50:.3f} p99 {p99:.3f} max "
                    f"{waits[-1]:.3f} ms ({jobs / (sum(waits) / 1000):.0f}/s one at a time; "
                    f"load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    if sys.argv[1] == "puback":
        setups = sys.argv[3].split(",")
        _check(setups)
        puback_main(int(sys.argv[2]), setups, int(sys.argv[4]) if len(sys.argv) > 4 else 2000)
        return
    rounds, setups, options = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    _check(setups)
    keep = os.environ.get("AB_NATS_OUT")
    with tempfile.TemporaryDirectory() as tmp:
        confs = sync_always_confs(Path(tmp))
        out_dir = Path(keep) if keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for r in range(rounds):
            for setup in setups:
                out = out_dir / f"{setup}-{r}.json"
                report = run([*options, *setup_options(setup, confs)], out)
                print(f"round {r} {setup:8} {summary(report)}", flush=True)


def _check(setups: list[str]) -> None:
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise SystemExit(f"unknown setups {sorted(unknown)} (known: {', '.join(SETUPS)})")


if __name__ == "__main__":
    main()
