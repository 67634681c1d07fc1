"""`llmrelay up` as a user runs it: a real process, real ports, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError

from broker._server import free_port
from tests._harness import CLIENT_INBOX

REPO = Path(__file__).resolve().parent.parent
LLMRELAY = Path(sys.executable).parent / "llmrelay"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
CLIENT_URL_RE = re.compile(r"nats://client:\S+@\S+:\d+")
PID_RE = re.compile(r"\(pid (\d+),")


class UpProcess:
    """A running `llmrelay up` and the lines it printed until it was ready."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.lines: list[str] = []

    async def read_until_ready(self) -> None:
        """Read stdout until "Press Ctrl-C"; fail if the process ends first."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while not self.lines or not self.lines[-1].startswith("Press Ctrl-C"):
                raw = await self.proc.stdout.readline()
                assert raw, f"llmrelay up exited early: {self.lines} {await self._stderr()}"
                self.lines.append(raw.decode().rstrip())

    def output(self) -> str:
        return "\n".join(self.lines)

    def client_url(self) -> str:
        match = CLIENT_URL_RE.search(self.output())
        assert match, self.output()
        return match.group(0)

    def server_pid(self) -> int:
        match = PID_RE.search(self.output())
        assert match, self.output()
        return int(match.group(1))

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()

    async def rest_of_stdout(self) -> str:
        assert self.proc.stdout is not None
        return (await self.proc.stdout.read()).decode()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            return await self.proc.wait()


StartUp = Callable[..., Awaitable[UpProcess]]


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[StartUp]:
    """Start `llmrelay up` on free ports with a temp store; always clean up."""
    started: list[UpProcess] = []

    async def start(*extra: str) -> UpProcess:
        port = free_port()
        args = ["up", "--port", str(port), "--monitor-port", str(free_port())]
        args += ["--store-dir", str(tmp_path / "store"), "--nats-conf", str(REPO / "nats.conf")]
        proc = await asyncio.create_subprocess_exec(
            str(LLMRELAY), *args, *extra, cwd=tmp_path, env=_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        started.append(UpProcess(proc, port))
        return started[-1]

    yield start
    for up in started:
        await _cleanup(up)


async def _cleanup(up: UpProcess) -> None:
    """After a failed test: stop llmrelay up (and its nats-server, if it hangs)."""
    if up.proc.returncode is not None:
        return
    up.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await up.proc.wait()
        return
    except TimeoutError:
        up.proc.kill()
        await up.proc.wait()
    for pid in PID_RE.findall(up.output()):  # every node of a cluster
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
async def start_cluster_up(tmp_path: Path) -> AsyncIterator[StartUp]:
    """`llmrelay up --cluster 3` on three free ports of each kind; always clean up."""
    started: list[UpProcess] = []

    async def start(*extra: str) -> UpProcess:
        port = _free_ports(3)
        args = ["up", "--cluster", "3", "--port", str(port)]
        args += ["--monitor-port", str(_free_ports(3)), "--cluster-port", str(_free_ports(3))]
        args += ["--store-dir", str(tmp_path / "store")]
        args += ["--nats-conf", str(REPO / "nats-cluster.conf")]
        proc = await asyncio.create_subprocess_exec(
            str(LLMRELAY), *args, *extra, cwd=tmp_path, env=_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        started.append(UpProcess(proc, port))
        return started[-1]

    yield start
    for up in started:
        await _cleanup(up)


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    while True:
        first = free_port()
        if all(not _port_is_open(first + i) and _bindable(first + i) for i in range(count)):
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMRELAY_")}
    env["NO_COLOR"] = "1"
    return env


def _port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_up_serves_jetstream_until_ctrl_c(start_up: StartUp) -> None:
    up = await start_up("--config", str(REPO / "llmrelay.example.yaml"))
    await up.read_until_ready()
    assert "ready" in up.lines[0]
    assert "llmrelay worker --pool mock-a" in up.output()
    assert "llmrelay submit" in up.output()

    nc = await nats.connect(up.client_url(), inbox_prefix=CLIENT_INBOX, allow_reconnect=False)
    js = nc.jetstream()
    assert (await js.account_info()).streams >= 4  # the topology from the config
    ack = await js.publish("llm.jobs.chat", b"{}")  # a client may submit
    assert ack.stream == "LLM_JOBS"
    await nc.close()

    assert await up.stop() == 0
    assert not _port_is_open(up.port)
    assert "nats-server stopped (SIGINT)" in await up.rest_of_stdout()


async def test_up_without_config_leaves_topology_to_workers(start_up: StartUp) -> None:
    up = await start_up()  # cwd is an empty temp dir: no llmrelay.yaml
    await up.read_until_ready()
    assert "workers create it on start" in up.output()

    nc = await nats.connect(up.client_url(), inbox_prefix=CLIENT_INBOX, allow_reconnect=False)
    with pytest.raises(NotFoundError):
        await nc.jetstream().stream_info("LLM_JOBS")
    await nc.close()

    assert await up.stop() == 0
    assert not _port_is_open(up.port)


def test_up_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["up", "--port", str(port), "--monitor-port", str(free_port())]
        args += ["--store-dir", str(tmp_path), "--nats-conf", str(REPO / "nats.conf")]
        result = subprocess.run(
            [str(LLMRELAY), *args],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S,
        )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port} is already in use" in lines[0]
    assert "ready" not in result.stdout


async def test_up_cluster_runs_three_nodes_with_r3_streams(
    start_cluster_up: StartUp, tmp_path: Path
) -> None:
    config = tmp_path / "relay.yaml"
    example = (REPO / "llmrelay.example.yaml").read_text()
    config.write_text(example.replace("streams:\n", "streams:\n  replicas: 3\n", 1))
    up = await start_cluster_up("--config", str(config))
    await up.read_until_ready()
    assert "3-node JetStream cluster ready" in up.lines[0], up.output()
    urls = CLIENT_URL_RE.findall(up.output())
    ports = [up.port, up.port + 1, up.port + 2]
    assert [int(u.rsplit(":", 1)[1]) for u in urls[:3]] == ports, up.output()
    assert len(set(PID_RE.findall(up.output()))) == 3
    assert all((tmp_path / "store" / n).is_dir() for n in ("n1", "n2", "n3"))

    nc = await nats.connect(urls[:3], inbox_prefix=CLIENT_INBOX, allow_reconnect=False)
    info = await nc.jetstream().stream_info("LLM_JOBS")
    await nc.close()
    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.leader in ("n1", "n2", "n3")

    assert await up.stop() == 0
    assert not any(_port_is_open(p) for p in ports)
    assert "cluster stopped (SIGINT)" in await up.rest_of_stdout()
