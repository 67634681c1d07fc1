"""Anthropic's Messages answers as typed Structs: the whole ``message``, its named SSE
events, and errors in Anthropic's shape.

A streamed answer is ``message_start`` (the message with empty content), then per
content block ``content_block_start`` / ``content_block_delta`` /
``content_block_stop``, then ``message_delta`` (stop reason, usage) and
``message_stop``. Reasoning text is a ``thinking`` block (``thinking_delta``; no
signature: llmrelay has none to give, and drops thinking blocks sent back), text a
``text`` block (``text_delta``); a new block opens whenever the kind changes. Tool
calls come at the end, whole (the exchange holds them until the answer is done, so
a restart never leaves half a call): each a ``tool_use`` block with one
``input_json_delta`` carrying all of its arguments.

Words: ``finish_reason`` stop -> ``end_turn``, length -> ``max_tokens``,
tool_calls (or any answer with tool calls) -> ``tool_use``, content_filter ->
``refusal``; ``stop_sequence`` is always null (upstreams do not say which one
matched). Usage: ``input_tokens`` are the prompt tokens not read from a cache,
``cache_read_input_tokens`` those read from one (only when the upstream said).

Errors are ``{"type": "error", "error": {"type", "message"}}`` with the status of
the llmrelay code (``gateway._apierror``), except ``queue_full``: 529
``overloaded_error`` (the broker, not the caller's quota, is short; Retry-After is
kept). The type follows the status: 400 ``invalid_request_error``, 401
``authentication_error``, 403 ``permission_error``, 404 ``not_found_error``, 413
``request_too_large``, 429 ``rate_limit_error`` (an upstream's rate limit), 504
``timeout_error``, 529 ``overloaded_error``, other 4xx ``invalid_request_error``,
other 5xx ``api_error``. In a stream already under way an error is an ``error``
event, which the SDKs raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from starlette.responses import Response

from broker._errors import BadUpstreamEvent, QueueFull
from broker._protocol import Done, TokenLogprob, ToolCall
from gateway._apierror import ApiError
from gateway._dialect import Reply, StreamEncoder
from gateway._responses import json_response

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STATUS_OF_CODE = {QueueFull.code: 529}


class TextBlock(msgspec.Struct, tag="text", tag_field="type", frozen=True):
    text: str


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type", frozen=True):
    thinking: str
    signature: str = ""


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", frozen=True):
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


class MessageUsage(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | UnsetType = UNSET

    @classmethod
    def of(cls, done: Done) -> MessageUsage:
        u = done.usage
        cached = u.cached_tokens
        if isinstance(cached, UnsetType):
            return cls(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens)
        return cls(
            input_tokens=max(0, u.prompt_tokens - cached),
            output_tokens=u.completion_tokens,
            cache_read_input_tokens=cached,
        )


class Message(msgspec.Struct, tag="message", tag_field="type", frozen=True, kw_only=True):
    """A ``message`` object: a whole answer, or (empty) the start of a stream."""

    id: str
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: str | None
    stop_sequence: None = None
    usage: MessageUsage


# --- stream events


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type", frozen=True):
    message: Message


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type", frozen=True):
    index: int
    content_block: ContentBlock


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type", frozen=True):
    text: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta", tag_field="type", frozen=True):
    thinking: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type", frozen=True):
    partial_json: str


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type", frozen=True):
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type", frozen=True):
    index: int


class StopDelta(msgspec.Struct, frozen=True):
    stop_reason: str
    stop_sequence: None = None


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type", frozen=True):
    delta: StopDelta
    usage: MessageUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type", frozen=True):
    pass


class ErrorInfo(msgspec.Struct, frozen=True):
    type: str
    message: str


class ErrorBody(msgspec.Struct, tag="error", tag_field="type", frozen=True):
    """Anthropic's error shape, as a response body and as an ``error`` event."""

    error: ErrorInfo


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | ErrorBody
)

_encoder = msgspec.json.Encoder()


def sse_event(event: StreamEvent) -> bytes:
    """One named SSE event: ``event: <type>`` and its JSON, which repeats the type."""
    name = type(event).__struct_config__.tag
    assert isinstance(name, str)
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"


def stop_reason(done: Done, tool_calls: list[ToolCall]) -> str:
    if tool_calls:
        return "tool_use"
    return STOP_REASONS.get(done.finish_reason, "end_turn")


def tool_input(call: ToolCall) -> dict[str, Any]:
    """A whole tool call's arguments as the object ``tool_use.input`` is."""
    try:
        value = msgspec.json.decode(call.function.arguments) if call.function.arguments else {}
    except msgspec.DecodeError as exc:
        raise BadUpstreamEvent(f"tool call {call.id}: its arguments are not JSON") from exc
    if not isinstance(value, dict):
        raise BadUpstreamEvent(f"tool call {call.id}: its arguments are not a JSON object")
    return value


def whole_message(message_id: str, reply: Reply, done: Done) -> Message:
    """The ``message`` of a whole answer: thinking, text, then tool_use blocks."""
    blocks: list[ContentBlock] = [ThinkingBlock(reply.reasoning)] if reply.reasoning else []
    if reply.text:
        blocks.append(TextBlock(reply.text))
    blocks += [ToolUseBlock(c.id, c.function.name, tool_input(c)) for c in reply.tool_calls]
    return Message(
        id=message_id,
        model=done.model,
        content=blocks,
        stop_reason=stop_reason(done, reply.tool_calls),
        usage=MessageUsage.of(done),
    )


def error_status(err: ApiError) -> int:
    return _STATUS_OF_CODE.get(err.code, err.status)


def error_body(err: ApiError) -> ErrorBody:
    status = error_status(err)
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return ErrorBody(ErrorInfo(type=kind, message=err.message))


def error_response(err: ApiError) -> Response:
    return json_response(error_body(err), error_status(err), err.headers)


class MessageStream:
    """Encodes the named SSE events of one streamed message (see module docstring)."""

    def __init__(self, message_id: str, route: str, *, thinking: bool = True) -> None:
        self.message_id = message_id
        self.route = route
        self.thinking = thinking
        self.model: str | None = None  # the upstream model, once a chunk names it
        self._started = False
        self._index = -1
        self._open: str | None = None  # the kind of the block open now
        self._calls: list[ToolCall] = []

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        """Anthropic's events carry no log probabilities (``logprobs`` is not asked here)."""
        if not text:
            return b""
        return self._block(TextBlock("")) + self._delta(TextDelta(text))

    def reasoning(self, text: str) -> bytes:
        if not text or not self.thinking:
            return b""
        return self._block(ThinkingBlock("")) + self._delta(ThinkingDelta(text))

    def tool_calls(self, calls: list[ToolCall]) -> bytes:
        frames = []
        self._calls += calls
        for call in calls:
            frames.append(self._block(ToolUseBlock(call.id, call.function.name, {})))
            if call.function.arguments:
                frames.append(self._delta(InputJsonDelta(call.function.arguments)))
            frames.append(self._close())  # each call is its own block
        return b"".join(frames)

    def end(self, done: Done) -> bytes:
        reason = StopDelta(stop_reason(done, self._calls))
        tail = sse_event(MessageDelta(reason, MessageUsage.of(done))) + sse_event(MessageStop())
        return self._head() + self._close() + tail

    def _block(self, block: ContentBlock) -> bytes:
        kind = type(block).__struct_config__.tag
        assert isinstance(kind, str)
        if self._open == kind:
            return b""
        head = self._head() + self._close()
        self._index += 1
        self._open = kind
        return head + sse_event(ContentBlockStart(self._index, block))

    def _delta(self, delta: TextDelta | ThinkingDelta | InputJsonDelta) -> bytes:
        return sse_event(ContentBlockDelta(self._index, delta))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse_event(ContentBlockStop(self._index))

    def _head(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        usage = MessageUsage(input_tokens=0, output_tokens=0)
        message = Message(
            id=self.message_id,
            model=self.model or self.route,
            content=[],
            stop_reason=None,
            usage=usage,
        )
        return sse_event(MessageStart(message))


class MessagesWriter:
    """The ``Writer`` of one Messages request (``gateway._dialect``); without
    ``thinking``, the reasoning text is left out."""

    def __init__(self, route: str, *, thinking: bool = True) -> None:
        self.route = route
        self.thinking = thinking

    def whole(self, request_id: str, reply: Reply, done: Done) -> msgspec.Struct:
        if not self.thinking:
            reply = dataclasses.replace(reply, reasoning="")
        return whole_message(f"msg_{request_id}", reply, done)

    def stream(self, request_id: str) -> StreamEncoder:
        return MessageStream(f"msg_{request_id}", self.route, thinking=self.thinking)

    def error_response(self, err: ApiError) -> Response:
        return error_response(err)

    def error_event(self, err: ApiError) -> bytes:
        return sse_event(error_body(err))
