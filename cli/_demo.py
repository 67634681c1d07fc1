"""`llmrelay demo`: the broker doing its main job, on this machine, in a minute.

Starts an embedded nats-server, two fake providers (mock-a speaks OpenAI,
mock-b speaks Anthropic), one worker process per pool, then:

1. streams one answer live to the terminal;
2. sends a burst of requests through route `chat` (mock-a primary, mock-b
   backup). A third of the way in mock-a starts answering 503 to everything;
   two thirds in it recovers. Requests fail over; none fail.
3. prints a summary: completed, failed, time to first token, which pool
   served, failovers, connection reuse.

Every process started is stopped on exit, also on Ctrl-C.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker._client import RelayClient
from broker._config import Config, parse_config
from broker._errors import RelayError
from broker._protocol import Chunk, Done, Error, Notice
from devstack import LocalStack, MockSpec

DEMO_POOLS = ["mock-a", "mock-b"]
DEMO_MOCKS = [
    MockSpec(
        name="mock-a", env="MOCK_A_URL", path_suffix="/v1", tokens=24, ttft_ms=40, token_delay_ms=8
    ),
    MockSpec(name="mock-b", env="MOCK_B_URL", tokens=24, ttft_ms=60, token_delay_ms=8),
]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    requests: Annotated[
        int, typer.Option("--requests", "-n", min=1, help="Requests in the burst.")
    ] = 500,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Requests in flight.")
    ] = 16,
    config: Annotated[
        str, typer.Option("--config", "-c", help="Config with pools mock-a, mock-b and route chat.")
    ] = "llmrelay.example.yaml",
    outage: Annotated[
        bool, typer.Option("--outage/--no-outage", help="Make mock-a fail for the middle third.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="No live output; print the summary as one JSON line.")
    ] = False,
) -> None:
    """Run a complete local llmrelay and show it streaming, failing over and recovering.

    Exits 0 only if every request completed.
    """
    console = Console(stderr=as_json, quiet=as_json)
    summary = anyio.run(_demo, Path(config), requests, concurrency, outage, console)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        _print_summary(console, summary)
    if summary["completed"] != summary["requests"]:
        raise typer.Exit(1)


async def _demo(
    config_path: Path, n: int, concurrency: int, outage: bool, console: Console
) -> dict[str, Any]:
    if not config_path.is_file():
        raise RelayError(f"{config_path}: demo config not found (run from the repository root)")
    console.print(
        "[bold]llmrelay demo[/]: starting nats-server, 2 fake providers, 2 worker pools..."
    )
    async with LocalStack(config_path, pools=DEMO_POOLS, mocks=DEMO_MOCKS) as stack:
        cfg = parse_config(config_path.read_text(), source=str(config_path), env=stack.env)
        console.print(f"  nats {stack.server.url}  store {stack.server.store_dir}")
        for name, mock in stack.mocks.items():
            console.print(f"  {name}: {cfg.pools[name].kind} fake provider at {mock.url}")
        async with RelayClient(stack.client_url, config=cfg) as relay:
            await _one_live(relay, console)
            burst = Burst(relay, stack, n, concurrency, outage, console)
            await burst.run()
        return burst.summary(cfg)


async def _one_live(relay: RelayClient, console: Console) -> None:
    prompt = "Say hello to a new llmrelay user."
    console.print(f"\n[bold]1. One request, streamed as it arrives[/]\n  > {prompt}\n  ", end="")
    handle = await relay.submit(prompt, route="chat")
    async for event in handle.events():
        if isinstance(event, Chunk):
            console.print(event.delta, end="", highlight=False)
        elif isinstance(event, Done):
            console.print(
                f"\n  [dim]served by {event.pool}/{event.model}: first token "
                f"{event.timings.ttft_ms or 0:.0f} ms, total {event.timings.total_ms:.0f} ms, "
                f"{event.usage.completion_tokens} tokens[/]"
            )
        elif isinstance(event, Error):
            console.print(f"\n  [red]{event.code}: {event.message}[/]")


class Outcome(msgspec.Struct):
    ok: bool
    ttft_ms: float | None = None
    pool: str = ""
    failovers: int = 0
    code: str = ""


class Burst:
    """The burst of requests, with an outage of the primary in the middle third."""

    def __init__(
        self,
        relay: RelayClient,
        stack: LocalStack,
        n: int,
        concurrency: int,
        outage: bool,
        console: Console,
    ) -> None:
        self.relay, self.stack, self.n = relay, stack, n
        self.concurrency, self.outage, self.console = concurrency, outage, console
        self.outcomes: list[Outcome] = []
        self.phase = "healthy"
        self.elapsed_s = 0.0

    async def run(self) -> None:
        self.console.print(
            f"\n[bold]2. A burst of {self.n} requests[/] on route chat "
            "(mock-a primary, mock-b backup)"
            + (": mock-a fails (503) for the middle third" if self.outage else "")
        )
        progress = Progress(
            TextColumn("  {task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        started = time.perf_counter()
        with progress:
            task = progress.add_task("mock-a healthy", total=self.n)
            sem = anyio.Semaphore(self.concurrency)
            async with anyio.create_task_group() as tg:
                for i in range(self.n):
                    await sem.acquire()
                    self._maybe_switch(i, progress, task)
                    tg.start_soon(self._one, i, sem, progress, task)
        self.elapsed_s = time.perf_counter() - started
        await anyio.to_thread.run_sync(self.stack.mocks["mock-a"].set_fault, None)

    def _maybe_switch(self, i: int, progress: Progress, task: Any) -> None:
        if not self.outage:
            return
        if i == self.n // 3 and self.phase == "healthy":
            self.stack.mocks["mock-a"].set_fault("status=503")
            self.phase = "outage"
            progress.update(task, description="[red]mock-a down (503)[/]")
        elif i == 2 * self.n // 3 and self.phase == "outage":
            self.stack.mocks["mock-a"].set_fault(None)
            self.phase = "recovered"
            progress.update(task, description="[green]mock-a recovered[/]")

    async def _one(self, i: int, sem: anyio.Semaphore, progress: Progress, task: Any) -> None:
        try:
            self.outcomes.append(await self._request(i))
        finally:
            sem.release()
            progress.advance(task)

    async def _request(self, i: int) -> Outcome:
        submitted = time.perf_counter()
        first_chunk: dict[int, float] = {}
        failovers = 0
        try:
            handle = await self.relay.submit(f"Question {i}: what is a queue?", route="chat")
            async for event in handle.events():
                if isinstance(event, Chunk):
                    first_chunk.setdefault(event.attempt, time.perf_counter())
                elif isinstance(event, Notice) and event.kind == "failover":
                    failovers += 1
                elif isinstance(event, Done):
                    at = first_chunk.get(event.attempt)
                    ttft = (at - submitted) * 1000 if at else None
                    return Outcome(ok=True, ttft_ms=ttft, pool=event.pool, failovers=failovers)
                elif isinstance(event, Error):
                    return Outcome(ok=False, code=event.code, failovers=failovers)
        except RelayError as exc:
            return Outcome(ok=False, code=exc.code)
        return Outcome(ok=False, code="no_answer")

    def summary(self, cfg: Config) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.ok]
        ttfts = sorted(o.ttft_ms for o in ok if o.ttft_ms is not None)
        stats = {name: mock.stats() for name, mock in self.stack.mocks.items()}
        upstream = sum(s["requests"] for s in stats.values())
        connections = sum(s["connections"] for s in stats.values())
        served: dict[str, int] = {}
        for o in ok:
            served[o.pool] = served.get(o.pool, 0) + 1
        return {
            "requests": self.n,
            "completed": len(ok),
            "failed": self.n - len(ok),
            "errors": sorted({o.code for o in self.outcomes if not o.ok}),
            "elapsed_s": round(self.elapsed_s, 3),
            "ttft_ms_p50": round(_pct(ttfts, 50), 1),
            "ttft_ms_p99": round(_pct(ttfts, 99), 1),
            "ttft_ms_by": _ttft_groups(ok),
            "served_by": served,
            "failovers": sum(o.failovers for o in self.outcomes),
            "upstream_requests": upstream,
            "upstream_connections": connections,
            "connection_reuse": round(1 - connections / upstream, 4) if upstream else 0.0,
            "outage": self.outage,
        }


def _ttft_groups(ok: list[Outcome]) -> dict[str, dict[str, float]]:
    """Time to first token of the answers each pool gave at once, and of the failed-over
    ones: what a failover costs a caller beyond the backup's own time."""
    groups: dict[str, list[float]] = {}
    for o in ok:
        if o.ttft_ms is not None:
            key = "failed over" if o.failovers else o.pool
            groups.setdefault(key, []).append(o.ttft_ms)
    return {
        key: {
            "n": len(v),
            "p50": round(_pct(sorted(v), 50), 1),
            "p99": round(_pct(sorted(v), 99), 1),
        }
        for key, v in sorted(groups.items())
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    table = Table(title="3. Summary", show_header=False, title_justify="left")
    table.add_row("requests", str(s["requests"]))
    table.add_row("completed", f"[green]{s['completed']}[/]")
    table.add_row(
        "failed", f"[red]{s['failed']}[/] {' '.join(s['errors'])}" if s["failed"] else "0"
    )
    table.add_row("time to first token", f"p50 {s['ttft_ms_p50']} ms, p99 {s['ttft_ms_p99']} ms")
    for key, g in s["ttft_ms_by"].items():
        label = f"  {key}" if key == "failed over" else f"  answered by {key}"
        table.add_row(label, f"p50 {g['p50']} ms, p99 {g['p99']} ms ({g['n']} requests)")
    table.add_row("served by", ", ".join(f"{k}: {v}" for k, v in sorted(s["served_by"].items())))
    table.add_row("failovers", str(s["failovers"]))
    table.add_row(
        "connection reuse",
        f"{s['connection_reuse']:.1%} ({s['upstream_connections']} connections, "
        f"{s['upstream_requests']} upstream requests)",
    )
    table.add_row("wall time", f"{s['elapsed_s']} s")
    console.print()
    console.print(table)
    if s["failed"] == 0:
        console.print("[green]Every request got one complete answer.[/]")
    sys.stdout.flush()
