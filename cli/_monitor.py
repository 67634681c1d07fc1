"""`llmrelay monitor`: serve queue metrics from JetStream, and clear stray jobs.

Thin over ``broker._monitor.Monitor``; runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import signal
from typing import Annotated

import anyio
import typer

from broker._config import Config
from broker._monitor import Monitor
from broker._topology import ensure_topology
from cli._common import (
    ConfigOpt,
    JsonLogsOpt,
    LogLevelOpt,
    NatsUrlOpt,
    open_nats,
    optional_config,
    setup_logging,
)

log = logging.getLogger("llmrelay.monitor")


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor)


def monitor(
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Serve /metrics here (0: any).")
    ] = 9180,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between JetStream snapshots.")
    ] = 5.0,
    janitor: Annotated[
        bool,
        typer.Option(
            "--janitor/--no-janitor",
            help="Answer and dead-letter jobs sent to unknown routes/pools.",
        ),
    ] = True,
    grace_s: Annotated[
        float,
        typer.Option("--janitor-grace-s", min=0.0, help="Leave stray jobs this young alone."),
    ] = 10.0,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
    json_logs: JsonLogsOpt = False,
    log_level: LogLevelOpt = "info",
) -> None:
    """Serve Prometheus metrics of queues, DLQ and workers, read from JetStream.

    Per route and pool subject: queue depth, oldest job age, in flight (ack
    pending), redeliveries and capacity; per route: DLQ depth; per pool: live
    workers, slots, circuit states. Metric names: docs/operations.md.

    One monitor per broker is enough (it holds no state). It also answers jobs
    published to a route or pool that does not exist with `unknown_route` and
    moves them to the DLQ, so no client waits for them forever. Needs the
    operator's NATS user.
    """
    setup_logging(json_logs, log_level)
    cfg = optional_config(config)
    anyio.run(_run, cfg, nats_url, port, host, interval, janitor, grace_s)


async def _run(
    cfg: Config | None,
    nats_url: str | None,
    port: int,
    host: str,
    interval: float,
    janitor: bool,
    grace_s: float,
) -> None:
    nc = await open_nats(nats_url, cfg, "llmrelay-monitor")
    mon = Monitor(nc, cfg, interval_s=interval, janitor=janitor, grace_s=grace_s)
    try:
        if cfg is not None:
            await ensure_topology(nc, cfg)
        try:
            bound = mon.serve(port, host)
        except OSError as exc:
            typer.secho(
                f"error: cannot listen on {host}:{port}: {exc.strerror}", fg="red", err=True
            )
            raise typer.Exit(2) from exc
        janitor_text = f"janitor on, grace {grace_s:g}s" if janitor else "janitor off"
        # The signal handler goes in before the ready line: a Ctrl-C right after
        # it must stop the monitor cleanly, not kill it.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(mon.run)
                typer.echo(
                    f"llmrelay monitor: metrics on http://{host}:{bound}/metrics "
                    f"(snapshot every {interval:g}s; {janitor_text}). Ctrl-C to stop."
                )
                async for signum in signals:
                    log.info("monitor stopping (%s)", signal.Signals(signum).name)
                    break
                tg.cancel_scope.cancel()
    finally:
        mon.close()
        await nc.close()
