"""The Google Gemini format: ``GenerateContentResponse`` chunks as SSE ``data:`` events.

``:streamGenerateContent`` streams (as SSE, which the adapter asks for with
``?alt=sse``; the JSON-array stream without it is not served), and
``:generateContent`` answers with one JSON response. Every token is a chunk of
one candidate; the last chunk carries ``finishReason`` and ``usageMetadata``,
and nothing follows it. Errors are Google's body (``{"error": {"code",
"message", "status"}}``), also mid-stream as a ``data:`` chunk; a content-filter
error mid-stream is a blocked prompt (``promptFeedback.blockReason``), as
Gemini says it. A last ``contents`` turn of role ``model`` is a prefill, which
the answer continues.

A plan with a tool call (``Plan.tool``) is one ``functionCall`` part, whole in one
event (``args`` an object, and an ``id``, as a recent API gives one), then the last
chunk, whose ``finishReason`` is ``STOP`` as Gemini's is after calls; a whole
answer cut by ``maxOutputTokens`` calls with ``{}``. A turn of ``functionResponse``
parts that does not answer the call turn just before it, call for call, is refused
with Google's 400.
"""

from __future__ import annotations

from typing import Any

import msgspec

from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import SSE, HttpRequest, json_response
from devstack.fake_provider._plan import ChatRequest, Plan, Prefill, ToolCall

__all__ = ["GEMINI_PREFIX", "GeminiFormat", "gemini_refusal"]

GEMINI_PREFIX = b"/v1beta/models/"
GEMINI_NO_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)

# Google's canonical status names for the HTTP statuses the fake answers.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 529: "UNAVAILABLE",
}  # fmt: skip
_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
_NOPREFILL = ErrorKind(
    400, "invalid_request_error", None, "invalid_request_error",
    "Please ensure that multiturn requests end with a user role or a function response.",
)  # fmt: skip
_NO_CALL_TURN = (
    "Please ensure that function response turn comes immediately after a function call turn."
)
_UNANSWERED = (
    "Please ensure that the number of function response parts is equal to the number of "
    "function call parts of the function call turn."
)


class GeminiFormat:
    """``/v1beta/models/<model>:streamGenerateContent`` (``stream=True``) or
    ``:generateContent``: the path, not the body, says whether to stream."""

    content_type = SSE

    def __init__(self, *, stream: bool) -> None:
        self._stream = stream

    def wants_stream(self, request: ChatRequest) -> bool:
        return self._stream

    def limit(self, request: ChatRequest) -> int | None:
        config = request.generation_config
        return config.max_output_tokens if config is not None else None

    def prefill(self, request: ChatRequest) -> Prefill | None:
        _check_function_turns(request)  # the turns are read here first: checked here too
        contents = request.contents
        if not contents or contents[-1].role != "model":
            return None
        return Prefill("".join(part.text for part in contents[-1].parts))

    def noprefill_body(self) -> Any:
        return self.error_body(_NOPREFILL)

    def opening(self, plan: Plan) -> list[bytes]:
        """Reasoning (``think=N``) first, as ``thought`` parts (``includeThoughts``)."""
        events = []
        for text in plan.reasoning:
            content = {"parts": [{"text": text, "thought": True}], "role": "model"}
            event = {"candidates": [{"content": content, "index": 0}], "modelVersion": plan.model}
            events.append(b"data: %s\r\n\r\n" % msgspec.json.encode(event))
        return events

    def token_events(self, plan: Plan) -> list[bytes]:
        if plan.tool is not None:  # a call comes whole, in one event
            content = {"parts": [_function_call(plan.tool, plan)], "role": "model"}
            event = {"candidates": [{"content": content, "index": 0}], "modelVersion": plan.model}
            return [b"data: %s\r\n\r\n" % msgspec.json.encode(event)]
        prefix = b'data: {"candidates":[{"content":{"parts":[{"text":'
        suffix = b'}],"role":"model"},"index":0}],"modelVersion":%s}\r\n\r\n' % (
            msgspec.json.encode(plan.model)
        )
        return [prefix + text + suffix for text in plan.deltas()]

    def closing(self, plan: Plan) -> list[bytes]:
        return [b"data: %s\r\n\r\n" % msgspec.json.encode(self._response(plan, ""))]

    def terminator(self, plan: Plan) -> list[bytes]:
        return []

    def garbage(self) -> bytes:
        return b'data: {"candidates":[{"content": <<not json>>\r\n\r\n'

    def stream_error(self, kind: ErrorKind) -> bytes:
        if kind.openai_code in _FILTER_CODES:
            payload: Any = {"promptFeedback": {"blockReason": "SAFETY"}}
        else:
            payload = self.error_body(kind)
        return b"data: %s\r\n\r\n" % msgspec.json.encode(payload)

    def error_body(self, kind: ErrorKind) -> Any:
        status = _STATUS_NAMES.get(kind.status, "UNKNOWN")
        return {"error": {"code": kind.status, "message": kind.message, "status": status}}

    def full(self, plan: Plan) -> Any:
        response = self._response(plan, plan.answer)
        parts = response["candidates"][0]["content"]["parts"]
        if plan.tool is not None:
            parts[:] = [_function_call(plan.tool, plan)]
        if plan.reasoning:
            parts.insert(0, {"text": "".join(plan.reasoning), "thought": True})
        return response

    def _response(self, plan: Plan, text: str) -> dict[str, Any]:
        candidate = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "MAX_TOKENS" if plan.length_limited else "STOP",
            "index": 0,
        }
        usage = {
            "promptTokenCount": plan.prompt_tokens,
            "candidatesTokenCount": plan.tokens,
            "totalTokenCount": plan.prompt_tokens + plan.tokens,
        }
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": plan.model}


def _function_call(tool: ToolCall, plan: Plan) -> dict[str, Any]:
    """``tool`` as a ``functionCall`` part: its arguments an object (``{}`` when cut)."""
    args = {} if plan.length_limited else msgspec.json.decode(tool.arguments)
    return {"functionCall": {"id": tool.id, "name": tool.name, "args": args}}


def _check_function_turns(request: ChatRequest) -> None:
    """Refuse (``ValueError``: a 400) what Google refuses: a turn of function responses
    that does not follow a ``model`` turn of calls, or answers fewer or more calls."""
    contents = request.contents
    for before, turn in zip([None, *contents], contents, strict=False):
        responses = turn.tool_results()
        if not responses:
            continue
        calls = [p for p in before.parts if p.function_call is not None] if before else []
        if before is None or before.role != "model" or not calls:
            raise ValueError(_NO_CALL_TURN)
        if responses != len(calls):
            raise ValueError(_UNANSWERED)


def gemini_refusal(request: HttpRequest) -> bytes | None:
    """What Google answers a request without a key (header or ``key=``; None: it has one)."""
    query = request.query
    if request.goog_api_key or query.startswith(b"key=") or b"&key=" in query:
        return None
    error = {"code": 403, "message": GEMINI_NO_KEY, "status": "PERMISSION_DENIED"}
    return json_response(403, {"error": error})
