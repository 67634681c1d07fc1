"""The Anthropic Messages format: named SSE events from ``message_start`` to ``message_stop``.

A conversation that ends with an assistant message is a prefill, and the answer
continues it; like the real API, a prefill ending in whitespace is refused.

A plan with a tool call (``Plan.tool``) is one ``tool_use`` block, streamed as
Anthropic streams one: ``content_block_start`` names it (id, name, empty
``input``), each token is an ``input_json_delta`` fragment of the input's JSON,
and the message stops with ``tool_use``. A whole answer cut by ``max_tokens``
carries an empty ``input``, as the partial JSON does not parse.

Reasoning (``think=N``) is a ``thinking`` block at index 0, before the answer's
block: ``thinking_delta`` events, then a ``signature_delta``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import SSE
from devstack.fake_provider._plan import (
    ChatRequest,
    Plan,
    Prefill,
    ToolCall,
    trailing_assistant,
)

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
        index = _answer_index(plan)
        block = _text_start(index) if plan.tool is None else _tool_start(plan.tool, index)
        return [
            _sse(b"message_start", msgspec.json.encode(start)),
            *_thinking_events(plan),
            _sse(b"content_block_start", block),
            _sse(b"ping", b'{"type": "ping"}'),
        ]

    def token_events(self, plan: Plan) -> list[bytes]:
        kind = _TEXT_DELTA if plan.tool is None else _JSON_DELTA
        prefix = _DELTA % _answer_index(plan) + kind
        return [prefix + text + b"}}\n\n" for text in plan.deltas()]

    def closing(self, plan: Plan) -> list[bytes]:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(plan), "stop_sequence": None},
            "usage": {"output_tokens": plan.tokens},
        }
        return [
            _sse(b"content_block_stop", _STOP % _answer_index(plan)),
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
        thinking = [_thinking_block(plan)] if plan.reasoning else []
        message = self._message(plan, [*thinking, _block(plan)])
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
        if plan.length_limited:
            return "max_tokens"
        return "end_turn" if plan.tool is None else "tool_use"


_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
_TEXT_DELTA = b'"delta":{"type":"text_delta","text":'
_JSON_DELTA = b'"delta":{"type":"input_json_delta","partial_json":'
_STOP = b'{"type":"content_block_stop","index":%d}'
_SIGNATURE = "c2lnbmF0dXJl"  # what a real thinking block carries, to be sent back with it


def _answer_index(plan: Plan) -> int:
    """The answer's block: after the thinking block, when there is one."""
    return 1 if plan.reasoning else 0


def _text_start(index: int) -> bytes:
    block = {"type": "content_block_start", "index": index,
             "content_block": {"type": "text", "text": ""}}  # fmt: skip
    return msgspec.json.encode(block)


def _tool_start(tool: ToolCall, index: int) -> bytes:
    block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
    return msgspec.json.encode(
        {"type": "content_block_start", "index": index, "content_block": block}
    )


def _thinking_events(plan: Plan) -> list[bytes]:
    """A ``thinking`` block at index 0: its deltas, then its signature."""
    if not plan.reasoning:
        return []
    block = {"type": "thinking", "thinking": "", "signature": ""}
    start = {"type": "content_block_start", "index": 0, "content_block": block}
    deltas = [{"type": "thinking_delta", "thinking": text} for text in plan.reasoning]
    deltas.append({"type": "signature_delta", "signature": _SIGNATURE})
    return [
        _sse(b"content_block_start", msgspec.json.encode(start)),
        *(
            _sse(b"content_block_delta", msgspec.json.encode(
                {"type": "content_block_delta", "index": 0, "delta": delta}))
            for delta in deltas
        ),
        _sse(b"content_block_stop", _STOP % 0),
    ]  # fmt: skip


def _thinking_block(plan: Plan) -> dict[str, Any]:
    return {"type": "thinking", "thinking": "".join(plan.reasoning), "signature": _SIGNATURE}


def _block(plan: Plan) -> dict[str, Any]:
    """The one content block of a whole answer: its text, or its ``tool_use``."""
    tool = plan.tool
    if tool is None:
        return {"type": "text", "text": plan.answer}
    tool_input = {} if plan.length_limited else msgspec.json.decode(tool.arguments)
    return {"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool_input}
