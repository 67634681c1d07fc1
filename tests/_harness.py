"""Run real workers (in this event loop) against real fake providers over HTTP.

``running_workers`` starts workers of a config; ``start_stack`` (the ``relay_stack``
fixture, bound to the session's nats-server) starts a whole relay in one line:

    mock = MockProvider(name="p", tokens=5)
    async with relay_stack({"a": upstream(mock, concurrency=4)}, {"chat": [("a", "m")]}) as s:
        text = await (await s.relay.submit("hi", route="chat")).text()

It enters, in this order, the fake providers, workers, then a ``RelayClient``, and
leaves them in reverse, as the nested ``async with`` blocks it replaces did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import anyio
import openai
import yaml
from nats.aio.client import Client as NATS

from broker import Answer, Config, Event, RelayClient, ensure_topology
from broker._config import parse_config
from broker._nats import connect_nats
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, free_port
from broker._subjects import inbox_prefix
from devstack import MockProvider, WorkerProcess, wait_for_workers
from gateway import serve_gateway
from tests._builders import make_config
from workers._worker import Worker


@asynccontextmanager
async def running_workers(
    config: Config,
    pools: Sequence[str],
    nats_url: str,
    *,
    pool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> AsyncIterator[list[Worker]]:
    """Start one worker per entry of ``pools`` (repeat a name for several); stop on exit.

    ``options`` go to every worker, ``pool_options[pool]`` to that pool's workers only.
    """
    per_pool = pool_options or {}
    async with anyio.create_task_group() as tg:
        workers = [
            Worker(config, p, nats_url=nats_url, drain_s=2.0, **{**options, **per_pool.get(p, {})})
            for p in pools
        ]
        for w in workers:
            await tg.start(w.run)
        try:
            yield workers
        finally:
            for w in workers:
                w.stop()


def mock_pool(url: str, kind: str = "openai", **settings: Any) -> dict[str, Any]:
    base = f"{url}/v1" if kind == "openai" else url
    return {"kind": kind, "base_url": base, "api_key": "sk-test", **settings}


def relay_config(
    pools: dict[str, dict[str, Any]],
    routes: dict[str, Any],
    **kwargs: Any,
) -> Config:
    return make_config(pools, routes, **kwargs)


# --- a whole relay in one `async with` ------------------------------------------------


class NatsUrls(NamedTuple):
    worker: str
    client: str


@dataclass(frozen=True)
class Upstream:
    """A pool served by a fake provider (not yet started): its kind and pool settings."""

    provider: MockProvider
    kind: str = "openai"
    settings: dict[str, Any] = field(default_factory=dict)


# A Bedrock pool's settings for tests: AWS's documented example key (SigV4 is checked by
# the fake provider, never by AWS).
BEDROCK_KEYS: dict[str, Any] = {
    "region": "us-east-1",
    "aws_access_key_id": "AKIDEXAMPLE",
    "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
}


def upstream(provider: MockProvider, kind: str = "openai", **settings: Any) -> Upstream:
    return Upstream(provider, kind, settings)


@dataclass
class RelayStack:
    """What ``start_stack`` started; ``pools`` are the settings the config was built from."""

    providers: dict[str, MockProvider]
    pools: dict[str, dict[str, Any]]
    config: Config
    workers: list[Worker]
    client: RelayClient | None

    @property
    def relay(self) -> RelayClient:
        assert self.client is not None, "this stack was started with relay=None"
        return self.client


# "config": RelayClient(config=...); "broker": a bare RelayClient, which asks the broker.
RelayMode = Literal["config", "broker"] | None
StartStack = Callable[..., AbstractAsyncContextManager[RelayStack]]


@asynccontextmanager
async def start_stack(
    urls: NatsUrls,
    pools: Mapping[str, Upstream],
    routes: dict[str, Any],
    *,
    workers: Sequence[str] | None = None,
    streams: dict[str, Any] | None = None,
    relay: RelayMode = "config",
    pool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **worker_options: Any,
) -> AsyncIterator[RelayStack]:
    """Fake providers, the config over them, workers (default: one per pool), a client.

    ``workers=[]`` starts none (a test starts them later with ``running_workers``);
    ``relay=None`` opens no client. Other keywords are ``running_workers``'s options.
    """
    async with AsyncExitStack() as stack:
        providers = {name: u.provider for name, u in pools.items()}
        for provider in {id(p): p for p in providers.values()}.values():  # one may serve two
            await stack.enter_async_context(provider)
        settings = {n: mock_pool(u.provider.url, u.kind, **u.settings) for n, u in pools.items()}
        config = relay_config(settings, routes, streams=streams)
        pulling = list(pools) if workers is None else workers
        running = running_workers(
            config, pulling, urls.worker, pool_options=pool_options, **worker_options
        )
        started = await stack.enter_async_context(running)
        client = None
        if relay is not None:
            relay_client = RelayClient(urls.client, config=config if relay == "config" else None)
            client = await stack.enter_async_context(relay_client)
        yield RelayStack(providers, settings, config, started, client)


# A raw NATS client connecting as the `client` user reads only its own inboxes
# (nats.conf): it must use this inbox prefix, as llmrelay's own connections do.
CLIENT_INBOX = inbox_prefix(CLIENT_USER[0])


def folded(events: Sequence[Event]) -> Answer:
    """The events as a client folds them (``broker.Answer``): its text, done or error."""
    answer = Answer()
    for event in events:
        answer.add(event)
    return answer


@asynccontextmanager
async def process_primary(
    nc: NATS, worker_url: str, tmp_path: Path, a: MockProvider, b: MockProvider, **pool: Any
) -> AsyncIterator[tuple[Config, WorkerProcess]]:
    """Route ``chat``: pool a (``gpt``) served by a ``llmrelay worker`` process (to kill or
    stop), then pool b (``mb``); ``pool`` settings go to both. The caller runs b's workers."""
    doc = {
        "pools": {"a": mock_pool(a.url, **pool), "b": mock_pool(b.url, **pool)},
        "routes": {"chat": {"targets": [{"pool": "a", "model": "gpt"},
                                        {"pool": "b", "model": "mb"}]}},
    }  # fmt: skip
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(doc))
    config = parse_config(yaml.safe_dump(doc))
    await ensure_topology(nc, config)
    primary = WorkerProcess("a", tmp_path / "relay.yaml", worker_url, tmp_path)
    try:
        await wait_for_workers(nc, [primary])
        yield config, primary
    finally:
        primary.stop()


@asynccontextmanager
async def start_sdk_stack(
    urls: NatsUrls, pools: Mapping[str, Upstream], routes: dict[str, Any], **options: Any
) -> AsyncIterator[tuple[RelayStack, openai.AsyncOpenAI]]:
    """``start_stack`` plus a gateway on it and an ``openai`` SDK client of that gateway
    (no SDK retries): what a test through the OpenAI API needs."""
    async with (
        start_stack(urls, pools, routes, **options) as stack,
        serve_gateway(stack.config, nats_url=urls.client) as base_url,
        openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client,
    ):
        yield stack, client


StartSdkStack = Callable[..., AbstractAsyncContextManager[tuple[RelayStack, openai.AsyncOpenAI]]]


class StreamedCalls(NamedTuple):
    """The tool calls of a streamed chat completion as the SDK user puts them together."""

    calls: list[dict[str, str]]  # by index: id, name, arguments (fragments joined)
    finish_reason: str | None


async def streamed_tool_calls(client: openai.AsyncOpenAI, **ask: Any) -> StreamedCalls:
    """Stream ``ask`` and join the tool-call fragments of each index, as OpenAI documents."""
    stream = await client.chat.completions.create(**ask, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                seen = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                seen["id"] += call.id or ""
                seen["name"] += (call.function.name or "") if call.function else ""
                seen["arguments"] += (call.function.arguments or "") if call.function else ""
    return StreamedCalls([calls[i] for i in sorted(calls)], finish)


async def queued_across_a_server_kill(
    store_dir: Path,
    mock: MockProvider,
    *,
    config_file: Path | None = None,
    more_after: int = 0,
    check: Callable[[NatsServer], None] = lambda server: None,
) -> list[str]:
    """Five jobs accepted with no worker running, the server SIGKILLed and started again
    on the same store, then a worker: the text of every job, in order (``more_after``
    more jobs are submitted once the worker runs). ``check`` looks at the first server."""
    port = free_port()
    server = NatsServer(port=port, store_dir=store_dir, config_file=config_file)
    await anyio.to_thread.run_sync(server.start)
    try:
        check(server)
        cfg = relay_config({"a": mock_pool(mock.url)}, {"chat": [("a", "m")]})
        nc = await connect_nats(server.url_for(WORKER_USER))
        await ensure_topology(nc, cfg)  # the streams, and no worker yet
        await nc.close()
        async with RelayClient(server.url_for(CLIENT_USER), config=cfg) as relay:
            handles = [await relay.submit(f"q{i}", route="chat", timeout_s=30) for i in range(5)]
            server.kill()
            server = NatsServer(
                port=port,
                monitor_port=server.monitor_port,
                store_dir=store_dir,
                config_file=config_file,
            )
            await anyio.to_thread.run_sync(server.start)
            async with running_workers(cfg, ["a"], server.url_for(WORKER_USER)):
                handles += [await relay.submit(f"r{i}", route="chat") for i in range(more_after)]
                return [await handle.text() for handle in handles]
    finally:
        server.stop()
