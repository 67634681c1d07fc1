"""A whole llmrelay on one machine, as real processes: for the demo and benchmarks.

    async with LocalStack(config_file, pools=["mock-a", "mock-b"], mocks=[...]) as stack:
        stack.client_url, stack.mocks["mock-a"].stats(), ...

It starts an embedded nats-server, fake providers (``llmrelay mock-provider``),
and one ``llmrelay worker`` process per pool entry, waits until every worker's
heartbeat is in the KV, and on exit (also on Ctrl-C or an error) stops every
process it started, workers first so they can drain.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import msgspec
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    NoKeysError,
    NotFoundError,
)

from broker._client import connect_nats
from broker._errors import ServerStartError
from broker._protocol import decode_heartbeat
from broker._server import CLIENT_USER, WORKER_USER, NatsServer
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


class WorkerProcess:
    """``llmrelay worker --pool NAME`` as a child process, logging to a file."""

    def __init__(self, pool: str, config_file: Path, env: Mapping[str, str], log_dir: Path) -> None:
        self.pool = pool
        self.log_path = log_dir / f"worker-{pool}-{os.getpid()}-{id(self)}.log"
        exe = Path(sys.executable).parent / "llmrelay"
        cmd = [str(exe), "worker", "--pool", pool, "--config", str(config_file)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return "(no log)"


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
        env = {**os.environ, "LLMRELAY_NATS_URL": self.worker_url}
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
            self.workers.append(WorkerProcess(pool, self.config_file, env, self.work_dir))

    async def _wait_for_workers(self, timeout_s: float = 20.0) -> None:
        nc = await connect_nats(self.worker_url)
        try:
            with anyio.fail_after(timeout_s):
                while len(await self._live_workers(nc)) < len(self.workers):
                    self._check_alive()
                    await anyio.sleep(0.05)
        except TimeoutError:
            tails = "; ".join(f"{w.pool}: {w.log_tail()}" for w in self.workers)
            raise ServerStartError(
                f"workers did not start within {timeout_s:g}s: {tails}"
            ) from None
        finally:
            await nc.close()

    async def _live_workers(self, nc: Any) -> list[str]:
        js = nc.jetstream()
        try:
            kv = await js.key_value(WORKERS_BUCKET)
            keys = await kv.keys()
        except (NotFoundError, BucketNotFoundError, NoKeysError):
            return []  # no worker has created the bucket or beaten yet
        live = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            if entry.value:
                live.append(decode_heartbeat(entry.value).worker_id)
        return live

    def _check_alive(self) -> None:
        for w in self.workers:
            if w.proc.poll() is not None:
                raise ServerStartError(f"worker for pool {w.pool} exited: {w.log_tail()}")

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
