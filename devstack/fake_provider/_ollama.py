"""The Ollama ``/api/chat`` format: one JSON object per line, the last with ``done: true``.

A conversation that ends with an assistant message is a prefill, and the answer
continues it, as Ollama does.

A plan with a tool call (``Plan.tool``) is sent as Ollama sends one: the whole
call in one line (``message.tool_calls``, its ``arguments`` a JSON object, no
id), then the ``done`` line; the plan's tokens only count (``eval_count``). An
answer cut by ``num_predict`` calls with ``{}``, as the partial JSON does not parse.

Reasoning (``think=N``) comes first, in lines with ``message.thinking`` and empty
``content``, as a thinking model streams it.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import NDJSON
from devstack.fake_provider._plan import ChatRequest, Plan, Prefill, ToolCall, trailing_assistant

__all__ = ["OllamaFormat"]

_NOPREFILL = "this model does not support continuing an assistant message"


class OllamaFormat:
    """``/api/chat``; streams unless the request says ``stream: false``."""

    content_type = NDJSON

    def wants_stream(self, request: ChatRequest) -> bool:
        return request.stream is not False

    def limit(self, request: ChatRequest) -> int | None:
        return request.options.num_predict if request.options else None

    def prefill(self, request: ChatRequest) -> Prefill | None:
        text = trailing_assistant(request)
        return None if text is None else Prefill(text)

    def noprefill_body(self) -> Any:
        return {"error": _NOPREFILL}

    def opening(self, plan: Plan) -> list[bytes]:
        prefix = self._prefix(plan)
        return [
            prefix + b'"","thinking":%s},"done":false}\n' % msgspec.json.encode(text)
            for text in plan.reasoning
        ]

    def _prefix(self, plan: Plan) -> bytes:
        return b'{"model":%s,"created_at":"%s","message":{"role":"assistant","content":' % (
            msgspec.json.encode(plan.model),
            _iso(plan.created).encode(),
        )

    def token_events(self, plan: Plan) -> list[bytes]:
        prefix = self._prefix(plan)
        if plan.tool is not None:
            calls = msgspec.json.encode(_tool_calls(plan.tool, plan))
            return [prefix + b'"","tool_calls":%s},"done":false}\n' % calls]
        return [prefix + text + b'},"done":false}\n' for text in plan.deltas()]

    def closing(self, plan: Plan) -> list[bytes]:
        return [msgspec.json.encode(self._final(plan, "")) + b"\n"]

    def terminator(self, plan: Plan) -> list[bytes]:
        return []

    def garbage(self) -> bytes:
        return b'{"model": <<not json>>\n'

    def stream_error(self, kind: ErrorKind) -> bytes:
        return msgspec.json.encode(self.error_body(kind)) + b"\n"

    def error_body(self, kind: ErrorKind) -> Any:
        return {"error": kind.message}

    def full(self, plan: Plan) -> Any:
        final = self._final(plan, plan.answer if plan.tool is None else "")
        if plan.reasoning:
            final["message"]["thinking"] = "".join(plan.reasoning)
        if plan.tool is not None:
            final["message"]["tool_calls"] = _tool_calls(plan.tool, plan)
        return final

    def _final(self, plan: Plan, content: str) -> dict[str, Any]:
        return {
            "model": plan.model,
            "created_at": _iso(plan.created),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": "length" if plan.length_limited else "stop",
            "prompt_eval_count": plan.prompt_tokens,
            "eval_count": plan.tokens,
        }


def _tool_calls(tool: ToolCall, plan: Plan) -> list[dict[str, Any]]:
    """``tool`` as Ollama's ``tool_calls``: the whole call, its arguments an object."""
    arguments = {} if plan.length_limited else msgspec.json.decode(tool.arguments)
    return [{"function": {"name": tool.name, "arguments": arguments}}]


def _iso(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
