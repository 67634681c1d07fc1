"""The gateway's Prometheus metrics (``llmrelay_gateway_*``), in a registry of their own.

Requests, time to first text, request duration, requests in flight, resets
(hidden or aborted) and the jobs the gateway cancelled. ``/metrics`` renders them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Prometheus metrics of one gateway process, in their own registry.

    Labels are routes known to the config (anything else is ``_unknown``) and
    stable outcomes (``done``, an error code, ``disconnected``), never a request id.
    With ``multiprocess_dir`` (``--workers N``: prometheus_client's multiprocess
    mode, which the environment variable PROMETHEUS_MULTIPROC_DIR switches on at
    import) ``render()`` sums the values of every worker process.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "llmrelay_gateway_requests",
            "Chat completion requests, by outcome",
            ["route", "stream", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmrelay_gateway_ttft_seconds",
            "Time from an HTTP request to its first text sent",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llmrelay_gateway_request_duration_seconds",
            "Time from an HTTP request to its last byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "llmrelay_gateway_requests_in_flight",
            "Requests being answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.resets = Counter(
            "llmrelay_gateway_stream_resets",
            "Resets: hidden (held text dropped) or aborted (text already sent)",
            ["route", "outcome"],
            registry=r,
        )
        self.cancels = Counter(
            "llmrelay_gateway_cancels",
            "Jobs the gateway cancelled, by reason",
            ["route", "reason"],
            registry=r,
        )

    def finished(self, route: str, stream: bool, outcome: str, duration_s: float) -> None:
        self.requests.labels(route, "true" if stream else "false", outcome).inc()
        self.duration.labels(route).observe(duration_s)

    def first_text(self, route: str, seconds: float) -> None:
        self.ttft.labels(route).observe(seconds)

    def reset(self, route: str, outcome: str) -> None:
        self.resets.labels(route, outcome).inc()

    def cancelled(self, route: str, reason: str) -> None:
        self.cancels.labels(route, reason).inc()

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
