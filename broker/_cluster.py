"""A local JetStream cluster: several nats-server processes routed to each other.

Used by `llmrelay up --cluster 3` and by the tests. Each node is a
``NatsServer`` (broker/_server.py) started from ``nats-cluster.conf``, which is
``nats.conf`` (the same users, permissions and JetStream limits) plus a
cluster block; the flags give what differs per node:

    node   server name   client port   monitoring port   route port   store
    n1     n1            port          monitor_port      cluster_port  <store_dir>/n1
    n2     n2            port + 1      monitor_port + 1  cluster_port + 1  <store_dir>/n2
    ...

Every node is given the routes to all nodes (a route to itself is ignored by
the server), so any subset may start first. A cluster is ready when every
node follows the same JetStream meta leader: before that, creating a stream
fails. ``kill``/``restart`` are for chaos tests; a restarted node keeps its
store and catches up from the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from broker._errors import ServerStartError
from broker._server import ClusterRole, NatsServer, free_port

CLUSTER_NAME = "llmrelay"
META_LEADER_TIMEOUT_S = 30.0


def default_cluster_conf() -> Path:
    """nats-cluster.conf beside nats.conf (the repository's, else the bundled copy)."""
    here = Path(__file__).resolve().parent
    for candidate in (Path.cwd(), here.parent, here):
        if (candidate / "nats-cluster.conf").is_file() and (candidate / "nats.conf").is_file():
            return candidate / "nats-cluster.conf"
    raise ServerStartError("nats-cluster.conf not found (pass --nats-conf)")


def node_name(index: int) -> str:
    return f"n{index + 1}"


class NatsCluster:
    """``size`` nats-server nodes on one host: ``with NatsCluster(store_dir=...) as c``.

    Without ports, each node gets free ones; with ``port``/``monitor_port``/
    ``cluster_port``, node i uses that port + i.
    """

    def __init__(
        self,
        *,
        size: int = 3,
        store_dir: str | os.PathLike[str],
        port: int | None = None,
        monitor_port: int | None = None,
        cluster_port: int | None = None,
        config_file: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.size = size
        self.host = host
        self.store_dir = Path(store_dir)
        self.config_file = Path(config_file) if config_file else default_cluster_conf()
        taken: set[int] = set()
        clients, monitors, route_ports = (
            _ports(first, size, taken) for first in (port, monitor_port, cluster_port)
        )
        routes = [f"nats://{host}:{p}" for p in route_ports]
        self.nodes = [
            NatsServer(
                port=client,
                monitor_port=monitor,
                store_dir=self.store_dir / node_name(i),
                config_file=self.config_file,
                host=host,
                cluster=ClusterRole(node_name(i), route_ports[i], routes, CLUSTER_NAME),
            )
            for i, (client, monitor) in enumerate(zip(clients, monitors, strict=True))
        ]

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.server_name == name)

    def node_urls(self, user: tuple[str, str]) -> list[str]:
        return [n.url_for(user) for n in self.nodes]

    def urls_for(self, user: tuple[str, str]) -> str:
        """Every node's URL, comma-separated: what a client or worker is given."""
        return ",".join(self.node_urls(user))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = META_LEADER_TIMEOUT_S) -> None:
        """Start every node, then wait for a meta leader; stop them all on failure."""
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready()
            self.wait_for_meta_leader(timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_for_meta_leader(self, timeout_s: float = META_LEADER_TIMEOUT_S) -> str:
        """Until every running node follows one meta leader of the whole cluster; its name."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_if_exited()
            leader = self.meta_leader()
            if leader:
                return leader
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"the {self.size}-node cluster elected no JetStream meta leader in "
                    f"{timeout_s:g}s: {self.nodes[0].log_file}"
                )
            time.sleep(0.05)

    def meta_leader(self) -> str | None:
        """The meta leader that every running node names, with all nodes in its view."""
        running = [n for n in self.nodes if n.pid is not None]
        leaders = set()
        for node in running:
            try:
                meta = node.jsz().get("meta_cluster") or {}
            except OSError:
                return None
            if int(meta.get("cluster_size", 0)) < self.size:
                return None
            leaders.add(meta.get("leader") or "")
        if len(leaders) != 1 or "" in leaders:
            return None
        return leaders.pop()

    def poll(self) -> tuple[str, int] | None:
        """(node, exit code) of a node that exited by itself, else None."""
        for node in self.nodes:
            code = node.poll()
            if code is not None:
                return node.server_name or "", code
        return None

    def _raise_if_exited(self) -> None:
        exited = self.poll()
        if exited is not None:
            name, code = exited
            raise ServerStartError(
                f"nats-server {name} exited (exit code {code}); see {self.node(name).log_file}"
            )

    def kill(self, name: str) -> None:
        """SIGKILL one node, as in a crash."""
        self.node(name).kill()

    def restart(self, name: str, timeout_s: float = META_LEADER_TIMEOUT_S) -> None:
        """Start a stopped or killed node again on its store; wait until it has rejoined."""
        self.node(name).start()
        self.wait_for_meta_leader(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every node (SIGTERM to all first, so they shut down together). Safe twice."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.stop(timeout_s)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _ports(first: int | None, count: int, taken: set[int]) -> Sequence[int]:
    """``first`` + 0, 1, ...; or free ports, none of them ``taken`` already."""
    if first is not None:
        ports = [first + i for i in range(count)]
    else:
        ports = []
        while len(ports) < count:
            port = free_port()
            if port not in taken and port not in ports:
                ports.append(port)
    taken.update(ports)
    return ports
