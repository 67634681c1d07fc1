"""`llmrelay status` and `llmrelay workers`: the broker's state as tables or JSON.

The numbers come from ``broker._status.collect_status``; this module only draws.
"""

from __future__ import annotations

import contextlib
from typing import Annotated

import anyio
import msgspec
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker._config import Config
from broker._replication import Follower, StreamReplication
from broker._status import PoolStatus, RouteStatus, Status, StatusReader, WorkerStatus
from cli._common import ConfigOpt, NatsUrlOpt, open_nats, optional_config

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("workers")(workers)


def status(
    json_out: JsonOpt = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C (JSON: one line each).")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Queues, dead letters and worker pools at a glance.

    Per route: jobs waiting (queued), age of the oldest waiting job, jobs in
    flight (delivered, not yet answered), dead letters, spend (USD on priced
    targets, summed over the live workers since each started). Per pool: live workers,
    busy/total slots, circuit-breaker state (the pool-level circuit, then each
    upstream model whose own circuit is not closed, with its workers), rate budget
    used in the last minute (of the configured limit), and the pool's own queue
    (failovers, pinned jobs). On a cluster, per stream: replicas holding
    everything (of those configured), the leader, and each follower's lag.
    """
    cfg = optional_config(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --watch
        anyio.run(_status, cfg, nats_url, json_out, watch, interval)


async def _status(
    cfg: Config | None, nats_url: str | None, json_out: bool, watch: bool, interval: float
) -> None:
    nc = await open_nats(nats_url, cfg, "llmrelay-status")
    try:
        reader = StatusReader(nc, cfg)
        if not watch:
            _print(await reader.collect(), json_out)
        elif json_out:
            while True:
                _print(await reader.collect(), json_out=True)
                await anyio.sleep(interval)
        else:
            await _watch(reader, interval)
    finally:
        await nc.close()


async def _watch(reader: StatusReader, interval: float) -> None:
    with Live(Text("reading..."), auto_refresh=False) as live:
        while True:
            live.update(render_status(await reader.collect()), refresh=True)
            await anyio.sleep(interval)


def _print(snapshot: Status, json_out: bool) -> None:
    if json_out:
        typer.echo(msgspec.json.encode(snapshot).decode())
    else:
        Console().print(render_status(snapshot))


def workers(
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Live workers (from their heartbeats): pool, slots, circuit, rate used, metrics port."""
    cfg = optional_config(config)
    snapshot = anyio.run(_collect, cfg, nats_url)
    if json_out:
        typer.echo(msgspec.json.encode(snapshot.workers).decode())
    elif not snapshot.workers:
        typer.echo("no live workers (start one: llmrelay worker --pool NAME)")
    else:
        Console().print(_workers_table(snapshot.workers))


async def _collect(cfg: Config | None, nats_url: str | None) -> Status:
    nc = await open_nats(nats_url, cfg, "llmrelay-status")
    try:
        return await StatusReader(nc, cfg).collect()
    finally:
        await nc.close()


# --- drawing ------------------------------------------------------------------------


def render_status(s: Status) -> Group:
    parts: list[Table | Text] = [_routes_table(s), _pools_table(s)]
    if any(r.replicas > 1 or not r.leader for r in s.streams):  # a cluster, or trouble
        parts.append(_streams_table(s.streams))
    notes = _notes(s)
    if notes:
        parts.append(Text("\n".join(notes)))
    return Group(*parts)


def _routes_table(s: Status) -> Table:
    t = Table(title="routes", title_justify="left", box=None, pad_edge=False)
    for name in ("ROUTE", "QUEUED", "OLDEST", "IN FLIGHT", "DLQ", "SPEND", "TARGETS"):
        t.add_column(name, justify="left" if name in ("ROUTE", "TARGETS") else "right")
    for r in s.routes:
        t.add_row(
            r.name,
            _queued(r),
            _age(r.oldest_job_age_s, s.oldest_age_known),
            str(r.in_flight),
            str(r.dlq_depth),
            "-" if r.spend_usd is None else f"${r.spend_usd:.4f}",
            _targets(r),
        )
    if not s.routes:
        t.add_row("(none)", "", "", "", "", "", "")
    return t


def _pools_table(s: Status) -> Table:
    t = Table(title="\npools", title_justify="left", box=None, pad_edge=False)
    for name in (
        "POOL",
        "WORKERS",
        "SLOTS BUSY",
        "CIRCUIT",
        "RATE USED/MIN",
        "QUEUED",
        "IN FLIGHT",
    ):
        t.add_column(name, justify="left" if name in ("POOL", "CIRCUIT") else "right")
    for p in s.pools:
        t.add_row(
            p.name,
            str(p.live_workers),
            f"{p.slots_busy}/{p.slots_total}",
            _circuit(p),
            _rate(p),
            _queued(p),
            str(p.in_flight),
        )
    if not s.pools:
        t.add_row("(none)", "", "", "", "", "", "")
    return t


def _streams_table(streams: list[StreamReplication]) -> Table:
    """Per stream: replicas current/configured, its leader, each follower's state."""
    t = Table(title="\nstreams", title_justify="left", box=None, pad_edge=False)
    for name in ("STREAM", "REPLICAS", "LEADER", "FOLLOWERS"):
        t.add_column(name, justify="right" if name == "REPLICAS" else "left")
    for r in streams:
        followers = r.error or ", ".join(_follower(f) for f in r.followers) or "-"
        replicas = f"{r.current_replicas}/{r.replicas}" if r.replicas else "?"
        t.add_row(r.name, replicas, r.leader or "NONE", followers)
    return t


def _follower(f: Follower) -> str:
    if f.offline:
        return f"{f.name} offline"
    if f.current and not f.lag:
        return f"{f.name} current"
    seen = f", seen {f.seen_s:.1f}s ago" if f.seen_s is not None else ""
    return f"{f.name} {'current' if f.current else 'behind'} (lag {f.lag}{seen})"


def _workers_table(ws: list[WorkerStatus]) -> Table:
    t = Table(box=None, pad_edge=False)
    for name in ("POOL", "WORKER", "BUSY", "CIRCUIT", "REQ/MIN", "TOK/MIN", "SEEN", "METRICS"):
        t.add_column(name, justify="left" if name in ("POOL", "WORKER", "CIRCUIT") else "right")
    for w in ws:
        t.add_row(
            w.pool,
            w.worker_id,
            f"{w.busy}/{w.slots}",
            _worker_circuit(w),
            str(w.rpm_used),
            str(w.tpm_used),
            f"{w.last_seen_s:.1f}s ago",
            f":{w.metrics_port}" if w.metrics_port else "-",
        )
    return t


def _notes(s: Status) -> list[str]:
    notes: list[str] = []
    if s.dlq_depth:
        notes.append(f"{s.dlq_depth} dead letter(s): llmrelay dlq list")
    if any(r.spend_usd is not None for r in s.routes):
        notes.append("SPEND: USD on priced targets since each live worker started")
    for stray in s.stray:
        notes.append(
            f"! {stray.jobs} job(s) on {stray.subject}, which no route or pool reads "
            "(llmrelay monitor answers them with unknown_route)"
        )
    if not s.oldest_age_known:
        notes.append("OLDEST needs a NATS user that may read jobs (the operator's, not `client`)")
    missing = [r.name for r in s.routes if not r.consumer] + [
        p.name for p in s.pools if not p.consumer
    ]
    if missing:
        notes.append(
            f"not on the broker yet: {', '.join(missing)} (start a worker, or `llmrelay up`, "
            "with this config)"
        )
    return notes


def _queued(q: RouteStatus | PoolStatus) -> str:
    if not q.consumer:
        return "-"
    full = "  FULL" if q.capacity and q.queue_depth >= q.capacity else ""
    return f"{q.queue_depth}{full}"


def _age(seconds: float | None, known: bool) -> str:
    if not known:
        return "?"
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _targets(r: RouteStatus) -> str:
    return " -> ".join(r.targets) if r.targets else "(not in config)"


def _circuit(p: PoolStatus) -> str:
    """The pool-level state, then e.g. ``; gpt-x open 2/3`` (workers seeing it, of the live)."""
    if not p.circuit:
        return "-"
    if len(p.circuit) == 1:
        text = next(iter(p.circuit))
    else:
        text = ", ".join(f"{state} {n}" for state, n in sorted(p.circuit.items()))
    models = [
        f"{model} {state} {n}/{p.live_workers}"
        for model, states in p.model_circuits.items()
        for state, n in sorted(states.items(), reverse=True)  # open before half_open
    ]
    return "; ".join([text, ", ".join(models)]) if models else text


def _worker_circuit(w: WorkerStatus) -> str:
    """``closed``; ``open (gpt-x)``: a model's circuit; ``open (pool)``: the pool-level one."""
    parts = [f"{w.circuit} (pool)"] if w.circuit != "closed" else []
    for state in ("open", "half_open"):
        models = [model for model, s in w.circuits.items() if s == state]
        if models:
            parts.append(f"{state} ({', '.join(models)})")
    return ", ".join(parts) or "closed"


def _rate(p: PoolStatus) -> str:
    req = f"{p.rpm_used}/{p.rpm_limit} req" if p.rpm_limit else f"{p.rpm_used} req"
    tok = f"{p.tpm_used}/{p.tpm_limit} tok" if p.tpm_limit else f"{p.tpm_used} tok"
    return f"{req}, {tok}"
