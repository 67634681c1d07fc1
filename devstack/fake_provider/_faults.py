"""Faults: how a fake provider misbehaves, parsed from ``key=value+key=value`` text.

A fault is the server default (``--fault``, ``POST /control/faults``,
``set_fault``) or a suffix of a request's model name, which wins over the
default (``gpt-4o-mini+status=429+retry_after=2``); the keys are listed in the
package docstring and in ``FAULT_KEYS``. ``ERROR_KINDS`` holds each kind of
provider failure in each provider's own words, so one fault reads right in
OpenAI, Anthropic and Ollama answers alike. Invalid faults raise ``ValueError``
(the CLI turns it into a bad-parameter message, the control API into a 400).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "ERROR_KINDS",
    "FAULT_KEYS",
    "ErrorKind",
    "Fault",
    "FaultSpec",
    "error_kind",
    "failure_kind",
    "fault_from_body",
    "parse_fault",
    "planned_status",
    "split_model",
]


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a flag: {value!r}")


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _known_error(value: str) -> str:
    error_kind(value)  # raises ValueError for an unknown kind
    return value


def _millis(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


FAULT_KEYS: dict[str, Callable[[str], Any]] = {
    "status": int,
    "error": _known_error,
    "retry_after": str,
    "retry_after_ms": _count,
    "reset": _flag,
    "noresponse": _flag,
    "stall": _count,
    "cut": _count,
    "malformed": _count,
    "nodone": _flag,
    "error_after": _count,
    "noprefill": _flag,
    "ttft_ms": _millis,
    "token_delay_ms": _millis,
    "tokens": _count,
    "fail_first": _count,
    "cached": _count,
    "reasoning": _count,
    "think": _count,
}
# Keys that shape a good answer (its timing, length and reported usage), not a failure.
_TIMING_KEYS = ("ttft_ms", "token_delay_ms", "tokens", "cached", "reasoning", "think")


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """How to misbehave. Every field unset means: answer normally."""

    status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    retry_after_ms: int | None = None
    reset: bool = False
    noresponse: bool = False
    stall: int | None = None
    cut: int | None = None
    malformed: int | None = None
    nodone: bool = False
    error_after: int | None = None
    noprefill: bool = False
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    tokens: int | None = None
    fail_first: int | None = None
    cached: int | None = None  # prompt tokens the usage reports as read from a cache
    reasoning: int | None = None  # completion tokens the usage reports as reasoning
    think: int | None = None  # reasoning deltas streamed before the answer (``reasoning_tokens``)

    def fails(self) -> bool:
        """True when this fault makes the answer fail in some way (not just slow or short)."""
        return any(
            getattr(self, key) not in (None, False)
            for key in FAULT_KEYS
            if key not in _TIMING_KEYS and key != "fail_first"
        )

    def timing_only(self) -> Fault:
        """This fault without its failures: what a request past ``fail_first`` gets."""
        return Fault(**{key: getattr(self, key) for key in _TIMING_KEYS})

    def as_dict(self) -> dict[str, Any]:
        """The fields that differ from no fault (what ``GET /control/faults`` shows)."""
        defaults = Fault()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


FaultSpec = str | Mapping[str, Any] | Fault | None


def parse_fault(spec: FaultSpec) -> Fault:
    """A ``Fault`` from ``"k=v+k=v"``, its JSON object text, a mapping, or None (no fault)."""
    if spec is None or isinstance(spec, Fault):
        return spec or Fault()
    return Fault(**_fault_fields(spec))


def _fault_fields(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            decoded = msgspec.json.decode(text)
            if not isinstance(decoded, dict):
                raise ValueError("a JSON fault must be an object")
            return _fault_fields(decoded)
        pairs = [part.partition("=") for part in text.split("+") if part.strip()]
        spec = {key.strip(): value for key, _, value in pairs}
    return {key: _convert_fault_value(key, value) for key, value in spec.items()}


def _convert_fault_value(key: str, value: Any) -> Any:
    converter = FAULT_KEYS.get(key)
    if converter is None:
        raise ValueError(f"unknown fault key {key!r} (known: {', '.join(FAULT_KEYS)})")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        return converter(text)
    except ValueError as exc:
        raise ValueError(f"fault {key}={value!r}: {exc}") from exc


@lru_cache(maxsize=4096)
def split_model(model: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``"m+k=v+flag"`` -> ``("m", (("k", v), ("flag", True)))``; raises ValueError."""
    base, _, suffix = model.partition("+")
    return base, tuple(_fault_fields(suffix).items()) if suffix else ()


class ErrorKind(NamedTuple):
    """One kind of provider failure, in each provider's words."""

    status: int
    openai_type: str
    openai_code: str | None
    anthropic_type: str
    message: str


ERROR_KINDS: dict[str, ErrorKind] = {
    "bad_request": ErrorKind(400, "invalid_request_error", None, "invalid_request_error",
                             "Invalid request."),
    "context_length_exceeded": ErrorKind(
        400, "invalid_request_error", "context_length_exceeded", "invalid_request_error",
        "prompt is too long: this model's maximum context length is 8192 tokens.",
    ),
    "content_filter": ErrorKind(400, "invalid_request_error", "content_filter",
                                "invalid_request_error",
                                "Output blocked by content filtering policy."),
    "content_policy_violation": ErrorKind(
        400, "invalid_request_error", "content_policy_violation", "invalid_request_error",
        "Your request was rejected by the content policy.",
    ),
    "auth": ErrorKind(401, "invalid_request_error", "invalid_api_key", "authentication_error",
                      "Incorrect API key provided."),
    "permission": ErrorKind(403, "invalid_request_error", "permission_denied", "permission_error",
                            "Your API key does not have permission to use this model."),
    "not_found": ErrorKind(404, "invalid_request_error", "model_not_found", "not_found_error",
                           "The model does not exist."),
    "timeout": ErrorKind(408, "timeout", None, "timeout_error", "Request timed out."),
    "rate_limit": ErrorKind(429, "requests", "rate_limit_exceeded", "rate_limit_error",
                            "Rate limit reached for requests."),
    "server_error": ErrorKind(500, "server_error", None, "api_error", "Internal server error."),
    "unavailable": ErrorKind(503, "server_error", None, "api_error",
                             "The server is overloaded or not ready yet."),
    "overloaded": ErrorKind(529, "server_error", "overloaded", "overloaded_error", "Overloaded"),
}  # fmt: skip
_KIND_BY_STATUS = {
    400: "bad_request", 401: "auth", 403: "permission", 404: "not_found", 408: "timeout",
    429: "rate_limit", 500: "server_error", 502: "unavailable", 503: "unavailable",
    504: "unavailable", 529: "overloaded",
}  # fmt: skip


def error_kind(name: str) -> ErrorKind:
    """The kind called ``name``; raises ValueError for an unknown one."""
    kind = ERROR_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown error kind {name!r} (known: {', '.join(ERROR_KINDS)})")
    return kind


def failure_kind(fault: Fault) -> ErrorKind:
    """The error a failing answer reports: the fault's ``error``, else the one of its status."""
    if fault.error is not None:
        return error_kind(fault.error)
    status = fault.status or 503
    return error_kind(
        _KIND_BY_STATUS.get(status, "server_error" if status >= 500 else "bad_request")
    )


def planned_status(fault: Fault) -> int:
    """The HTTP status the answer gets (0: none, the socket is reset or never answered)."""
    if fault.reset or fault.noresponse:
        return 0
    if fault.status is not None:
        return fault.status
    if fault.error is not None and fault.error_after is None:
        return error_kind(fault.error).status
    return 200


def fault_from_body(body: bytes) -> FaultSpec:
    """The fault a ``POST /control/faults`` body names: empty, JSON, or ``k=v+k=v`` text."""
    text = body.decode().strip()
    if not text:
        return None
    if text.startswith(("{", '"')):
        decoded = msgspec.json.decode(text)
        if not isinstance(decoded, str | dict):
            raise ValueError("a fault is a JSON object or a 'key=value+key=value' string")
        return decoded
    return text
