"""Prometheus metrics of one worker process, in their own registry.

The worker calls the hook methods below at named points of a job's life;
nothing else touches a metric object. Labels are low-cardinality (pool, model,
code, route), never a request id. Served by ``serve()`` on ``--metrics-port``,
on loopback unless ``--metrics-host`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The route of a dead letter that names none (workers/_intake.py INVALID_ROUTE_TOKEN).
INVALID_ROUTE_LABEL = "_invalid"
# The ``model`` of the pool-level circuit's series (one model's circuit: the model's name).
POOL_CIRCUIT_LABEL = "_pool"
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class WorkerMetrics:
    """``host``: where ``serve()`` listens; loopback unless the operator says otherwise
    (``llmrelay worker --metrics-host``), as metrics name pools, models and codes.

    ``routes``: the configured route names. A dead letter's route may come from a
    client's payload (one that is no job but names a route), so any other name is
    labelled ``other``, as unknown models are (``_invalid`` stays); ``None``: no bound.

    ``models``: the pool's configured models (``_context.known_models``), which bound
    the ``model`` label of ``llmrelay_circuit_state`` the same way; its pool-level
    series has ``model="_pool"``.
    """

    def __init__(
        self,
        pool: str,
        registry: CollectorRegistry | None = None,
        *,
        host: str = "127.0.0.1",
        routes: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
    ) -> None:
        self.pool = pool
        self.host = host
        self.known_routes = None if routes is None else {*routes, INVALID_ROUTE_LABEL}
        self.known_models = None if models is None else set(models)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmrelay_requests",
            "Jobs finished by this worker, by outcome",
            ["pool", "model", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "llmrelay_errors",
            "Failed attempts by error code",
            ["pool", "model", "code"],
            registry=r,
        )
        self.retries = Counter(
            "llmrelay_retries", "Delayed retries on the same pool", ["pool"], registry=r
        )
        self.failovers = Counter(
            "llmrelay_failovers",
            "Jobs re-queued to another pool",
            ["from_pool", "to_pool"],
            registry=r,
        )
        self.tokens = Counter(
            "llmrelay_tokens", "Tokens reported by providers", ["pool", "model", "kind"], registry=r
        )
        self.rate_limit_waits = Counter(
            "llmrelay_rate_limit_waits",
            "Times a pull waited for the rate budget",
            ["pool"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmrelay_ttft_seconds",
            "Time from job start to first token",
            ["pool", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llmrelay_request_duration_seconds",
            "Time from job start to done",
            ["pool", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "llmrelay_queue_wait_seconds",
            "Time from submit to a worker starting the job",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "llmrelay_upstream_requests", "HTTP requests sent to the provider", ["pool"], registry=r
        )
        self.connections_opened = Counter(
            "llmrelay_upstream_connections_opened",
            "New TCP connections to the provider",
            ["pool"],
            registry=r,
        )
        self.malformed = Counter(
            "llmrelay_malformed_events",
            "Upstream events that could not be decoded",
            ["pool"],
            registry=r,
        )
        self.dead_letters = Counter(
            "llmrelay_dead_letters",
            "Jobs parked in the dead-letter queue",
            ["route", "code"],
            registry=r,
        )
        self.cost = Counter(
            "llmrelay_cost_usd",
            "USD spent on priced targets: answered attempts, and failed attempts that used tokens",
            ["route", "pool", "model"],
            registry=r,
        )
        # The same spend by route, since this worker started (its heartbeat carries it).
        self.spend_by_route: dict[str, float] = {}
        self.slots_busy = Gauge("llmrelay_slots_busy", "Slots running a job", ["pool"], registry=r)
        self.slots_total = Gauge("llmrelay_slots", "Slots of this worker", ["pool"], registry=r)
        self.circuit = Gauge(
            "llmrelay_circuit_state",
            'Circuit breaker: 0 closed, 1 half-open, 2 open (model="_pool": pool-level)',
            ["pool", "model"],
            registry=r,
        )

    # hooks -------------------------------------------------------------------

    def job_started(self, queued_s: float) -> None:
        self.queue_wait.labels(self.pool).observe(max(0.0, queued_s))

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(self.pool, model).observe(seconds)

    def job_done(
        self, model: str, seconds: float, prompt_tokens: int, completion_tokens: int
    ) -> None:
        self.requests.labels(self.pool, model, "ok").inc()
        self.duration.labels(self.pool, model).observe(seconds)
        self.tokens.labels(self.pool, model, "prompt").inc(prompt_tokens)
        self.tokens.labels(self.pool, model, "completion").inc(completion_tokens)

    def attempt_failed(self, model: str, code: str) -> None:
        self.errors.labels(self.pool, model, code).inc()

    def spent(self, route: str, model: str, usd: float) -> None:
        """What one attempt cost (``model``: a bounded label already)."""
        label = self._route_label(route)
        self.cost.labels(label, self.pool, model).inc(usd)
        self.spend_by_route[label] = self.spend_by_route.get(label, 0.0) + usd

    def job_outcome(self, model: str, outcome: str) -> None:
        self.requests.labels(self.pool, model, outcome).inc()

    def retried(self) -> None:
        self.retries.labels(self.pool).inc()

    def failed_over(self, to_pool: str) -> None:
        self.failovers.labels(self.pool, to_pool).inc()

    def dead_lettered(self, route: str, code: str) -> None:
        self.dead_letters.labels(self._route_label(route), code).inc()

    def _route_label(self, route: str) -> str:
        known = self.known_routes
        return route if known is None or route in known else "other"

    def upstream_request(self) -> None:
        self.upstream_requests.labels(self.pool).inc()

    def connection_opened(self) -> None:
        self.connections_opened.labels(self.pool).inc()

    def malformed_event(self) -> None:
        self.malformed.labels(self.pool).inc()

    def rate_limited_wait(self) -> None:
        self.rate_limit_waits.labels(self.pool).inc()

    def slots(self, busy: int, total: int) -> None:
        self.slots_busy.labels(self.pool).set(busy)
        self.slots_total.labels(self.pool).set(total)

    def circuit_state(self, model: str | None, state: str) -> None:
        """``model`` None: the pool-level circuit."""
        known = self.known_models
        if model is None:
            label = POOL_CIRCUIT_LABEL
        else:
            label = model if known is None or model in known else "other"
        self.circuit.labels(self.pool, label).set(CIRCUIT_VALUES.get(state, 0))

    def serve(self, port: int, addr: str | None = None) -> Any:
        """Serve /metrics on ``addr`` (default: ``host``) in a thread; returns the server
        (``shutdown()`` stops it)."""
        server, _thread = start_http_server(port, addr=addr or self.host, registry=self.registry)
        return server
