"""One exception tree for llmrelay; each class maps to one stable wire ``code``.

    RelayError
    ├── ConfigError            bad llmrelay.yaml (names the key path)
    ├── ConnectFailed          no NATS server at the URL, or bad credentials
    ├── ServerStartError       the embedded nats-server could not start
    ├── InvalidJob             a job that cannot be decoded or validated
    ├── UnknownRoute           no such route / pool
    ├── PayloadTooLarge        the job exceeds the size limit
    ├── QueueFull              the route's bounded queue is at capacity
    ├── DeadlineExceeded       the job's deadline passed
    ├── Cancelled              the client cancelled
    └── RequestFailed          a worker answered with an ``error`` event
                               (``code`` says which; ``attempts`` says where)

Foreign errors (nats, httpx, msgspec) are translated where they enter, with
``raise Mine(...) from exc``.
"""

from __future__ import annotations

from broker._protocol import Attempt


class RelayError(Exception):
    """Root of every error llmrelay raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(RelayError):
    """The config file is missing, malformed or invalid."""

    code = "config_error"


class ConnectFailed(RelayError):
    """Could not connect to NATS."""

    code = "connect_failed"


class ServerStartError(RelayError):
    """The embedded nats-server did not start."""

    code = "server_start_failed"


class InvalidJob(RelayError):
    """The job is malformed."""

    code = "invalid_job"


class UnknownRoute(RelayError):
    """No such route or pool."""

    code = "unknown_route"


class PayloadTooLarge(RelayError):
    """The job is larger than the server accepts."""

    code = "payload_too_large"


class QueueFull(RelayError):
    """The route's queue is full; retry later (HTTP 429)."""

    code = "queue_full"


class DeadlineExceeded(RelayError):
    """The job's deadline passed before an answer came."""

    code = "deadline_exceeded"


class Cancelled(RelayError):
    """The request was cancelled."""

    code = "cancelled"


class RequestFailed(RelayError):
    """A worker answered with an ``error`` event."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        attempts: list[Attempt] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.attempts = list(attempts or [])


_BY_CODE: dict[str, type[RelayError]] = {
    cls.code: cls
    for cls in (InvalidJob, UnknownRoute, PayloadTooLarge, QueueFull, DeadlineExceeded, Cancelled)
}


def error_from_event(
    code: str, message: str, retryable: bool, attempts: list[Attempt]
) -> RelayError:
    """The exception a client raises for an ``error`` event."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        err = cls(message)
        return err
    return RequestFailed(code, message, retryable=retryable, attempts=attempts)
