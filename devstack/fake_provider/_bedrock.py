"""The AWS Bedrock ConverseStream format: binary event-stream frames, one per event.

``POST /model/<modelId>/converse-stream`` streams ``messageStart``,
``contentBlockDelta`` (one per token), ``contentBlockStop``, ``messageStop``
(``stopReason``) and ``metadata`` (usage), each a frame of AWS's
``application/vnd.amazon.eventstream`` with its prelude, string headers
(``:event-type``, ``:content-type``, ``:message-type``) and CRC32s;
``/model/<modelId>/converse`` answers with one JSON response. The frames are
encoded here on their own, not with the adapter's parser's code, so a mistake
in one does not hide in the other.

A request needs a SigV4 ``authorization`` header (the fake checks its shape,
not the signature), else 403 ``Missing Authentication Token``, as AWS answers.
Errors are Bedrock's ``{"message": ...}``; mid-stream an ``exception`` frame
(``:exception-type`` e.g. ``throttlingException``). ``garbage()`` is a token
frame whose message CRC is wrong. A last assistant message is a prefill, which
the answer continues (refused when it ends in whitespace, as Anthropic's models
on Bedrock refuse it).

A plan with a tool call (``Plan.tool``: a request whose ``toolConfig`` offers
tools, ``_structured.tool_call``) is one ``toolUse`` block, streamed as Converse
streams one: ``contentBlockStart`` names it (``toolUseId``, ``name``), each token
is a ``contentBlockDelta`` whose ``delta.toolUse.input`` is a fragment of the
input's JSON, and the message stops with ``tool_use``. A whole answer cut by
``maxTokens`` carries an empty ``input``, as the partial JSON does not parse.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgspec

from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import HttpRequest, json_response
from devstack.fake_provider._plan import ChatRequest, Plan, Prefill, ToolCall, trailing_assistant

__all__ = ["BEDROCK_PREFIX", "EVENT_STREAM", "BedrockFormat", "bedrock_refusal", "frame"]

BEDROCK_PREFIX = b"/model/"
EVENT_STREAM = b"application/vnd.amazon.eventstream"
_SIGV4 = b"AWS4-HMAC-SHA256 Credential="
_TRAILING_WHITESPACE = (
    "The model returned the following errors: messages: final assistant content "
    "cannot end with trailing whitespace"
)
_NOPREFILL = ErrorKind(
    400, "invalid_request_error", None, "invalid_request_error",
    "This model doesn't support conversations that end with an assistant turn.",
)  # fmt: skip
# Bedrock's exception names for the statuses the fake answers (mid-stream frames).
_EXCEPTIONS = {
    400: "validationException", 401: "accessDeniedException", 403: "accessDeniedException",
    404: "resourceNotFoundException", 408: "modelTimeoutException",
    429: "throttlingException", 500: "internalServerException",
}  # fmt: skip


def frame(headers: list[tuple[bytes, bytes]], payload: bytes) -> bytes:
    """One event-stream message with string headers (value type 7)."""
    block = b"".join(
        struct.pack(">B", len(name)) + name + b"\x07" + struct.pack(">H", len(value)) + value
        for name, value in headers
    )
    prelude = struct.pack(">II", 16 + len(block) + len(payload), len(block))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + block + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _event(event_type: bytes, payload: Any) -> bytes:
    data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    headers = [(b":event-type", event_type), (b":content-type", b"application/json"),
               (b":message-type", b"event")]  # fmt: skip
    return frame(headers, data)


class BedrockFormat:
    """``/model/<id>/converse-stream`` (``stream=True``) or ``/model/<id>/converse``."""

    content_type = EVENT_STREAM

    def __init__(self, *, stream: bool) -> None:
        self._stream = stream

    def wants_stream(self, request: ChatRequest) -> bool:
        return self._stream

    def limit(self, request: ChatRequest) -> int | None:
        config = request.inference_config
        return config.max_tokens if config is not None else None

    def prefill(self, request: ChatRequest) -> Prefill | None:
        text = trailing_assistant(request)
        if text is None:
            return None
        return Prefill(text, _TRAILING_WHITESPACE if text != text.rstrip() else None)

    def noprefill_body(self) -> Any:
        return self.error_body(_NOPREFILL)

    def opening(self, plan: Plan) -> list[bytes]:
        start = [_event(b"messageStart", {"role": "assistant"}), *_reasoning_events(plan)]
        return start if plan.tool is None else [*start, _tool_start(plan.tool, _index(plan))]

    def token_events(self, plan: Plan) -> list[bytes]:
        template, index = (_TEXT_DELTA if plan.tool is None else _TOOL_DELTA), _index(plan)
        return [_event(b"contentBlockDelta", template % (index, t)) for t in plan.deltas()]

    def closing(self, plan: Plan) -> list[bytes]:
        # metadata comes after messageStop, and nothing after it: no terminator.
        return [
            _event(b"contentBlockStop", {"contentBlockIndex": _index(plan)}),
            _event(b"messageStop", {"stopReason": self._stop_reason(plan)}),
            _event(b"metadata", {"usage": self._usage(plan), "metrics": {"latencyMs": 1}}),
        ]

    def terminator(self, plan: Plan) -> list[bytes]:
        return []

    def garbage(self) -> bytes:
        good = _event(b"contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"?"}}')
        return good[:-1] + bytes([good[-1] ^ 0xFF])

    def stream_error(self, kind: ErrorKind) -> bytes:
        name = _EXCEPTIONS.get(kind.status, "serviceUnavailableException").encode()
        headers = [(b":exception-type", name), (b":content-type", b"application/json"),
                   (b":message-type", b"exception")]  # fmt: skip
        return frame(headers, msgspec.json.encode({"message": kind.message}))

    def error_body(self, kind: ErrorKind) -> Any:
        return {"message": kind.message}

    def full(self, plan: Plan) -> Any:
        content = [_block(plan)]
        if plan.reasoning:
            reasoning = {"reasoningText": {"text": "".join(plan.reasoning)}}
            content.insert(0, {"reasoningContent": reasoning})
        message = {"role": "assistant", "content": content}
        return {
            "output": {"message": message},
            "stopReason": self._stop_reason(plan),
            "usage": self._usage(plan),
            "metrics": {"latencyMs": 1},
        }

    def _stop_reason(self, plan: Plan) -> str:
        if plan.length_limited:
            return "max_tokens"
        return "end_turn" if plan.tool is None else "tool_use"

    def _usage(self, plan: Plan) -> dict[str, int]:
        return {
            "inputTokens": plan.prompt_tokens,
            "outputTokens": plan.tokens,
            "totalTokens": plan.prompt_tokens + plan.tokens,
        }


_TEXT_DELTA = b'{"contentBlockIndex":%d,"delta":{"text":%s}}'
_TOOL_DELTA = b'{"contentBlockIndex":%d,"delta":{"toolUse":{"input":%s}}}'


def _index(plan: Plan) -> int:
    """The answer's content block: after the reasoning block, when there is one."""
    return 1 if plan.reasoning else 0


def _reasoning_events(plan: Plan) -> list[bytes]:
    """Reasoning (``think=N``) as block 0: ``reasoningContent`` deltas, then its stop."""
    if not plan.reasoning:
        return []
    deltas = [
        _event(b"contentBlockDelta",
               {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": text}}})
        for text in plan.reasoning
    ]  # fmt: skip
    return [*deltas, _event(b"contentBlockStop", {"contentBlockIndex": 0})]


def _tool_start(tool: ToolCall, index: int) -> bytes:
    start = {"toolUse": {"toolUseId": tool.id, "name": tool.name}}
    return _event(b"contentBlockStart", {"contentBlockIndex": index, "start": start})


def _block(plan: Plan) -> dict[str, Any]:
    """The one content block of a whole answer: its text, or its ``toolUse``."""
    tool = plan.tool
    if tool is None:
        return {"text": plan.answer}
    tool_input = {} if plan.length_limited else msgspec.json.decode(tool.arguments)
    return {"toolUse": {"toolUseId": tool.id, "name": tool.name, "input": tool_input}}


def bedrock_refusal(request: HttpRequest) -> bytes | None:
    """What AWS answers a request that is not SigV4-signed (None: it looks signed)."""
    if request.authorization.startswith(_SIGV4):
        return None
    return json_response(403, {"message": "Missing Authentication Token"})
