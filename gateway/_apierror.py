"""Errors as the client gets them: OpenAI's error object and an HTTP status.

Every error has a stable ``code`` and the HTTP analogue of that code, taken
from the error tree (``broker._errors.http_status``): queue full 429 (with
Retry-After), deadline 504, every provider failed 502 (the message and an
``attempts`` list give every attempt's reason), content policy and other client
errors 400 (the provider's reason), unknown route 404, a malformed body 400
(``param`` names the field), a bad key 401.

An error raised while a request is accepted is told to the client as it is
when it is about the request (its key, its body, its route, a full queue);
anything else, NATS trouble included, means the broker is unavailable (503).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from broker._errors import (
    InvalidApiKey,
    InvalidJob,
    InvalidRequest,
    PayloadTooLarge,
    QueueFull,
    RelayError,
    UnknownRoute,
    http_status,
)
from broker._protocol import Attempt, Error
from gateway._responses import AttemptInfo, ErrorBody, ErrorObject, json_response

# Errors raised before a job is answered that are about the request itself.
_TOLD_AS_THEY_ARE = InvalidApiKey | InvalidJob | UnknownRoute | PayloadTooLarge | QueueFull


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    """An error as the client gets it: a status code and OpenAI's error object."""

    status: int
    code: str
    message: str
    param: str | None = None
    attempts: list[Attempt] = []
    headers: dict[str, str] = {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> ErrorBody:
        error = ErrorObject(message=self.message, type=self.type, param=self.param, code=self.code)
        if self.attempts:
            error = msgspec.structs.replace(error, attempts=[_info(a) for a in self.attempts])
        return ErrorBody(error=error)

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


def status_for(code: str) -> int:
    """The HTTP status of an error code (the code's HTTP analogue in the error tree)."""
    return http_status(code)


def api_error(code: str, message: str, *, retry_after_s: int = 0, **fields: Any) -> ApiError:
    """An ``ApiError`` for ``code``; a 429 or 503 tells the client when to retry."""
    status = status_for(code)
    if retry_after_s and status in (429, 503):
        fields["headers"] = {**fields.get("headers", {}), "retry-after": str(retry_after_s)}
    return ApiError(status=status, code=code, message=message, **fields)


def error_from_event(event: Error, *, retry_after_s: int) -> ApiError:
    """The client's view of an ``error`` event: every failed attempt's reason included."""
    message = event.message
    if event.code == "all_providers_failed" and event.attempts:
        message = f"{message}. Attempts: " + "; ".join(_attempt_line(a) for a in event.attempts)
    return api_error(
        event.code, message, attempts=list(event.attempts), retry_after_s=retry_after_s
    )


def error_from_exception(exc: RelayError, *, retry_after_s: int) -> ApiError:
    """The client's view of an error raised while accepting a request."""
    if not isinstance(exc, _TOLD_AS_THEY_ARE):
        message = f"the broker is unavailable: {exc.message}"
        return api_error("service_unavailable", message, retry_after_s=retry_after_s)
    param = exc.param if isinstance(exc, InvalidRequest) else None
    if isinstance(exc, UnknownRoute):
        param = "model"
    return api_error(exc.code, exc.message, param=param, retry_after_s=retry_after_s)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such path, wrong method) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = "not_found" if exc.status_code == 404 else "invalid_request"
    return ApiError(status=exc.status_code, code=code, message=message).response()


def _attempt_line(a: Attempt) -> str:
    status = f" (HTTP {a.status})" if a.status else ""
    return f"{a.pool}/{a.model}: {a.code}{status}: {a.message}"


def _info(a: Attempt) -> AttemptInfo:
    return AttemptInfo(pool=a.pool, model=a.model, code=a.code, status=a.status, message=a.message)
