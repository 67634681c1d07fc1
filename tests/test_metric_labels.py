"""Metric labels stay bounded whatever clients send (issue 11, a suspected item).

A raw client (the `client` user) publishes jobs with odd ``route`` fields on a
configured subject, pinned jobs naming routes a pool does not serve, payloads
that are no job but name a route, and pins to unknown pools; the gateway gets
unknown model names. Every label value of every ``llmrelay_*`` sample must be a
configured route, pool or model, or a fixed token.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import httpx
import nats

from broker import Message
from broker._config import Config
from broker._errors import ERROR_CODES
from broker._protocol import Job, encode, now_ms
from broker._server import free_port
from devstack import MockProvider
from gateway import serve_gateway
from tests._harness import CLIENT_INBOX, StartStack, upstream
from tests.test_monitor import scrape
from workers._metrics import WorkerMetrics

ROUTES = {"chat": [("a", "gpt")]}
ODD = ("leak_route_1", "leak-route-2", "Leak Route", "x" * 40)
FIXED = {
    "other",
    "_unknown",
    "_invalid",
    "_pool",  # llmrelay_circuit_state's pool-level series
    "ok",
    "error",
    "true",
    "false",
    "done",
    "prompt",
    "completion",
}


def _job(rid: str, route: str) -> bytes:
    return encode(
        Job(
            id=rid,
            route=route,
            messages=[Message(role="user", content="hi")],
            reply_to=f"llm.reply.{rid}",
            deadline_ms=now_ms() + 60_000,
        )
    )


def allowed(config: Config) -> set[str]:
    names = set(config.routes) | set(config.pools) | FIXED
    names |= {m for p in config.pools.values() for m in p.models}
    names |= {t.model for r in config.routes.values() for t in r.targets}
    return names | set(ERROR_CODES)


def leaks(samples: dict[Any, float], known: set[str], ignore: set[str]) -> set[str]:
    return {
        f"{name}{{{key}={value!r}}}"
        for name, lbls in samples
        if name.startswith("llmrelay_")
        for key, value in lbls
        if key not in ignore and value not in known
    }


async def _publish_odd_jobs(url: str) -> int:
    """Odd jobs as the `client` user; how many the stream took."""
    nc = await nats.connect(url, inbox_prefix=CLIENT_INBOX)
    js, taken = nc.jetstream(), 0
    try:
        for i, route in enumerate(ODD):
            for subject, data in (
                ("llm.jobs.chat", _job(f"r{i}", route)),
                ("llm.pool.a", _job(f"p{i}", route)),
                ("llm.jobs.chat", b'{"route": "%s", "messages": 5}' % route.encode()),
                (f"llm.pool.{route}", _job(f"u{i}", "chat")),
            ):
                with contextlib.suppress(Exception):  # the stream may refuse a subject
                    await js.publish(subject, data, timeout=2.0)
                    taken += 1
    finally:
        await nc.close()
    return taken


async def test_worker_labels_are_configured_names_or_fixed_tokens(
    relay_stack: StartStack, client_url: str
) -> None:
    mock = MockProvider(name="p", tokens=2)
    port = free_port()
    options = {"a": {"metrics_port": port}}
    async with relay_stack({"a": upstream(mock)}, ROUTES, pool_options=options) as s:
        taken = await _publish_odd_jobs(client_url)
        url = f"http://127.0.0.1:{port}/metrics"
        with anyio.fail_after(15):
            while True:
                samples = await scrape(url)
                ended = ("llmrelay_dead_letters_total", "llmrelay_requests_total")
                if sum(v for (n, _), v in samples.items() if n in ended) >= taken:
                    break
                await anyio.sleep(0.1)
    assert taken > 0
    assert leaks(samples, allowed(s.config), {"le"}) == set()


async def test_gateway_labels_are_configured_names_or_fixed_tokens(
    relay_stack: StartStack, client_url: str
) -> None:
    mock = MockProvider(name="p", tokens=2)
    async with (
        relay_stack({"a": upstream(mock)}, ROUTES) as s,
        serve_gateway(s.config, nats_url=client_url) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        for model in (*ODD, "chat"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            await http.post("/chat/completions", json=body)
        samples = await scrape(base_url.removesuffix("/v1") + "/metrics")
    assert any(n.startswith("llmrelay_gateway_requests") for n, _ in samples)
    assert leaks(samples, allowed(s.config), {"le"}) == set()


def test_dead_letter_routes_are_bounded_by_the_configured_routes() -> None:
    metrics = WorkerMetrics("a", routes=["chat"])
    for route in ("chat", "_invalid", *ODD):
        metrics.dead_lettered(route, "invalid_job")
    values = {
        s.labels["route"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "llmrelay_dead_letters_total"
    }
    assert values == {"chat": 1.0, "_invalid": 1.0, "other": float(len(ODD))}
