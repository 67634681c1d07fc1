"""One exception tree for llmrelay. Every class carries its stable ``code``, its
``retryable`` flag and its ``http_status``; every code table is derived from it.

    RelayError                      internal                  500  (root)
    ├── ConfigError                 config_error              bad llmrelay.yaml (names the key path)
    ├── ServerStartError            server_start_failed       the embedded nats-server did not start
    ├── BenchError                  bench_failed              a bench process failed
    ├── BrokerUnavailable           service_unavailable  503  NATS trouble (translated)
    │   └── ConnectFailed           connect_failed            no server at the URL, bad credentials
    ├── JetStreamApiError           jetstream_error           the JetStream API answered an error
    ├── DlqAccessError              dlq_unavailable      403  these credentials cannot read the DLQ
    ├── DeadLetterNotFound          not_found            404  no such dead letter
    ├── InvalidApiKey               invalid_api_key      401  (gateway) missing or wrong bearer key
    ├── DuplicateRequest            duplicate_request    409  (client) request id submitted before
    ├── LeaseLost                   lease_lost                (worker) its delivery was taken back
    ├── InvalidJob            wire  invalid_job          400  ``field`` names the job field
    │   └── InvalidRequest          invalid_job          400  (gateway) ``param`` names the field
    ├── UnknownRoute          wire  unknown_route        404
    ├── PayloadTooLarge       wire  payload_too_large    413
    ├── QueueFull             wire  queue_full           429
    ├── DeadlineExceeded      wire  deadline_exceeded    504
    ├── Cancelled             wire  cancelled            499
    ├── RequestFailed               (the code of the ``error`` event; ``attempts`` says where)
    │   ├── AllProvidersFailed wire all_providers_failed 502
    │   └── InternalError     wire  internal             500
    └── ProviderError               one upstream attempt failed (worker side)
        ├── UpstreamRejected      wire bad_request             no retry (other 4xx)
        │   └── FeatureUnsupported     bad_request             to a target that maps it
        ├── ContentFiltered       wire content_filtered        no retry
        ├── ContextLengthExceeded wire context_length_exceeded only to a larger target
        ├── AuthFailed            wire auth_failed             fail over now, open pool circuit
        ├── RateLimited           wire rate_limited            429, retry_after_s; no circuit
        ├── UpstreamUnavailable   wire upstream_unavailable    5xx, 408, overloaded
        ├── ProviderTimeout       wire upstream_timeout        no first token: fail over at once
        ├── UpstreamConnectError  wire connect_error           retry, fail over; pool circuit
        ├── StreamInterrupted     wire stream_interrupted      mid-stream: fail over
        │   └── StreamReset            stream_interrupted      (gateway) sent text was voided
        ├── BadUpstreamEvent      wire bad_upstream_event      mid-stream: fail over
        ├── CircuitOpen           wire circuit_open            fail over at once, no call made
        └── CannotContinue        wire cannot_continue         mid-stream: no target could continue

``wire`` classes name the codes an ``error`` event may carry (``ERROR_CODES``,
``llmrelay schema --codes``, README); their first docstring line is the code's
description. Foreign errors (nats, httpx, msgspec) are translated where they
enter, with ``raise Mine(...) from exc``: NATS in ``broker/_nats.py``, httpx in
``workers/providers/_http.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from broker._protocol import Attempt


class RelayError(Exception):
    """Root of every error llmrelay raises on purpose."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = True
    http_status: ClassVar[int] = 500
    # Part of the wire vocabulary: an ``error`` event may carry this code.
    wire: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- local errors: raised in a process, never sent as an event ------------------------


class ConfigError(RelayError):
    """The config file is missing, malformed or invalid."""

    code = "config_error"
    retryable = False


class ServerStartError(RelayError):
    """The embedded nats-server did not start."""

    code = "server_start_failed"
    retryable = False


class BenchError(RelayError):
    """A benchmark process failed to start or to report."""

    code = "bench_failed"
    retryable = False


class BrokerUnavailable(RelayError):
    """NATS could not carry the request now (disconnected, timed out); retry shortly."""

    code = "service_unavailable"
    http_status = 503


class ConnectFailed(BrokerUnavailable):
    """Could not connect to NATS (no server, or bad credentials)."""

    code = "connect_failed"


class JetStreamApiError(RelayError):
    """The JetStream API answered with an error (``status``, ``err_code``)."""

    code = "jetstream_error"

    def __init__(self, message: str, *, status: int = 0, err_code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.err_code = err_code


class DlqAccessError(RelayError):
    """The server did not answer a DLQ request (usually: a user without operator rights)."""

    code = "dlq_unavailable"
    retryable = False
    http_status = 403


class DeadLetterNotFound(RelayError):
    """No DLQ entry by that sequence number or request id."""

    code = "not_found"
    retryable = False
    http_status = 404


class InvalidApiKey(RelayError):
    """The request's bearer key is missing or not one of ``gateway.api_keys``."""

    code = "invalid_api_key"
    retryable = False
    http_status = 401


class DuplicateRequest(RelayError):
    """The request id was already submitted (the jobs stream's duplicate window)."""

    code = "duplicate_request"
    retryable = False
    http_status = 409


class LeaseLost(RelayError):
    """A worker's delivery of a job outlived its ack deadline; another delivery has it."""

    code = "lease_lost"
    retryable = False


# --- the job itself was refused, or ended before an answer ------------------------------


class InvalidJob(RelayError):
    """the job could not be decoded or failed validation"""

    code = "invalid_job"
    retryable = False
    http_status = 400
    wire = True

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the job field at fault (``messages[0].role``), if one is


class InvalidRequest(InvalidJob):
    """The HTTP request body is malformed; ``param`` names the field."""

    wire = False

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownRoute(RelayError):
    """no route (or pinned pool) of that name is configured"""

    code = "unknown_route"
    retryable = False
    http_status = 404
    wire = True


class PayloadTooLarge(RelayError):
    """the job exceeds the maximum payload size"""

    code = "payload_too_large"
    retryable = False
    http_status = 413
    wire = True


class QueueFull(RelayError):
    """the route's bounded queue is at capacity; retry later"""

    code = "queue_full"
    http_status = 429
    wire = True


class DeadlineExceeded(RelayError):
    """the job's deadline passed before it was answered"""

    code = "deadline_exceeded"
    http_status = 504
    wire = True


class Cancelled(RelayError):
    """the client cancelled the request"""

    code = "cancelled"
    retryable = False
    http_status = 499
    wire = True


# --- upstream attempts (worker side) -----------------------------------------------------


class ProviderError(RelayError):
    """An upstream call failed. ``retryable``: worth trying again (here or elsewhere)."""

    code = "upstream_unavailable"
    http_status = 502
    # The pool is not worth another try for this job: move to the next target now.
    failover_now: ClassVar[bool] = False
    # The failure says the stream broke: whatever was sent so far is incomplete.
    mid_stream: ClassVar[bool] = False
    # The failure says something about the provider's health (counts for the circuit),
    # not about the caller's request.
    health: ClassVar[bool] = True
    # A health failure that is the whole pool's (credentials, connection, TLS), not one
    # model's: it counts for the pool-level circuit (workers/_circuit.py).
    pool_level: ClassVar[bool] = False

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class UpstreamRejected(ProviderError):
    """the provider rejected the request as invalid"""

    code = "bad_request"
    retryable = False
    http_status = 400
    wire = True
    health = False


class FeatureUnsupported(UpstreamRejected):
    """A job asks for a feature its target's provider kind does not map (structured
    output, reasoning): it goes to a target that can, else ends as ``bad_request``."""

    wire = False

    def __init__(self, message: str, *, features: frozenset[str]) -> None:
        super().__init__(message)
        self.features = features


class ContentFiltered(ProviderError):
    """the provider refused the content (policy)"""

    code = "content_filtered"
    retryable = False
    http_status = 400
    wire = True
    health = False


class ContextLengthExceeded(ProviderError):
    """the prompt is too long for every model tried"""

    code = "context_length_exceeded"
    retryable = False
    http_status = 400
    wire = True
    health = False


class AuthFailed(ProviderError):
    """the provider rejected the pool's credentials (401/403)"""

    code = "auth_failed"
    wire = True
    failover_now = True
    pool_level = True


class RateLimited(ProviderError):
    """the provider answered 429"""

    code = "rate_limited"
    http_status = 429
    wire = True
    health = False  # a 429 pauses the pool (Retry-After); it never opens a circuit


class UpstreamUnavailable(ProviderError):
    """the provider answered 5xx or overloaded"""

    code = "upstream_unavailable"
    wire = True


class ProviderTimeout(ProviderError):
    """no first token within the pool's time limit"""

    code = "upstream_timeout"
    http_status = 504
    wire = True
    failover_now = True


class UpstreamConnectError(ProviderError):
    """the provider could not be reached"""

    code = "connect_error"
    wire = True
    pool_level = True


class StreamInterrupted(ProviderError):
    """the provider's stream broke or stalled mid-answer"""

    code = "stream_interrupted"
    wire = True
    mid_stream = True


class StreamReset(StreamInterrupted):
    """A reset voided text that was already sent to an HTTP client."""

    wire = False


class BadUpstreamEvent(ProviderError):
    """the provider sent an event that could not be decoded"""

    code = "bad_upstream_event"
    wire = True
    mid_stream = True


class CircuitOpen(ProviderError):
    """the pool's circuit breaker is open"""

    code = "circuit_open"
    http_status = 503
    wire = True
    failover_now = True
    health = False


class CannotContinue(ProviderError):
    """the answer broke mid-stream and could not be continued; retry the request"""

    code = "cannot_continue"
    http_status = 502
    wire = True
    health = False


# --- what a client raises for an ``error`` event -----------------------------------------


class RequestFailed(RelayError):
    """A worker answered with an ``error`` event; ``code`` says which, ``attempts`` where."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        attempts: list[Attempt] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]  # an instance may carry any wire code
        self.retryable = retryable  # type: ignore[misc]
        self.attempts = list(attempts or [])


class AllProvidersFailed(RequestFailed):
    """every target of the route failed; see attempts"""

    code = "all_providers_failed"
    http_status = 502
    wire = True

    def __init__(self, message: str, *, attempts: list[Attempt] | None = None) -> None:
        super().__init__(self.code, message, retryable=True, attempts=attempts)


class InternalError(RequestFailed):
    """a bug in llmrelay; the job was kept in the dead-letter queue"""

    code = "internal"
    wire = True

    def __init__(self, message: str, *, attempts: list[Attempt] | None = None) -> None:
        super().__init__(self.code, message, retryable=True, attempts=attempts)


# --- tables derived from the tree ----------------------------------------------------------


def error_classes(root: type[RelayError] = RelayError) -> Iterator[type[RelayError]]:
    """Every class of the tree, depth first in definition order."""
    yield root
    for sub in root.__subclasses__():
        yield from error_classes(sub)


def _description(cls: type[RelayError]) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0]


_WIRE: dict[str, type[RelayError]] = {}
for _cls in error_classes():
    if _cls.wire:
        _WIRE.setdefault(_cls.code, _cls)

# The stable wire codes, in tree order: code -> (description, retryable, HTTP status).
ERROR_CODES: dict[str, tuple[str, bool, int]] = {
    code: (_description(cls), cls.retryable, cls.http_status) for code, cls in _WIRE.items()
}

_STATUS: dict[str, int] = {}
for _cls in error_classes():
    _STATUS.setdefault(_cls.code, _cls.http_status)


def http_status(code: str) -> int:
    """The HTTP analogue of any code of the tree (502 for a code it does not know)."""
    return _STATUS.get(code, 502)


def is_wire_code(code: str) -> bool:
    return code in _WIRE


def error_from_event(
    code: str, message: str, retryable: bool, attempts: list[Attempt]
) -> RelayError:
    """The exception a client raises for an ``error`` event.

    A refusal of the job itself (``queue_full``, ``unknown_route``, ...) raises its
    own class; every other code raises ``RequestFailed`` (or its subclass for that
    code) carrying the attempts.
    """
    cls = _WIRE.get(code)
    if cls is AllProvidersFailed:
        return AllProvidersFailed(message, attempts=attempts)
    if cls is InternalError:
        return InternalError(message, attempts=attempts)
    if cls is not None and not issubclass(cls, ProviderError | RequestFailed):
        return cls(message)
    return RequestFailed(code, message, retryable=retryable, attempts=attempts)
