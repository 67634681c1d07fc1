"""The OpenAI chat completion request: decoded, checked, and turned into a job's parts.

``parse_request`` decodes a body into ``ChatRequest`` and refuses what llmrelay
does not relay; ``to_messages`` and ``job_options`` give the ``Job`` its
messages and options. Every refusal is an ``InvalidRequest`` whose ``param``
names the field, as OpenAI's error object does.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from broker._client import JobOptions
from broker._errors import InvalidRequest
from broker._protocol import (
    ContentPart,
    Message,
    ReasoningEffort,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
)
from broker._validate import valid_traceparent


class _MessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _ToolName(msgspec.Struct):
    name: str


class _NamedToolChoice(msgspec.Struct):
    """``{"type": "function", "function": {"name": ...}}``: this tool, and no other."""

    function: _ToolName
    type: Literal["function"] = "function"


class ChatRequest(msgspec.Struct, kw_only=True):
    """The fields of an OpenAI chat completion request that llmrelay honours.

    Unknown fields are ignored; fields that would change the shape of the answer
    and that llmrelay does not relay (``functions``, ``n`` > 1) are refused, so that
    a client never silently gets something else. Tools, tool calls and tool
    results, images and audio, ``response_format`` (text, JSON, JSON of a schema),
    ``reasoning_effort`` and ``logprobs``/``top_logprobs`` are relayed to targets
    that map them; with none left the request is refused (``bad_request``).
    """

    model: str
    messages: Annotated[list[_MessageIn], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] = 1
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Not OpenAI's: parameters for one provider kind that llmrelay does not model
    # (``extra_body={"provider_options": {"anthropic": {"top_k": 5}}}`` in the SDK).
    provider_options: dict[str, dict[str, Any]] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


T = TypeVar("T")
_request_decoder = msgspec.json.Decoder(ChatRequest)
_AT_RE = re.compile(r" - at `\$\.?(.*)`$")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """A request body decoded by ``decoder``; raises ``InvalidRequest`` naming the field
    (every front door's requests: chat completions, messages, embeddings)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid_field(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # msgspec's guard against deep nesting
        raise InvalidRequest("the request body is nested too deeply") from exc


def parse_request(body: bytes) -> ChatRequest:
    """Decode and check a request body; raise ``InvalidRequest`` naming the field."""
    req = decode_body(_request_decoder, body)
    _refuse_unsupported(req)
    return req


def _invalid_field(text: str) -> InvalidRequest:
    m = _AT_RE.search(text)
    where = m.group(1) if m else ""
    message = text[: m.start()] if m else text
    missing = _MISSING_RE.search(message)
    if missing:
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return InvalidRequest(f"{where or 'body'}: {message}", param=where or None)


def _refuse_unsupported(req: ChatRequest) -> None:
    if req.n != 1:
        raise InvalidRequest("n: llmrelay returns one choice; n must be 1", "n")
    if req.functions:
        raise InvalidRequest(
            "functions: the deprecated form is not relayed; use tools", "functions"
        )
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise InvalidRequest(
            "response_format.json_schema: a json_schema format needs its schema",
            "response_format.json_schema",
        )


def to_messages(req: ChatRequest) -> list[Message]:
    """OpenAI messages as wire messages (``developer`` is a system message)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequest(
                f"messages[{i}].tool_call_id: a tool message names the call it answers",
                f"messages[{i}].tool_call_id",
            )
        role = "system" if m.role == "developer" else m.role
        content = "" if m.content is None and m.tool_calls else _text_of(m, i)
        parts = _media_parts(m)
        out.append(Message(role=role, content=content, name=m.name, tool_calls=m.tool_calls,
                           tool_call_id=m.tool_call_id, parts=parts))  # fmt: skip
    return out


def _text_of(m: _MessageIn, i: int) -> str:
    if m.content is None:
        raise InvalidRequest(f"messages[{i}].content: a message needs content", f"messages[{i}]")
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content if isinstance(part, TextPart))


def _media_parts(m: _MessageIn) -> list[ContentPart] | None:
    """The message's parts when it has images or audio (its text alone is ``content``)."""
    if isinstance(m.content, list) and any(not isinstance(p, TextPart) for p in m.content):
        return m.content
    return None


def job_options(req: ChatRequest, traceparent: str | None) -> JobOptions:
    """The sampling options of a request, as ``Job`` fields.

    An invalid ``traceparent`` header is dropped, as W3C Trace Context asks of a
    receiver (the job would be refused as ``invalid_job`` otherwise); the other
    fields are checked again, with the rest of the job, by ``validate_job``.
    """
    if traceparent is not None and not valid_traceparent(traceparent):
        traceparent = None
    metadata = dict(req.metadata or {})
    if req.user:
        metadata["user"] = req.user
    return JobOptions(
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=[req.stop] if isinstance(req.stop, str) else req.stop,
        seed=req.seed,
        metadata=metadata,
        traceparent=traceparent,
        response_format=req.response_format,
        reasoning_effort=req.reasoning_effort,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
        provider_options=dict(req.provider_options or {}),
        tools=req.tools,
        tool_choice=_tool_choice(req),
        parallel_tool_calls=req.parallel_tool_calls,
    )


def _tool_choice(req: ChatRequest) -> str | dict[str, Any] | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.function.name}}
