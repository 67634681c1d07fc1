"""No manual recovery: server restarts, graceful drains, workers handing jobs back."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from nats.aio.client import Client as NATS

from broker import Chunk, Done, Notice, RelayClient
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, free_port
from tests._harness import mock_pool, relay_config, running_workers
from workers.mock_provider import MockProvider, expected_answer


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


def _worker_process(
    cfg_doc: dict[str, Any], tmp: Path, url: str, *extra: str
) -> subprocess.Popen[bytes]:
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg_doc))
    exe = Path(sys.executable).parent / "llmrelay"
    proc = subprocess.Popen(
        [str(exe), "worker", "--pool", "a", "--config", str(path), "--nats-url", url, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    assert "serving pool" in proc.stderr.readline().decode()
    return proc


async def test_sigterm_lets_the_running_answer_finish(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    async with MockProvider(name="p", tokens=15, token_delay_ms=40) as mock:
        pool = mock_pool(mock.url)
        doc = {"pools": {"a": pool}, "routes": {"chat": {"targets": [{"pool": "a", "model": "m"}]}}}
        cfg = relay_config({"a": pool}, {"chat": [("a", "m")]})
        proc = _worker_process(doc, tmp_path, worker_url, "--drain-s", "10")
        try:
            async with RelayClient(client_url, config=cfg) as relay:
                handle = await relay.submit("story", route="chat")
                events = handle.events()
                assert isinstance(await anext(events), Chunk)
                proc.send_signal(signal.SIGTERM)
                rest = [e async for e in events]
            code = await anyio.to_thread.run_sync(proc.wait, 10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0
    assert not any(isinstance(e, Notice) for e in rest)  # finished in place, no reset
    assert isinstance(rest[-1], Done) and rest[-1].attempt == 1
    assert mock.stats()["requests"] == 1


async def test_drain_timeout_hands_the_job_to_another_worker(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    async with MockProvider(name="p", tokens=20, token_delay_ms=50) as mock:
        pool = mock_pool(mock.url)
        doc = {"pools": {"a": pool}, "routes": {"chat": {"targets": [{"pool": "a", "model": "m"}]}}}
        cfg = relay_config({"a": pool}, {"chat": [("a", "m")]})
        proc = _worker_process(doc, tmp_path, worker_url, "--drain-s", "0.2")
        try:
            async with RelayClient(client_url, config=cfg) as relay:
                handle = await relay.submit("story", route="chat")
                events = handle.events()
                assert isinstance(await anext(events), Chunk)
                proc.send_signal(signal.SIGTERM)
                code = await anyio.to_thread.run_sync(proc.wait, 10)
                async with running_workers(cfg, ["a"], worker_url):
                    rest = [e async for e in events]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0
    resets = [e for e in rest if isinstance(e, Notice) and e.reset]
    assert resets, "the second worker must announce the restart"
    final = [e.delta for e in rest if isinstance(e, Chunk) and e.attempt == resets[-1].attempt]
    assert "".join(final) == expected_answer("p", 20)
    assert isinstance(rest[-1], Done)
