"""A worker's /metrics over HTTP after known traffic, read with the Prometheus parser."""

from __future__ import annotations

from typing import Any

from broker import RequestFailed
from broker._server import free_port
from devstack import MockProvider
from tests._harness import StartStack, upstream
from tests.test_monitor import scrape

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def histogram(samples: Samples, name: str, **kv: str) -> tuple[float, float, list[float]]:
    """count, sum and the cumulative bucket counts (in le order) of one histogram series."""
    buckets = sorted(
        (float(dict(lbls)["le"]), value)
        for (n, lbls), value in samples.items()
        if n == f"{name}_bucket" and {k: v for k, v in lbls if k != "le"} == kv
    )
    key = labels(**kv)
    return samples[f"{name}_count", key], samples[f"{name}_sum", key], [v for _, v in buckets]


async def test_worker_metrics_after_known_traffic(relay_stack: StartStack) -> None:
    a, b = MockProvider(name="mock-a", tokens=5), MockProvider(name="mock-b", tokens=3)
    pools = {  # 4 slots: one pull for each of a's three routes and one for its own subject
        "a": upstream(a, concurrency=4, max_retries=1, backoff_base_s=0.05),
        "b": upstream(b, concurrency=2),
    }
    routes: dict[str, Any] = {
        "chat": [("a", "gpt")],
        "bad": [("a", "gpt+status=400")],
        "flaky": [("a", "gpt+status=503"), ("b", "claude")],
    }
    port_a, port_b = free_port(), free_port()
    ports = {"a": {"metrics_port": port_a}, "b": {"metrics_port": port_b}}
    async with relay_stack(pools, routes, relay="broker", pool_options=ports) as s:
        done, ids = [], []
        for i in range(4):  # one after the other: one connection serves them all
            handle = await s.relay.submit(f"question {i}", route="chat")
            await handle.text()
            done.append(handle.done)
            ids.append(handle.id)
        reuse = await scrape(f"http://127.0.0.1:{port_a}/metrics")
        try:
            await (await s.relay.submit("x", route="bad")).text()
        except RequestFailed as exc:
            bad_code = exc.code
        flaky = await s.relay.submit("y", route="flaky")
        await flaky.text()
        after = await scrape(f"http://127.0.0.1:{port_a}/metrics")
        on_b = await scrape(f"http://127.0.0.1:{port_b}/metrics")
    served_by_mock_a = a.stats()["requests"]

    a_gpt = {"pool": "a", "model": "gpt"}
    # Requests and connections: 4 requests over 1 connection.
    assert reuse["llmrelay_requests_total", labels(**a_gpt, outcome="ok")] == 4
    assert reuse["llmrelay_upstream_requests_total", labels(pool="a")] == 4
    assert reuse["llmrelay_upstream_connections_opened_total", labels(pool="a")] == 1
    # Tokens as the provider reported them.
    prompt = sum(d.usage.prompt_tokens for d in done if d is not None)
    assert prompt > 0
    assert after["llmrelay_tokens_total", labels(**a_gpt, kind="completion")] == 4 * 5
    assert after["llmrelay_tokens_total", labels(**a_gpt, kind="prompt")] == prompt
    # Histograms: one observation per answered request, cumulative buckets.
    for name in ("llmrelay_request_duration_seconds", "llmrelay_ttft_seconds"):
        count, total, buckets = histogram(after, name, **a_gpt)
        assert count == 4 and total > 0
        assert buckets == sorted(buckets) and buckets[-1] == 4
    # Errors by code, retries, failovers.
    assert bad_code == "bad_request"
    bad = {"pool": "a", "model": "gpt+status=400"}
    flaky_a = {"pool": "a", "model": "gpt+status=503"}
    assert after["llmrelay_errors_total", labels(**bad, code="bad_request")] == 1
    assert after["llmrelay_requests_total", labels(**bad, outcome="error")] == 1
    assert after["llmrelay_errors_total", labels(**flaky_a, code="upstream_unavailable")] == 2
    assert after["llmrelay_retries_total", labels(pool="a")] == 1
    assert after["llmrelay_failovers_total", labels(from_pool="a", to_pool="b")] == 1
    assert after["llmrelay_upstream_requests_total", labels(pool="a")] == served_by_mock_a == 7
    assert on_b["llmrelay_requests_total", labels(pool="b", model="claude", outcome="ok")] == 1
    # Gauges: slots and circuit.
    assert after["llmrelay_slots", labels(pool="a")] == 4
    assert after["llmrelay_slots_busy", labels(pool="a")] == 0
    assert after["llmrelay_circuit_state", labels(pool="a", model="_pool")] == 0
    # Never a request id in a label.
    values = {v for _, lbls in after for _, v in lbls}
    assert not values & {*ids, flaky.id}
