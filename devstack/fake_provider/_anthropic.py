"""The Anthropic Messages format: named SSE events from ``message_start`` to ``message_stop``.

A conversation that ends with an assistant message is a prefill, and the answer
continues it; like the real API, a prefill ending in whitespace is refused.
"""

from __future__ import annotations

from typing import Any

import msgspec

from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import SSE
from devstack.fake_provider._plan import ChatRequest, Plan, Prefill, trailing_assistant

__all__ = ["AnthropicFormat"]

_TRAILING_WHITESPACE = "messages: final assistant content cannot end with trailing whitespace"
_NOPREFILL = ErrorKind(
    400, "invalid_request_error", None, "invalid_request_error",
    "This model does not support assistant message prefill. "
    "The conversation must end with a user message.",
)  # fmt: skip


def _sse(event: bytes, data: bytes) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event, data)


class AnthropicFormat:
    """``/v1/messages``."""

    content_type = SSE

    def wants_stream(self, request: ChatRequest) -> bool:
        return bool(request.stream)

    def limit(self, request: ChatRequest) -> int | None:
        return request.max_tokens

    def prefill(self, request: ChatRequest) -> Prefill | None:
        text = trailing_assistant(request)
        if text is None:
            return None
        return Prefill(text, _TRAILING_WHITESPACE if text != text.rstrip() else None)

    def noprefill_body(self) -> Any:
        return self.error_body(_NOPREFILL)

    def opening(self, plan: Plan) -> list[bytes]:
        message = {**self._message(plan, []), "stop_reason": None}
        message["usage"] = {"input_tokens": plan.prompt_tokens, "output_tokens": 1}
        start = {"type": "message_start", "message": message}
        block = (
            b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
        )
        return [
            _sse(b"message_start", msgspec.json.encode(start)),
            _sse(b"content_block_start", block),
            _sse(b"ping", b'{"type": "ping"}'),
        ]

    def token_events(self, plan: Plan) -> list[bytes]:
        prefix = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        prefix += b'"delta":{"type":"text_delta","text":'
        return [prefix + text + b"}}\n\n" for text in plan.deltas()]

    def closing(self, plan: Plan) -> list[bytes]:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(plan), "stop_sequence": None},
            "usage": {"output_tokens": plan.tokens},
        }
        return [
            _sse(b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
            _sse(b"message_delta", msgspec.json.encode(delta)),
        ]

    def terminator(self, plan: Plan) -> list[bytes]:
        return [_sse(b"message_stop", b'{"type":"message_stop"}')]

    def garbage(self) -> bytes:
        return _sse(b"content_block_delta", b'{"type":"content_block_delta", <<not json>>')

    def stream_error(self, kind: ErrorKind) -> bytes:
        return _sse(b"error", msgspec.json.encode(self.error_body(kind)))

    def error_body(self, kind: ErrorKind) -> Any:
        return {"type": "error", "error": {"type": kind.anthropic_type, "message": kind.message}}

    def full(self, plan: Plan) -> Any:
        message = self._message(plan, [{"type": "text", "text": plan.answer}])
        usage = {"input_tokens": plan.prompt_tokens, "output_tokens": plan.tokens}
        return {**message, "stop_reason": self._stop_reason(plan), "usage": usage}

    def _message(self, plan: Plan, content: list[Any]) -> dict[str, Any]:
        return {
            "id": f"msg_mock{plan.request_no}",
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": content,
            "stop_sequence": None,
        }

    def _stop_reason(self, plan: Plan) -> str:
        return "max_tokens" if plan.length_limited else "end_turn"
