"""The OpenAI chat-completions format: SSE ``data:`` chunks ending in ``[DONE]``, or one JSON.

Token events are built from byte templates, not encoded per token: the
benchmark measures the broker against this server, so it must cost little.

A prefill is vLLM's: ``"continue_final_message": true`` and a last message from
the assistant (``"add_generation_prompt": false`` may come with it; ``true``
is refused, as vLLM does). A trailing assistant message alone is a new turn.

A plan with a tool call (``Plan.tool``) streams as OpenAI streams one: the
first chunk names the call (id, function name, empty arguments), each token is
a fragment of the arguments, and the answer finishes with ``tool_calls``.

Reasoning (``think=N``) comes first, as ``delta.reasoning_content`` (vLLM's and
DeepSeek's name), and as ``message.reasoning_content`` in a whole answer. A request
with ``logprobs`` gets each token's (``token_logprob``) on its chunk.
"""

from __future__ import annotations

from typing import Any

import msgspec

from devstack.fake_provider._answer import token_logprob
from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import SSE
from devstack.fake_provider._plan import (
    ChatRequest,
    Plan,
    Prefill,
    ToolCall,
    trailing_assistant,
)

__all__ = ["OpenAIFormat"]

_NOPREFILL = ErrorKind(
    400, "invalid_request_error", None, "invalid_request_error",
    "Unrecognized request argument supplied: continue_final_message",
)  # fmt: skip
_BOTH = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."


class OpenAIFormat:
    """``/v1/chat/completions`` and ``/chat/completions``."""

    content_type = SSE

    def wants_stream(self, request: ChatRequest) -> bool:
        return bool(request.stream)

    def limit(self, request: ChatRequest) -> int | None:
        return request.max_completion_tokens or request.max_tokens

    def prefill(self, request: ChatRequest) -> Prefill | None:
        if not request.continue_final_message:
            return None
        if request.add_generation_prompt:
            raise ValueError(_BOTH)
        text = trailing_assistant(request)
        return None if text is None else Prefill(text)

    def noprefill_body(self) -> Any:
        return self.error_body(_NOPREFILL)

    def _prefix(self, plan: Plan) -> bytes:
        return b'data: {"id":"chatcmpl-mock%d","object":"chat.completion.chunk","created":%d,' % (
            plan.request_no,
            plan.created,
        ) + b'"model":%s,"choices":[' % msgspec.json.encode(plan.model)

    def opening(self, plan: Plan) -> list[bytes]:
        thinking = [
            self._prefix(plan) + _REASONING % msgspec.json.encode(text) for text in plan.reasoning
        ]
        if plan.tool is not None:
            return [*thinking, self._prefix(plan) + _tool_opening(plan.tool)]
        delta = b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        return [*thinking, self._prefix(plan) + delta]

    def token_events(self, plan: Plan) -> list[bytes]:
        top = (plan.options or {}).get("logprobs")
        if plan.tool is None and top is not None:
            prefix = self._prefix(plan) + b'{"index":0,"delta":{"content":'
            return [
                prefix
                + text
                + b'},"logprobs":{"content":[%s]},"finish_reason":null}]}\n\n'
                % msgspec.json.encode(token_logprob(msgspec.json.decode(text), top))
                for text in plan.deltas()
            ]
        if plan.tool is None:
            prefix = self._prefix(plan) + b'{"index":0,"delta":{"content":'
            suffix = b'},"finish_reason":null}]}\n\n'
        else:
            prefix = self._prefix(plan) + _TOOL_FRAGMENT
            suffix = b'}}]},"finish_reason":null}]}\n\n'
        return [prefix + text + suffix for text in plan.deltas()]

    def closing(self, plan: Plan) -> list[bytes]:
        reason = _finish_reason(plan).encode()
        events = [
            self._prefix(plan) + b'{"index":0,"delta":{},"finish_reason":"%s"}]}\n\n' % reason
        ]
        if plan.include_usage:
            events.append(self._prefix(plan) + b'],"usage":%s}\n\n' % _openai_usage(plan))
        return events

    def terminator(self, plan: Plan) -> list[bytes]:
        return [b"data: [DONE]\n\n"]

    def garbage(self) -> bytes:
        return b'data: {"choices":[{"delta":{"content": <<not json>>\n\n'

    def stream_error(self, kind: ErrorKind) -> bytes:
        return b"data: %s\n\n" % msgspec.json.encode(self.error_body(kind))

    def error_body(self, kind: ErrorKind) -> Any:
        error = {"message": kind.message, "type": kind.openai_type, "code": kind.openai_code}
        return {"error": {**error, "param": None}}

    def full(self, plan: Plan) -> Any:
        return {
            "id": f"chatcmpl-mock{plan.request_no}",
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": _message(plan),
                    "finish_reason": _finish_reason(plan),
                }
            ],
            "usage": msgspec.json.decode(_openai_usage(plan)),
        }


# Reasoning as vLLM and DeepSeek stream it, beside the content.
_REASONING = b'{"index":0,"delta":{"reasoning_content":%s},"finish_reason":null}]}\n\n'
_TOOL_FRAGMENT = b'{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":'


def _tool_opening(tool: ToolCall) -> bytes:
    call = b'{"index":0,"id":%s,"type":"function","function":{"name":%s,"arguments":""}}' % (
        msgspec.json.encode(tool.id),
        msgspec.json.encode(tool.name),
    )
    delta = b'{"role":"assistant","content":null,"tool_calls":[%s]}' % call
    return b'{"index":0,"delta":%s,"finish_reason":null}]}\n\n' % delta


def _finish_reason(plan: Plan) -> str:
    if plan.length_limited:
        return "length"
    return "stop" if plan.tool is None else "tool_calls"


def _message(plan: Plan) -> dict[str, Any]:
    tool = plan.tool
    thinking = {"reasoning_content": "".join(plan.reasoning)} if plan.reasoning else {}
    if tool is None:
        return {"role": "assistant", "content": plan.answer, **thinking}
    function = {"name": tool.name, "arguments": plan.answer}
    call = {"id": tool.id, "type": "function", "function": function}
    return {"role": "assistant", "content": None, "tool_calls": [call], **thinking}


def _openai_usage(plan: Plan) -> bytes:
    total = plan.prompt_tokens + plan.tokens
    usage = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d' % (
        plan.prompt_tokens,
        plan.tokens,
        total,
    )
    fault = plan.fault
    if fault.cached is not None:
        usage += b',"prompt_tokens_details":{"cached_tokens":%d}' % fault.cached
    if fault.reasoning is not None:
        usage += b',"completion_tokens_details":{"reasoning_tokens":%d}' % fault.reasoning
    return usage + b"}"
