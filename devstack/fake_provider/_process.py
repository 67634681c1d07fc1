"""Running the fake provider on its own: as ``llmrelay mock-provider``, or as a child process.

The benchmark wants the fake upstream on a core of its own, so
``MockProviderProcess`` runs ``llmrelay mock-provider`` (``serve``) as a child;
the child prints ``listening_line`` once it is bound, and the parent reads the
port from that line (``--port 0`` picks a free one).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import msgspec

from broker._server import llmrelay_command
from devstack.fake_provider._answer import DEFAULT_TOKENS
from devstack.fake_provider._server import MockProvider

__all__ = ["MockProviderProcess", "listening_line", "serve"]


def listening_line(name: str, url: str) -> str:
    """The line a child prints once it is bound; the parent reads the port from it."""
    return f"mock-provider {name} listening on {url}"


async def serve(mock: MockProvider) -> None:
    """Serve until SIGINT/SIGTERM, announcing the bound URL on stdout (for a parent)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with mock:
        print(listening_line(mock.name, mock.url), flush=True)
        await stop.wait()


class MockProviderProcess:
    """``llmrelay mock-provider`` as a child process (a separate core for the benchmark).

    Use as ``with MockProviderProcess(name="mock-a") as proc:`` (or ``async with``);
    ``proc.url`` is ready when the block starts.
    """

    def __init__(
        self,
        *,
        name: str = "mock",
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = DEFAULT_TOKENS,
        ttft_ms: float = 0.0,
        token_delay_ms: float = 0.0,
        fault: str | None = None,
        startup_timeout_s: float = 15.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.args = [
            *("--name", name, "--host", host, "--port", str(port), "--tokens", str(tokens)),
            *("--ttft-ms", str(ttft_ms), "--token-delay-ms", str(token_delay_ms)),
            *(("--fault", fault) if fault else ()),
        ]
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [*llmrelay_command(), "mock-provider", *self.args]

    def start(self) -> MockProviderProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, text=True, env=env)
        line = self._read_line()
        prefix = listening_line(self.name, "")
        if not line.startswith(prefix):
            self.close()
            raise RuntimeError(f"mock-provider did not start: {line!r}")
        self.port = int(line.strip().rsplit(":", 1)[1])
        return self

    def _read_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.startup_timeout_s)
        return self.process.stdout.readline() if ready else ""

    def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/stats").json()
        return result

    def set_fault(self, spec: str | Mapping[str, Any] | None) -> None:
        body = msgspec.json.encode(spec if spec is not None else {})
        httpx.post(f"{self.url}/control/faults", content=body).raise_for_status()

    def __enter__(self) -> MockProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MockProviderProcess:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.close)
