"""A whole llmrelay on one machine, as real processes: for the demo and benchmarks.

    async with LocalStack(config_file, pools=["mock-a", "mock-b"], mocks=[...]) as stack:
        stack.client_url, stack.mocks["mock-a"].stats(), ...

It starts an embedded nats-server, fake providers (``llmrelay mock-provider``),
and one ``llmrelay worker`` process per pool entry, waits until every worker's
heartbeat is in the KV, and on exit (also on Ctrl-C or an error) stops every
process it started, workers first so they can drain.
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
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError

from broker._errors import ServerStartError
from broker._nats import connect_nats
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, llmrelay_command
from broker._subjects import WORKERS_BUCKET
from workers.mock_provider import MockProviderProcess


class MockSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A fake provider to start; ``env`` names the variable the config reads its URL from."""

    name: str
    env: str
    path_suffix: str = ""
    tokens: int = 24
    ttft_ms: float = 0.0
    token_delay_ms: float = 0.0


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM (a worker drains), then SIGKILL if it does not exit in time. Safe twice."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class WorkerProcess:
    """``llmrelay worker --pool POOL`` as a child process, logging to a file."""

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
        self.name = name or f"worker-{pool}"
        self.metrics_port = metrics_port
        self.log_path = log_dir / f"{self.name}-{time.time_ns()}.log"
        cmd = [*llmrelay_command(), "worker", "--pool", pool, "--config", str(config_file)]
        cmd += ["--nats-url", nats_url]
        cmd += ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
        cmd += ["--drain-s", str(drain_s)] if drain_s is not None else []
        with open(self.log_path, "wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches only the parent,
            # which then stops the worker in order.
            self.proc = subprocess.Popen(
                cmd, env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, as in a crash."""
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


class LocalStack:
    def __init__(
        self,
        config_file: str | os.PathLike[str],
        *,
        pools: list[str],
        mocks: list[MockSpec],
        work_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config_file = Path(config_file).resolve()
        self.pool_names = pools
        self.mock_specs = mocks
        self._tmp = tempfile.TemporaryDirectory(prefix="llmrelay-") if work_dir is None else None
        self.work_dir = Path(work_dir or self._tmp.name)  # type: ignore[union-attr]
        self.server = NatsServer(store_dir=self.work_dir / "nats")
        self.mocks: dict[str, MockProviderProcess] = {}
        self.workers: list[WorkerProcess] = []
        self.env: dict[str, str] = {}

    @property
    def client_url(self) -> str:
        return self.server.url_for(CLIENT_USER)

    @property
    def worker_url(self) -> str:
        return self.server.url_for(WORKER_USER)

    async def __aenter__(self) -> LocalStack:
        try:
            await anyio.to_thread.run_sync(self._start_processes)
            await self._wait_for_workers()
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
        self.server.start()
        env = dict(os.environ)
        for spec in self.mock_specs:
            mock = MockProviderProcess(
                name=spec.name,
                tokens=spec.tokens,
                ttft_ms=spec.ttft_ms,
                token_delay_ms=spec.token_delay_ms,
            ).start()
            self.mocks[spec.name] = mock
            env[spec.env] = mock.url + spec.path_suffix
        self.env = env
        for pool in self.pool_names:
            self.workers.append(
                WorkerProcess(pool, self.config_file, self.worker_url, self.work_dir, env=env)
            )

    async def _wait_for_workers(self) -> None:
        nc = await connect_nats(self.worker_url)
        try:
            await wait_for_workers(nc, self.workers)
        finally:
            await nc.close()

    def close(self) -> None:
        """Stop everything this stack started. Safe to call twice."""
        for w in self.workers:
            w.stop()
        self.workers.clear()
        for mock in self.mocks.values():
            mock.close()
        self.mocks.clear()
        self.server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
