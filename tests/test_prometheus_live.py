"""Every dashboard query returns series on a real Prometheus scraping a running relay.

A relay (three pools' workers, a gateway, the monitor) runs against the session's
nats-server; a real ``prometheus`` (Debian's package; skipped, with the reason,
without it) scrapes their /metrics every second, with the repository's alert rules
loaded. The test waits for every target to be "up", sends traffic that makes the
series exist (answers through the gateway, a failover, a dead letter, a pool whose
rate budget runs out), then asks Prometheus each query of the dashboard, with
Grafana's variables at their "All" value.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
import yaml
from nats.aio.client import Client as NATS

from broker import RequestFailed
from broker._monitor import Monitor
from broker._server import free_port
from devstack import MockProvider
from tests._deploy import (
    RULES,
    as_sent,
    dashboard,
    dashboard_queries,
    prometheus_tool,
)
from tests._harness import StartSdkStack, upstream

# Priced, so that its answers make llmrelay_cost_usd_total (the spend panel).
PRICED_GPT = {"pool": "a", "model": "gpt", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
ROUTES: dict[str, Any] = {
    "chat": [PRICED_GPT, ("b", "claude")],
    "flaky": [("a", "gpt+status=503"), ("b", "claude")],  # fails over to b
    "dead": [("a", "gpt+status=503")],  # no backup: dead-lettered
    "budget": [("c", "gpt")],  # rpm 1: the second pull waits for budget
}
# Dashboard queries that have no series after this test's traffic, with the reason.
# (None today: every panel's event is caused above.)
NOT_CAUSED: dict[str, str] = {}
DEADLINE_S = 60.0


def _scrape_config(targets: dict[str, str]) -> str:
    """prometheus.yml: one job per target (job name -> host:port), scraped every second."""
    return yaml.safe_dump(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
    )


@contextmanager
def prometheus(tmp_path: Path, targets: dict[str, str]) -> Iterator[str]:
    """A real Prometheus on a free port with a temporary store; yields its URL."""
    binary = prometheus_tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(_scrape_config(targets))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _api(http: httpx.AsyncClient, path: str, **params: str) -> Any:
    response = await http.get(path, params=params)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


async def wait_until_scraped(http: httpx.AsyncClient, jobs: int) -> None:
    """Poll /api/v1/targets until every target has been scraped and is up."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            try:
                targets = (await _api(http, "/api/v1/targets"))["activeTargets"]
            except httpx.HTTPError:  # not listening yet, or not ready (503)
                targets = []
            if len(targets) == jobs and all(t["health"] == "up" for t in targets):
                return
            await anyio.sleep(0.2)


async def series_of(http: httpx.AsyncClient, queries: list[str]) -> dict[str, int]:
    """How many series each query returns, polled until all have some or the deadline."""
    found: dict[str, int] = {}
    with anyio.move_on_after(DEADLINE_S):
        while len(found) < len(queries):
            for query in queries:
                if query not in found:
                    result = (await _api(http, "/api/v1/query", query=query))["result"]
                    if result:
                        found[query] = len(result)
            await anyio.sleep(0.5)
    return found


@asynccontextmanager
async def running_monitor(nc: NATS, config: Any) -> AsyncIterator[str]:
    """The queue monitor, ticking twice a second; yields its host:port."""
    monitor = Monitor(nc, config, interval_s=0.5)
    port = monitor.serve(0)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(monitor.run)
            yield f"127.0.0.1:{port}"
            tg.cancel_scope.cancel()
    finally:
        monitor.close()


async def send_traffic(client: openai.AsyncOpenAI, relay: Any) -> None:
    """Answers through the gateway (streamed: TTFT), one failover, one dead letter."""
    for route in ("chat", "chat", "flaky"):
        stream = await client.chat.completions.create(
            model=route, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text, route
    with pytest.raises(RequestFailed):
        await (await relay.submit("x", route="dead")).text()


async def test_every_dashboard_query_returns_series(
    sdk_stack: StartSdkStack, nc: NATS, tmp_path: Path
) -> None:
    prometheus_tool("prometheus")  # skip before starting anything
    mock_a, mock_b = MockProvider(name="mock-a", tokens=3), MockProvider(name="mock-b", tokens=3)
    pools = {
        "a": upstream(mock_a, concurrency=4, max_retries=1, backoff_base_s=0.05),
        "b": upstream(mock_b, concurrency=2),
        "c": upstream(mock_a, concurrency=2, rpm=1),
    }
    ports = {pool: free_port() for pool in pools}
    options = {pool: {"metrics_port": port} for pool, port in ports.items()}
    async with sdk_stack(pools, ROUTES, pool_options=options) as (stack, client):
        gateway = str(client.base_url).removesuffix("/").removesuffix("/v1")
        async with running_monitor(nc, stack.config) as monitor:
            targets = {f"worker-{p}": f"127.0.0.1:{port}" for p, port in ports.items()}
            targets |= {"monitor": monitor, "gateway": gateway.removeprefix("http://")}
            with prometheus(tmp_path, targets) as url:
                async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                    await wait_until_scraped(http, jobs=len(targets))
                    await send_traffic(client, stack.relay)
                    queries = {as_sent(q.expr): q.where for q in dashboard_queries(dashboard())}
                    found = await series_of(http, [q for q in queries if q not in NOT_CAUSED])
                    rules = await _api(http, "/api/v1/rules")
    empty = sorted(f"{where}: {q}" for q, where in queries.items() if q not in found)
    assert empty == sorted(f"{queries[q]}: {q}" for q in NOT_CAUSED), empty
    assert set(NOT_CAUSED) <= set(queries), "NOT_CAUSED names a query the dashboard lacks"
    loaded = [rule for group in rules["groups"] for rule in group["rules"]]
    assert loaded and all(rule["health"] == "ok" for rule in loaded), loaded
