"""Run real workers (in this event loop) against real fake providers over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from broker import Config
from tests._builders import make_config
from workers._worker import Worker


@asynccontextmanager
async def running_workers(
    config: Config, pools: list[str], nats_url: str, **options: Any
) -> AsyncIterator[list[Worker]]:
    """Start one worker per entry of ``pools`` (repeat a name for several); stop on exit."""
    async with anyio.create_task_group() as tg:
        workers = [Worker(config, p, nats_url=nats_url, drain_s=2.0, **options) for p in pools]
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
