"""Translate what providers say when they fail into the ``ProviderError`` tree.

Every adapter meets the same kinds of failure in slightly different clothes: an
HTTP status with a JSON body (OpenAI ``{"error": {"message", "type", "code"}}``,
Anthropic ``{"type": "error", "error": {"type", "message"}}``, Ollama
``{"error": "..."}``, Google ``{"error": {"code", "message", "status"}}``), the
same JSON arriving mid-stream as an event, or an httpx transport error. This
module is the one place that turns all of them into a ``ProviderError``
subclass, so retry and failover decisions downstream depend on the class alone,
never on a provider's wording.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import msgspec

from broker._errors import (
    AuthFailed,
    ContentFiltered,
    ContextLengthExceeded,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    StreamInterrupted,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamUnavailable,
)

# Error ``type``/``code`` values that imply a status when none came with them
# (an error event inside a 200 stream).
_STATUS_BY_CODE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "api_error": 500,
    "server_error": 500,
    "overloaded_error": 529,
    "overloaded": 529,
    "context_length_exceeded": 400,
    "content_filter": 400,
    "content_policy_violation": 400,
    # Google's canonical ``status`` names (Gemini's error body).
    "invalid_argument": 400,
    "failed_precondition": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "resource_exhausted": 429,
    "internal": 500,
    "unavailable": 503,
    "deadline_exceeded": 504,
}
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_PHRASES = (
    "context length",
    "context_length",
    "maximum context",
    "context window",
    "context size",
    "prompt is too long",
    "prompt too long",
    "input length exceeds",
    "exceeds the maximum number of tokens",  # Gemini's "The input token count (N) exceeds ..."
    "input is too long",  # Bedrock's "Input is too long for requested model."
)
_OVERLOADED_CODES = frozenset({"overloaded_error", "overloaded"})
_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
_FILTER_PHRASES = ("content filter", "content management policy", "content policy")
# Google answers a wrong key with 400 INVALID_ARGUMENT (reason API_KEY_INVALID).
_AUTH_PHRASES = ("api key not valid",)
_MAX_MESSAGE_CHARS = 500


# The longest wait a provider's Retry-After may impose. A 429 pauses the whole
# pool (every worker stops pulling), so the provider's word is not taken for
# longer than the longest common rate-limit window, a minute: past it, the pool
# tries again, and a provider still over its limit answers with a new 429.
MAX_RETRY_AFTER_S = 60.0


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a 429/503 asks for: ``retry-after-ms``, else ``Retry-After`` seconds or date.

    At most ``MAX_RETRY_AFTER_S``; an unreadable value (``nan`` included) is no value.
    """
    millis = _float(headers.get("retry-after-ms"))
    if millis is not None:
        return _bounded(millis / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _float(value)
    wait = seconds if seconds is not None else _from_http_date(value, now)
    return None if wait is None else _bounded(wait)


def _bounded(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _from_http_date(value: str, now: float | None) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


def error_for_status(status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
    """The error for an HTTP status answer with its (small) body."""
    payload = _decode(body)
    codes, message = _describe(payload)
    if not message:
        message = body.decode("utf-8", "replace").strip()[:_MAX_MESSAGE_CHARS]
    message = message or f"HTTP {status}"
    cls = _classify(status, codes, message)
    wait = retry_after_s(headers) if cls in (RateLimited, UpstreamUnavailable) else None
    return cls(message, status=status, retry_after_s=wait)


def error_for_payload(payload: Any) -> ProviderError:
    """The error for an error object found inside a stream (no HTTP status)."""
    codes, message = _describe(payload)
    message = message or "error event in stream"
    status = next((_STATUS_BY_CODE[c] for c in codes if c in _STATUS_BY_CODE), None)
    return _classify(status, codes, message)(message, status=status)


def error_for_transport(exc: httpx.RequestError, *, headers_received: bool) -> ProviderError:
    """A transport failure: before the response headers it is a connect problem.

    A request that h11 refuses to send (an illegal header value) is the request's
    fault, not the provider's; its text would echo the header, so it is dropped.
    """
    if isinstance(exc, httpx.LocalProtocolError):
        return UpstreamRejected(
            "the request could not be sent: a header or the body is not valid HTTP "
            "(nothing reached the provider)"
        )
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if headers_received:
        return StreamInterrupted(f"stream broke: {detail}")
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return ProviderTimeout(f"no response: {detail}")
    return UpstreamConnectError(f"could not reach the provider: {detail}")


def _decode(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None


def _describe(payload: Any) -> tuple[frozenset[str], str]:
    """(type/code/status tokens, human message) from any of the providers' error shapes."""
    if not isinstance(payload, dict):
        return frozenset(), ""
    error = payload.get("error", payload)
    if isinstance(error, str):
        return frozenset(), error[:_MAX_MESSAGE_CHARS]
    if not isinstance(error, dict):
        return frozenset(), ""
    codes = frozenset(
        str(error[key]).lower() for key in ("type", "code", "status") if error.get(key) is not None
    )
    return codes, str(error.get("message") or "")[:_MAX_MESSAGE_CHARS]


def _classify(status: int | None, codes: frozenset[str], message: str) -> type[ProviderError]:
    if status == 429:
        return RateLimited
    lowered = message.lower()
    if status in (401, 403) or any(p in lowered for p in _AUTH_PHRASES):
        return AuthFailed
    if (status is not None and (status == 408 or status >= 500)) or codes & _OVERLOADED_CODES:
        return UpstreamUnavailable
    if codes & _CONTEXT_CODES or any(p in lowered for p in _CONTEXT_PHRASES):
        return ContextLengthExceeded
    if codes & _FILTER_CODES or any(p in lowered for p in _FILTER_PHRASES):
        return ContentFiltered
    # An unexplained error event inside a stream is the provider's failure, not ours.
    return UpstreamUnavailable if status is None else UpstreamRejected
