"""`llmrelay worker`: serve one pool."""

from __future__ import annotations

import signal
from typing import Annotated

import anyio
import typer
from anyio.abc import TaskStatus

from cli._common import ConfigOpt, JsonLogsOpt, LogLevelOpt, NatsUrlOpt, config_from, setup_logging
from workers._worker import Worker


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


def worker(
    pool: Annotated[str, typer.Option("--pool", "-p", help="Pool to serve (a key of `pools:`).")],
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-n", min=1, help="Slots (default: the pool's).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="Serve Prometheus /metrics on this port.")
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host", help="Address /metrics listens on (0.0.0.0: every interface)."
        ),
    ] = "127.0.0.1",
    drain_s: Annotated[
        float, typer.Option("--drain-s", help="On SIGTERM, seconds to finish in-flight jobs.")
    ] = 10.0,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
    json_logs: JsonLogsOpt = False,
    log_level: LogLevelOpt = "info",
) -> None:
    """Serve one pool: pull jobs within its slots and rate budget, stream answers back.

    Run as many worker processes per pool as you like, on any machine; they
    share the pool's rate limits. SIGTERM/Ctrl-C drains in-flight jobs first.
    """
    setup_logging(json_logs, log_level)
    cfg = config_from(config)
    w = Worker(
        cfg,
        pool,
        nats_url=nats_url,
        concurrency=concurrency,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        drain_s=drain_s,
    )
    anyio.run(_serve, w)


async def _serve(w: Worker) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(_stop_on_signal, w)  # installed before the worker says it serves
        await w.run()
        tg.cancel_scope.cancel()


async def _stop_on_signal(w: Worker, *, task_status: TaskStatus[None]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            typer.echo(f"draining pool {w.pool_name} (up to {w.drain_s:g}s)...", err=True)
            w.stop()
            return
