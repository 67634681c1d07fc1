"""No manual recovery: server restarts, graceful drains, workers handing jobs back."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from broker import Chunk, Config, Done, Notice, RelayClient
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, free_port
from devstack import MockProvider, expected_answer
from tests._harness import (
    folded,
    mock_pool,
    queued_across_a_server_kill,
    relay_config,
    running_workers,
)


@pytest.mark.slow
async def test_worker_recovers_when_nats_server_restarts(tmp_path: Path) -> None:
    port, store = free_port(), tmp_path / "store"
    server = NatsServer(port=port, store_dir=store)
    await anyio.to_thread.run_sync(server.start)
    try:
        async with MockProvider(name="p", tokens=3) as mock:
            cfg = relay_config({"a": mock_pool(mock.url)}, {"chat": [("a", "m")]})
            async with running_workers(cfg, ["a"], server.url_for(WORKER_USER)):
                async with RelayClient(server.url_for(CLIENT_USER), config=cfg) as relay:
                    before = await (await relay.submit("one", route="chat")).text()
                server.kill()
                server = NatsServer(port=port, monitor_port=server.monitor_port, store_dir=store)
                await anyio.to_thread.run_sync(server.start)
                async with RelayClient(server.url_for(CLIENT_USER), config=cfg) as relay:
                    handle = await relay.submit("two", route="chat", timeout_s=10)
                    after = await handle.text()
    finally:
        server.stop()
    assert before == after == expected_answer("p", 3)


@pytest.mark.slow
async def test_jobs_queued_when_the_server_is_killed_are_answered_after_its_restart(
    tmp_path: Path,
) -> None:
    """Jobs accepted (PubAck) while no worker runs sit in the file store; the server
    process is SIGKILLed and started again on the same store; a worker then answers every
    one, to callers who waited through the restart (their connections came back)."""
    async with MockProvider(name="p", tokens=3) as mock:
        texts = await queued_across_a_server_kill(tmp_path / "store", mock)
    assert texts == [expected_answer("p", 3)] * 5
    assert mock.stats()["requests"] == 5  # each queued job once, none before the restart


class StreamingWorker:
    """A `llmrelay worker` process of pool `a` that is mid-way through streaming one answer."""

    def __init__(
        self, proc: subprocess.Popen[bytes], cfg: Config, events: AsyncIterator[Any], first: Chunk
    ) -> None:
        self.proc, self.cfg, self.events, self.first = proc, cfg, events, first


@asynccontextmanager
async def streaming_worker(
    mock: MockProvider, urls: tuple[str, str], tmp: Path, drain_s: float
) -> AsyncIterator[StreamingWorker]:
    """Start a worker process, submit one request, return once its first chunk arrived."""
    worker_url, client_url = urls
    pool = mock_pool(mock.url)
    doc = {"pools": {"a": pool}, "routes": {"chat": {"targets": [{"pool": "a", "model": "m"}]}}}
    (tmp / "relay.yaml").write_text(yaml.safe_dump(doc))
    exe = Path(sys.executable).parent / "llmrelay"
    cmd = [str(exe), "worker", "--pool", "a", "--config", str(tmp / "relay.yaml")]
    proc = subprocess.Popen(
        [*cmd, "--nats-url", worker_url, "--drain-s", str(drain_s)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        assert "serving pool" in proc.stderr.readline().decode()
        cfg = relay_config({"a": pool}, {"chat": [("a", "m")]})
        async with RelayClient(client_url, config=cfg) as relay:
            events = (await relay.submit("story", route="chat")).events()
            first = await anext(events)
            assert isinstance(first, Chunk)
            yield StreamingWorker(proc, cfg, events, first)
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigterm_lets_the_running_answer_finish(
    worker_url: str, client_url: str, tmp_path: Path
) -> None:
    mock = MockProvider(name="p", tokens=15, token_delay_ms=40)
    async with mock, streaming_worker(mock, (worker_url, client_url), tmp_path, drain_s=10) as w:
        w.proc.send_signal(signal.SIGTERM)
        rest = [e async for e in w.events]
        code = await anyio.to_thread.run_sync(w.proc.wait, 10)
    assert code == 0
    assert not any(isinstance(e, Notice) for e in rest)  # finished in place, no reset
    assert isinstance(rest[-1], Done) and rest[-1].attempt == 1
    assert mock.stats()["requests"] == 1


async def test_drain_timeout_hands_the_job_to_another_worker(
    worker_url: str, client_url: str, tmp_path: Path
) -> None:
    mock = MockProvider(name="p", tokens=20, token_delay_ms=50)
    async with mock, streaming_worker(mock, (worker_url, client_url), tmp_path, drain_s=0.2) as w:
        w.proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(w.proc.wait, 10)
        async with running_workers(w.cfg, ["a"], worker_url):
            rest = [e async for e in w.events]
    assert code == 0
    # The second worker reads back what the first one sent (LLM_REPLIES) and
    # continues the answer from there: the caller's text stands.
    redelivered, resumed = [e for e in rest if isinstance(e, Notice)]
    assert redelivered.kind == "redelivered" and redelivered.resume and not redelivered.reset
    assert resumed.kind == "resumed" and resumed.offset == redelivered.offset
    assert redelivered.offset and redelivered.offset > 0
    assert folded([w.first, *rest]).text == expected_answer("p", 20)
    assert isinstance(rest[-1], Done)
