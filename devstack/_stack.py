"""A whole llmrelay on one machine, as real processes: for the demo, the bench and tests.

    async with LocalStack(config_file, pools=["mock-a", "mock-b"], mocks=[...]) as stack:
        stack.client_url, stack.mocks["mock-a"].stats(), ...

``Stack`` holds what one run started (an embedded nats-server, fake providers
as ``llmrelay mock-provider``, ``llmrelay worker`` and ``llmrelay gateway``
processes) and ends all of it in ``close()``: gateways, then workers (all
signalled at once, so they drain in parallel), providers, nats-server.
``close`` is synchronous, so it also runs while an event loop is being torn
down. ``LocalStack`` starts a stack from a config file and fake-provider specs
and waits until every worker's heartbeat is in the KV; the benchmark's
``Cluster`` adds load generators and profilers to a ``Stack``.

Children run in sessions of their own: a Ctrl-C in the terminal reaches only
the parent, which then stops them in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
import httpx
import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError

from broker._errors import ServerStartError
from broker._nats import connect_nats
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, llmrelay_command
from broker._subjects import WORKERS_BUCKET
from devstack.fake_provider import MockProviderProcess

__all__ = [
    "ChildProcess",
    "GatewayProcess",
    "LocalStack",
    "MockSpec",
    "Stack",
    "WorkerProcess",
    "stop_process",
    "wait_for_workers",
]


class MockSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A fake provider to start; ``env`` names the variable a config reads its URL from."""

    name: str
    env: str = ""
    path_suffix: str = ""
    tokens: int = 24
    ttft_ms: float = 0.0
    token_delay_ms: float = 0.0
    fault: str = ""


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM (a worker drains), then SIGKILL if it does not exit in time. Safe twice."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    _wait_or_kill(proc, timeout_s)


def _wait_or_kill(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


# --- llmrelay child processes ------------------------------------------------------


class ChildProcess:
    """``llmrelay ARGS`` as a child process in a session of its own, logging to a file."""

    def __init__(
        self, name: str, args: Sequence[str], log_dir: Path, *, env: Mapping[str, str] | None
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.time_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*llmrelay_command(), *args], env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s)

    def log_tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class WorkerProcess(ChildProcess):
    """``llmrelay worker --pool POOL``."""

    def __init__(
        self,
        pool: str,
        config_file: Path,
        nats_url: str,
        log_dir: Path,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        drain_s: float | None = None,
    ) -> None:
        self.pool = pool
        self.metrics_port = metrics_port
        args = ["worker", "--pool", pool, "--config", str(config_file), "--nats-url", nats_url]
        args += ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
        args += ["--drain-s", str(drain_s)] if drain_s is not None else []
        super().__init__(name or f"worker-{pool}", args, log_dir, env=env)


class GatewayProcess(ChildProcess):
    """``llmrelay gateway`` on ``127.0.0.1:port``; ``await wait_ready()`` before use."""

    def __init__(
        self,
        config_file: Path,
        nats_url: str,
        log_dir: Path,
        *,
        port: int,
        env: Mapping[str, str] | None = None,
        log_level: str = "warning",
    ) -> None:
        self.port = port
        args = ["gateway", "--config", str(config_file), "--nats-url", nats_url]
        args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", log_level]
        super().__init__(f"gateway-{port}", args, log_dir, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until ``/readyz`` answers 200 (NATS connected, route consumers in place)."""
        async with httpx.AsyncClient() as http:
            try:
                with anyio.fail_after(timeout_s):
                    while not await self._ready(http):
                        await anyio.sleep(0.05)
            except TimeoutError:
                raise ServerStartError(
                    f"{self.name} not ready within {timeout_s:g}s: {self.log_tail()}"
                ) from None

    async def _ready(self, http: httpx.AsyncClient) -> bool:
        if self.proc.poll() is not None:
            raise ServerStartError(f"{self.name} exited at start: {self.log_tail()}")
        try:
            return (await http.get(f"{self.url}/readyz")).status_code == 200
        except httpx.TransportError:
            return False


async def wait_for_workers(
    nc: NATS, workers: Sequence[WorkerProcess], timeout_s: float = 20.0
) -> None:
    """Until every worker's heartbeat is in the KV (its pulls are in place by then).

    Heartbeat keys are ``<pool>.<host>-<pid>-<random>``, so each process is found
    by its own pid; a worker that exits while starting fails at once with its log.
    """
    waiting = {w.pid: w for w in workers}
    try:
        with anyio.fail_after(timeout_s):
            while waiting:
                for w in waiting.values():
                    if w.proc.poll() is not None:
                        raise ServerStartError(f"{w.name} exited at start: {w.log_tail()}")
                for key in await _heartbeat_keys(nc):
                    for pid in [p for p in waiting if f"-{p}-" in key]:
                        del waiting[pid]
                if waiting:
                    await anyio.sleep(0.05)
    except TimeoutError:
        tails = "; ".join(f"{w.name}: {w.log_tail()}" for w in waiting.values())
        raise ServerStartError(f"workers did not start within {timeout_s:g}s: {tails}") from None


async def _heartbeat_keys(nc: NATS) -> list[str]:
    try:
        kv = await nc.jetstream().key_value(WORKERS_BUCKET)
        keys: list[str] = await kv.keys()
    except (NotFoundError, BucketNotFoundError, NoKeysError):
        return []  # no worker has created the bucket or beaten yet
    return keys


# --- the stack ------------------------------------------------------------------------

WorkerT = TypeVar("WorkerT", bound=WorkerProcess)


class Stack(Generic[WorkerT]):
    """What one local run started, each part started explicitly; ``close()`` ends all of it."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.server = NatsServer(store_dir=work_dir / "nats")
        self.mocks: dict[str, MockProviderProcess] = {}
        self.workers: list[WorkerT] = []
        self.gateways: list[GatewayProcess] = []

    @property
    def client_url(self) -> str:
        return self.server.url_for(CLIENT_USER)

    @property
    def worker_url(self) -> str:
        return self.server.url_for(WORKER_USER)

    def start_nats(self) -> NatsServer:
        self.server.start()
        return self.server

    def start_mock(self, spec: MockSpec) -> MockProviderProcess:
        mock = MockProviderProcess(
            name=spec.name,
            tokens=spec.tokens,
            ttft_ms=spec.ttft_ms,
            token_delay_ms=spec.token_delay_ms,
            fault=spec.fault or None,
        )
        self.mocks[spec.name] = mock  # before start: close() ends it if start fails
        return mock.start()

    def add_worker(self, worker: WorkerT) -> WorkerT:
        self.workers.append(worker)
        return worker

    def drop_worker(self, worker: WorkerT) -> None:
        """Forget a worker that is gone (killed on purpose)."""
        if worker in self.workers:
            self.workers.remove(worker)

    def add_gateway(self, gateway: GatewayProcess) -> GatewayProcess:
        self.gateways.append(gateway)
        return gateway

    async def wait_for_workers(
        self,
        workers: Sequence[WorkerT] | None = None,
        *,
        nc: NATS | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        """Until ``workers`` (default: all) beat; connects to NATS unless given ``nc``."""
        todo = self.workers if workers is None else workers
        if nc is not None:
            await wait_for_workers(nc, todo, timeout_s)
            return
        own = await connect_nats(self.worker_url, name="llmrelay-devstack")
        try:
            await wait_for_workers(own, todo, timeout_s)
        finally:
            await own.close()

    def close(self) -> None:
        """Stop everything this stack started, gateways first. Safe to call twice."""
        _stop_all(self.gateways)
        _stop_all(self.workers)
        self.gateways.clear()
        self.workers.clear()
        for mock in self.mocks.values():
            mock.close()
        self.mocks.clear()
        self.server.stop()


def _stop_all(children: Sequence[ChildProcess], timeout_s: float = 10.0) -> None:
    """SIGTERM every child first, so they drain at the same time, then wait for each."""
    running = [child.proc for child in children if child.proc.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in running:
        _wait_or_kill(proc, timeout_s)


class LocalStack(Stack[WorkerProcess]):
    """nats-server, the fake providers of ``mocks`` and one worker per entry of ``pools``.

    Each mock's URL is put into ``env`` under ``spec.env``, which the config file
    reads (``${MOCK_A_URL}``); ``async with`` returns once every worker beats.
    """

    def __init__(
        self,
        config_file: str | os.PathLike[str],
        *,
        pools: list[str],
        mocks: list[MockSpec],
        work_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="llmrelay-") if work_dir is None else None
        super().__init__(Path(work_dir or self._tmp.name))  # type: ignore[union-attr]
        self.config_file = Path(config_file).resolve()
        self.pool_names = pools
        self.mock_specs = mocks
        self.env: dict[str, str] = {}

    async def __aenter__(self) -> LocalStack:
        try:
            await anyio.to_thread.run_sync(self._start_processes)
            await self.wait_for_workers()
        except BaseException:
            await anyio.to_thread.run_sync(self.close)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close)

    def _start_processes(self) -> None:
        self.start_nats()
        env = dict(os.environ)
        for spec in self.mock_specs:
            mock = self.start_mock(spec)
            if spec.env:
                env[spec.env] = mock.url + spec.path_suffix
        self.env = env
        for pool in self.pool_names:
            self.add_worker(
                WorkerProcess(pool, self.config_file, self.worker_url, self.work_dir, env=env)
            )

    def close(self) -> None:
        """Stop everything and remove the temporary work directory. Safe to call twice."""
        super().close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
