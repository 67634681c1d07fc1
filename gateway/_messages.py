"""The Anthropic Messages request (``POST /v1/messages``): decoded, checked, and turned
into the same job parts as an OpenAI chat completion.

``model`` names a route, as on ``/v1/chat/completions``. The mapping:

- ``system`` (a string, or text blocks joined by a blank line) is one system message;
- a turn's ``text`` blocks are its text (joined by a blank line), ``image`` blocks
  (``source`` base64 or url) its image parts (base64 as a data URL);
- an assistant turn's ``tool_use`` blocks are its tool calls (``input`` as the JSON
  arguments); its ``thinking`` and ``redacted_thinking`` blocks are dropped (no
  upstream can check another's signature);
- a user turn's ``tool_result`` blocks are ``tool`` messages answering their
  ``tool_use_id`` (text only; ``is_error`` is not relayed, the text says what failed),
  before the turn's other content;
- ``tools`` (custom tools: name, description, input_schema) are functions;
  ``tool_choice`` auto/any/tool/none is auto/required/that function/none, and
  ``disable_parallel_tool_use`` is ``parallel_tool_calls: false``;
- ``max_tokens`` (required), ``temperature``, ``top_p``, ``stop_sequences`` as they are;
  ``top_k`` goes to Anthropic pools only (``provider_options``); ``metadata.user_id``
  is the job's ``metadata["user"]``;
- the effort of reasoning (``reasoning_effort``): ``output_config.effort`` low and
  medium as they are, high/xhigh/max ``high``; else ``thinking: {type: enabled,
  budget_tokens: N}``: N up to 4096 ``low``, up to 16384 ``medium``, more ``high``;
  ``adaptive`` and ``between_tools`` leave it to the upstream's default, ``disabled``
  asks none. A route with no target that maps reasoning refuses an effort, as on the
  OpenAI path. ``thinking.display: omitted`` leaves the thinking out of the answer;
- ``output_config.format`` (a JSON schema) is ``response_format`` ``json_schema``;

Unknown fields are ignored (``cache_control``, ``anthropic-version``...); what would
change the answer and is not relayed (server tools, document blocks, images in a
tool result, other thinking types) is refused with a 400 naming the field.
``POST /v1/messages/count_tokens`` is refused (404): the gateway has no tokenizer.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import msgspec
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from broker._client import JobOptions
from broker._errors import InvalidRequest
from broker._protocol import (
    ContentPart,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageUrl,
    JsonSchemaFormat,
    Message,
    ReasoningEffort,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
)
from broker._validate import valid_traceparent
from gateway._apierror import ApiError, api_error
from gateway._dialect import Call, JobParts
from gateway._messages_sse import MessagesWriter, error_response
from gateway._request import decode_body

# Budgets up to each bound (tokens) get this effort; larger ones "high".
THINKING_EFFORT: tuple[tuple[int, ReasoningEffort], ...] = ((4096, "low"), (16384, "medium"))
EFFORT: dict[str, ReasoningEffort] = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}
_JOIN = "\n\n"


class _Text(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class _Base64Source(msgspec.Struct, tag="base64", tag_field="type"):
    media_type: str
    data: str


class _UrlSource(msgspec.Struct, tag="url", tag_field="type"):
    url: str


class _Image(msgspec.Struct, tag="image", tag_field="type"):
    source: _Base64Source | _UrlSource


class _ToolUse(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any] = {}


class _ToolResult(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[_Text | _Image] = ""
    is_error: bool = False


class _Thinking(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str = ""


class _RedactedThinking(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


_Block = _Text | _Image | _ToolUse | _ToolResult | _Thinking | _RedactedThinking


class _Turn(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[_Block]


class _ToolIn(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class _ToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _ThinkingConfig(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    display: Literal["summarized", "omitted"] | None = None


class _OutputFormat(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class _OutputConfig(msgspec.Struct, kw_only=True):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: _OutputFormat | None = None


class _Metadata(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class MessagesRequest(msgspec.Struct, kw_only=True):
    """The fields of an Anthropic Messages request that llmrelay honours (see module)."""

    model: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    messages: Annotated[list[_Turn], msgspec.Meta(min_length=1)]
    system: str | list[_Text] | None = None
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop_sequences: list[str] | None = None
    metadata: _Metadata | None = None
    tools: list[_ToolIn] | None = None
    tool_choice: _ToolChoice | None = None
    thinking: _ThinkingConfig | None = None
    output_config: _OutputConfig | None = None

    @property
    def shows_thinking(self) -> bool:
        return self.thinking is None or self.thinking.display != "omitted"


_request_decoder = msgspec.json.Decoder(MessagesRequest)
_encoder = msgspec.json.Encoder()


def parse_messages_request(body: bytes) -> MessagesRequest:
    """Decode and check a request body; raise ``InvalidRequest`` naming the field."""
    return decode_body(_request_decoder, body)


def to_job_parts(req: MessagesRequest, traceparent: str | None) -> JobParts:
    """The job's messages and options; raises ``InvalidRequest`` for what is not relayed."""
    return JobParts(to_messages(req), job_options(req, traceparent))


# --- messages


def to_messages(req: MessagesRequest) -> list[Message]:
    out = []
    system = _system_text(req.system)
    if system:
        out.append(Message(role="system", content=system))
    for i, turn in enumerate(req.messages):
        if isinstance(turn.content, str):
            out.append(Message(role=turn.role, content=turn.content))
        elif turn.role == "assistant":
            out.append(_assistant(turn.content, f"messages[{i}]"))
        else:
            out += _user(turn.content, f"messages[{i}]")
    return out


def _system_text(system: str | list[_Text] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return _JOIN.join(block.text for block in system)


def _assistant(blocks: list[_Block], where: str) -> Message:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        match block:
            case _Text():
                texts.append(block.text)
            case _ToolUse():
                arguments = _encoder.encode(block.input).decode()
                fn = FunctionCall(name=block.name, arguments=arguments)
                calls.append(ToolCall(id=block.id, function=fn))
            case _Thinking() | _RedactedThinking():
                pass  # the model's own notes, signed for one provider: not relayed
            case _:
                raise _refused(
                    f"{where}.content[{j}]", "an assistant turn carries text and tool_use"
                )
    return Message(role="assistant", content=_JOIN.join(texts), tool_calls=calls or None)


def _user(blocks: list[_Block], where: str) -> list[Message]:
    """Tool results first (each a ``tool`` message), then the turn's text and images."""
    results: list[Message] = []
    parts: list[ContentPart] = []
    for j, block in enumerate(blocks):
        match block:
            case _ToolResult():
                results.append(_tool_result(block, f"{where}.content[{j}]"))
            case _Text():
                parts.append(TextPart(text=block.text))
            case _Image():
                parts.append(_image(block))
            case _:
                raise _refused(
                    f"{where}.content[{j}]", "a user turn carries text, image and tool_result"
                )
    return results + ([_user_message(parts)] if parts else [])


def _user_message(parts: list[ContentPart]) -> Message:
    text = _JOIN.join(p.text for p in parts if isinstance(p, TextPart))
    media = any(not isinstance(p, TextPart) for p in parts)
    return Message(role="user", content=text, parts=parts if media else None)


def _tool_result(block: _ToolResult, where: str) -> Message:
    if isinstance(block.content, str):
        return Message(role="tool", content=block.content, tool_call_id=block.tool_use_id)
    for k, part in enumerate(block.content):
        if isinstance(part, _Image):
            raise _refused(f"{where}.content[{k}]", "images in a tool result are not relayed")
    text = _JOIN.join(p.text for p in block.content if isinstance(p, _Text))
    return Message(role="tool", content=text, tool_call_id=block.tool_use_id)


def _image(block: _Image) -> ImagePart:
    source = block.source
    if isinstance(source, _UrlSource):
        return ImagePart(image_url=ImageUrl(url=source.url))
    return ImagePart(image_url=ImageUrl(url=f"data:{source.media_type};base64,{source.data}"))


def _refused(where: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {why}", where)


# --- options


def job_options(req: MessagesRequest, traceparent: str | None) -> JobOptions:
    """The sampling options of a request, as ``Job`` fields (an invalid ``traceparent``
    is dropped, as on the OpenAI path)."""
    if traceparent is not None and not valid_traceparent(traceparent):
        traceparent = None
    user = req.metadata.user_id if req.metadata else None
    choice = req.tool_choice
    return JobOptions(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_sequences,
        metadata={"user": user} if user else {},
        traceparent=traceparent,
        reasoning_effort=reasoning_effort(req.thinking, req.output_config),
        response_format=_response_format(req.output_config),
        provider_options={"anthropic": {"top_k": req.top_k}} if req.top_k else {},
        tools=_tools(req.tools),
        tool_choice=_tool_choice(choice),
        parallel_tool_calls=False if choice and choice.disable_parallel_tool_use else None,
    )


def reasoning_effort(
    thinking: _ThinkingConfig | None, output: _OutputConfig | None = None
) -> ReasoningEffort | None:
    """``output_config.effort``, else ``thinking``, as a reasoning effort (see module)."""
    if output is not None and output.effort is not None:
        return EFFORT[output.effort]
    if thinking is None or thinking.type != "enabled":
        return None
    if thinking.budget_tokens is None:
        raise _refused("thinking.budget_tokens", "enabled thinking needs its budget_tokens")
    for bound, effort in THINKING_EFFORT:
        if thinking.budget_tokens <= bound:
            return effort
    return "high"


def _response_format(output: _OutputConfig | None) -> ResponseFormat | None:
    if output is None or output.format is None:
        return None
    schema = JsonSchemaFormat(name="output", schema=output.format.schema)
    return ResponseFormat(type="json_schema", json_schema=schema)


def _tools(tools: list[_ToolIn] | None) -> list[Tool] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom") or tool.input_schema is None:
            kind = f" ({tool.type})" if tool.type else ""
            why = f"server tools{kind} are not relayed; a tool has a name and an input_schema"
            raise _refused(f"tools[{i}]", why)
        fn = FunctionDef(name=tool.name, description=tool.description, parameters=tool.input_schema)
        out.append(Tool(function=fn))
    return out


def _tool_choice(choice: _ToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if choice.type != "tool":
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if not choice.name:
        raise _refused("tool_choice.name", "a tool_choice of type tool names the tool")
    return {"type": "function", "function": {"name": choice.name}}


# --- the front door


class MessagesDialect:
    """``POST /v1/messages`` (``gateway._dialect``): the key from ``x-api-key`` or
    ``Authorization: Bearer``, Anthropic's request and error shapes."""

    def credential(self, headers: Headers) -> str:
        key = headers.get("x-api-key")
        return f"Bearer {key}" if key else headers.get("authorization", "")

    def parse(self, body: bytes) -> Call:
        req = parse_messages_request(body)
        parts = functools.partial(to_job_parts, req)
        writer = MessagesWriter(req.model, thinking=req.shows_thinking)
        return Call(route=req.model, stream=req.stream, writer=writer, parts=parts)

    def error_response(self, err: ApiError) -> Response:
        return error_response(err)


MESSAGES = MessagesDialect()


async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``: refused; a count would be a guess."""
    message = (
        "POST /v1/messages/count_tokens is not served: llmrelay has no tokenizer for its "
        "upstreams; an answer's usage gives the tokens it took"
    )
    return error_response(api_error("not_found", message))
