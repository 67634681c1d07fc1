"""AWS Bedrock ConverseStream: ``POST {base_url}/model/{modelId}/converse-stream``, SigV4-signed.

A Bedrock target's ``model`` is the model id (``anthropic.claude-3-5-haiku-20241022-v1:0``),
percent-encoded into the path. Every request is signed with the pool's AWS
credentials for its ``region`` and service ``bedrock`` (``_sigv4.py``): the
signature covers the exact body bytes, so the body is encoded once and signed
as sent, and the date, so each request is signed anew.

The request is Converse's: ``messages`` of ``user``/``assistant`` turns whose
``content`` is a list of blocks (adjacent turns of one role are merged, as
Converse requires them to alternate), system messages as ``system`` blocks,
sampling parameters under ``inferenceConfig``. A prefill is a last assistant
turn (its trailing whitespace cut, which Anthropic's models refuse), which the
model continues. Tools are ``toolConfig.tools[].toolSpec`` (the parameters under
``inputSchema.json``) with ``toolChoice`` ``auto``/``any``/``tool`` (``"none"``
sends no ``toolConfig``); an assistant's tool calls are ``toolUse`` blocks (the
arguments an object), a ``tool`` message a user turn's ``toolResult`` block, and an
image an ``image`` block of base64 ``bytes``: Bedrock fetches no links, so a
linked image (or a format it does not read) is ``FeatureUnsupported`` and goes
to a target that takes it.

The answer is a binary event stream (``_eventstream.py``): ``messageStart``,
``contentBlockStart`` (a ``toolUse`` block's id and name), ``contentBlockDelta``
(text, or a fragment of a ``toolUse``'s input JSON, passed on as a
``ToolCallDelta`` numbered among the tool calls), ``contentBlockStop``,
``messageStop`` (the stop reason, normalised to OpenAI's words: ``tool_use`` ->
``tool_calls``) and ``metadata`` (usage). It is final
once both ``messageStop`` and ``metadata`` came, or at the end of the body after
a ``messageStop``; a body that ends before one is truncated (``StreamInterrupted``).
An ``exception`` frame ends the answer with its ``:exception-type`` translated
(throttling -> ``RateLimited``; service unavailable, internal server and model
stream errors -> ``UpstreamUnavailable``; validation -> ``UpstreamRejected``, or
context length when the message says so). A frame that fails its CRC is a
``Malformed`` item; one that loses the framing breaks the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import FeatureUnsupported, ProviderError, StreamInterrupted, UpstreamRejected
from broker._protocol import (
    ContentPart,
    ImagePart,
    Job,
    Message,
    TextPart,
    Tool,
    ToolCallDelta,
    Usage,
)
from workers.providers._base import Finish, Malformed, ReasoningDelta, StreamItem, TextDelta
from workers.providers._errors_map import error_for_payload, error_for_status
from workers.providers._eventstream import BadFrame, EventMessage, EventStreamParser
from workers.providers._http import (
    answer_items,
    arguments_object,
    job_headers,
    job_params,
    join_url,
    open_stream,
    optional,
    static_headers,
    with_provider_options,
)
from workers.providers._prefill import TrailingWhitespace
from workers.providers._sigv4 import AwsCredentials, sign

SERVICE = "bedrock"
_PARAMS = {
    "max_tokens": "maxTokens",
    "temperature": "temperature",
    "top_p": "topP",
    "stop": "stopSequences",
}
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
    "tool_use": "tool_calls",
}
# The HTTP status each exception frame's type has when Bedrock answers it before
# the stream, so one table (``error_for_status``) classifies both. A model stream
# error is the model's failure mid-answer (424 over HTTP): retried elsewhere.
_EXCEPTION_STATUS = {
    "throttlingException": 429,
    "serviceUnavailableException": 503,
    "internalServerException": 500,
    "modelStreamErrorException": 500,
    "modelTimeoutException": 408,
    "modelNotReadyException": 503,
    "validationException": 400,
    "accessDeniedException": 403,
    "resourceNotFoundException": 404,
}


# The image formats Converse reads, by the media type of a data URL.
_IMAGE_FORMATS = {f"image/{name}": name for name in ("png", "jpeg", "gif", "webp")}


class _ToolUse(msgspec.Struct, rename="camel"):
    """A ``toolUse`` block's start (``tool_use_id``, ``name``) or delta (``input``)."""

    tool_use_id: str | None = None
    name: str | None = None
    input: str = ""


class _Reasoning(msgspec.Struct):
    text: str | None = None


class _Delta(msgspec.Struct, rename="camel"):
    text: str | None = None
    tool_use: _ToolUse | None = None
    reasoning_content: _Reasoning | None = None


class _Start(msgspec.Struct, rename="camel"):
    tool_use: _ToolUse | None = None


class _Usage(msgspec.Struct, rename="camel"):
    input_tokens: int = 0
    output_tokens: int = 0


class _Event(msgspec.Struct, rename="camel"):
    content_block_index: int = 0
    start: _Start | None = None
    delta: _Delta | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_encoder = msgspec.json.Encoder()


class BedrockProvider:
    """Adapter for ``kind: bedrock`` pools: tools (``toolUse``/``toolResult`` blocks,
    input streamed as argument fragments) and images as data (``image`` blocks of
    bytes); structured output, reasoning and documents are not mapped yet."""

    features: ClassVar[frozenset[str]] = frozenset({"tools", "images"})

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        self._client = client
        self._base_url = pool.base_url
        self._region = pool.region or ""
        self._credentials = AwsCredentials(
            _reveal(pool.aws_access_key_id),
            _reveal(pool.aws_secret_access_key),
            _reveal(pool.aws_session_token) or None,
        )
        self._headers = static_headers(pool, {"accept": "application/vnd.amazon.eventstream"})

    def _url(self, model: str) -> str:
        return join_url(self._base_url, f"/model/{quote(model, safe='')}/converse-stream")

    def _signed_headers(self, job: Job, url: str, body: bytes) -> dict[str, str]:
        headers = job_headers(self._headers, job)
        added = sign("POST", url, headers, body, region=self._region, service=SERVICE,
                     credentials=self._credentials)  # fmt: skip
        return {**headers, **added}

    async def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        trailing = TrailingWhitespace(prefill)
        body_bytes = request_body(job, trailing.sent)
        url = self._url(model)
        headers = self._signed_headers(job, url, body_bytes)
        async with open_stream(self._client, url, headers=headers, body=body_bytes) as body:
            state = _StreamState(trailing)
            parse = lambda message: optional(state.on_message(message))  # noqa: E731
            async with aclosing(answer_items(body, EventStreamParser(), parse)) as items:
                async for item in items:
                    yield item
            if not body.complete:
                yield state.at_end_of_body()


def _reveal(secret: Any) -> str:
    return str(secret.reveal()) if secret else ""


def request_body(job: Job, prefill: str = "") -> bytes:
    """The Converse request (the model is in the URL); a ``prefill`` (already without
    trailing whitespace) is the last assistant turn."""
    system = [{"text": m.content} for m in job.messages if m.role == "system"]
    turns: list[dict[str, Any]] = []
    for message in job.messages:
        if message.role != "system":
            _add_turn(turns, _role(message), _blocks(message))
    if prefill:
        _add_turn(turns, "assistant", [{"text": prefill}])
    body: dict[str, Any] = {"messages": turns}
    if system:
        body["system"] = system
    config = job_params(job, _PARAMS)
    if config:
        body["inferenceConfig"] = config
    tool_config = _tool_config(job)
    if tool_config is not None:
        body["toolConfig"] = tool_config
    return _encoder.encode(with_provider_options(body, job, "bedrock"))


def _role(message: Message) -> str:
    # Converse has only user and assistant turns; a tool result is the user's.
    return "assistant" if message.role == "assistant" else "user"


def _add_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append blocks; to the last turn if it has this role (turns must alternate)."""
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _blocks(message: Message) -> list[dict[str, Any]]:
    """A message's content blocks: a tool result, its parts, or its text and then its
    tool calls (no empty text block: Converse refuses blank text)."""
    if message.role == "tool":
        result = {"toolUseId": message.tool_call_id or "", "content": [{"text": message.content}]}
        return [{"toolResult": result}]
    if message.parts:
        return [_part(part) for part in message.parts]
    blocks: list[dict[str, Any]] = [{"text": message.content}] if message.content else []
    for call in message.tool_calls or ():
        use = {"toolUseId": call.id, "name": call.function.name,
               "input": arguments_object(call.function.arguments)}  # fmt: skip
        blocks.append({"toolUse": use})
    return blocks or [{"text": message.content}]


def _part(part: ContentPart) -> dict[str, Any]:
    """A content part as a block: text, or an image's bytes from a data URL."""
    if isinstance(part, TextPart):
        return {"text": part.text}
    if not isinstance(part, ImagePart):  # audio: refused before (``features``)
        raise UpstreamRejected("audio parts are not supported by bedrock pools")
    media, _, data = part.image_url.url.removeprefix("data:").partition(";base64,")
    image_format = _IMAGE_FORMATS.get(media)
    if not part.image_url.url.startswith("data:") or not data or image_format is None:
        raise FeatureUnsupported(
            "images: bedrock pools take png, jpeg, gif or webp images as data: URLs "
            "(base64), not links",
            features=frozenset({"images"}),
        )
    return {"image": {"format": image_format, "source": {"bytes": data}}}


def _tool_config(job: Job) -> dict[str, Any] | None:
    """``toolConfig``: the tools and OpenAI's ``tool_choice`` in Converse's words; None
    without tools or with ``tool_choice: "none"`` (Converse has no word for it)."""
    choice = job.tool_choice
    if not job.tools or choice == "none":
        return None
    config: dict[str, Any] = {"tools": [_tool(t) for t in job.tools]}
    if isinstance(choice, dict):
        config["toolChoice"] = {"tool": {"name": choice.get("function", {}).get("name")}}
    elif choice is not None:
        config["toolChoice"] = {"any": {}} if choice == "required" else {"auto": {}}
    return config


def _tool(tool: Tool) -> dict[str, Any]:
    fn = tool.function
    spec: dict[str, Any] = {"name": fn.name}
    if fn.description:
        spec["description"] = fn.description
    spec["inputSchema"] = {"json": fn.parameters or {"type": "object"}}
    return {"toolSpec": spec}


def _exception(message: EventMessage) -> ProviderError:
    """The error an ``exception`` (or legacy ``error``) frame reports."""
    name = message.header(":exception-type") or message.header(":error-code")
    payload = message.payload or _encoder.encode({"message": message.header(":error-message")})
    status = _EXCEPTION_STATUS.get(name[:1].lower() + name[1:])
    if status is None:
        return error_for_payload({"error": {"type": name, "message": _message_of(payload)}})
    return error_for_status(status, {}, payload)


def _message_of(payload: bytes) -> str:
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return payload.decode("utf-8", "replace")
    return str(decoded.get("message", "")) if isinstance(decoded, dict) else str(decoded)


class _StreamState:
    """Stop reason and usage gathered across frames; one handler per event type.

    ``trailing``: the whitespace cut off the end of a prefill (``_prefill.py``).
    """

    def __init__(self, trailing: TrailingWhitespace | None = None) -> None:
        self._trailing = trailing or TrailingWhitespace(None)
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self.reason: str | None = None
        self.usage: Usage | None = None
        self._handlers: dict[str, Callable[[_Event], StreamItem | None]] = {
            "contentBlockStart": self._block_start,
            "contentBlockDelta": self._content_delta,
            "messageStop": self._message_stop,
            "metadata": self._metadata,
        }

    def on_message(self, message: EventMessage | BadFrame) -> StreamItem | None:
        if isinstance(message, BadFrame):
            if message.fatal:
                raise StreamInterrupted(f"the event stream broke: {message.reason}")
            return Malformed(message.reason)
        kind = message.header(":message-type") or "event"
        if kind != "event":
            raise _exception(message)
        handler = self._handlers.get(message.header(":event-type"))
        if handler is None:
            return None  # messageStart, contentBlockStop: nothing to pass on
        try:
            event = _event_decoder.decode(message.payload)
        except msgspec.DecodeError:
            return Malformed(message.payload.decode("utf-8", "replace"))
        return handler(event)

    def at_end_of_body(self) -> Finish:
        if self.reason is None:
            raise StreamInterrupted("the stream ended before messageStop: answer truncated")
        return self._finish()

    def _block_start(self, event: _Event) -> ToolCallDelta | None:
        """A ``toolUse`` block opens a tool call: its id and name (OpenAI numbers tool
        calls 0, 1, ... where Converse numbers every content block)."""
        use = event.start.tool_use if event.start is not None else None
        if use is None:
            return None
        self._tool_index[event.content_block_index] = index = len(self._tool_index)
        return ToolCallDelta(index=index, id=use.tool_use_id, name=use.name)

    def _content_delta(self, event: _Event) -> StreamItem | None:
        delta = event.delta
        if delta is not None and delta.tool_use is not None and delta.tool_use.input:
            index = self._tool_index.get(event.content_block_index)
            return (
                None
                if index is None
                else ToolCallDelta(index=index, arguments=delta.tool_use.input)
            )
        if delta is not None and delta.reasoning_content is not None:
            thought = delta.reasoning_content.text
            return ReasoningDelta(thought) if thought else None
        text = delta.text if delta is not None else None
        if not text:
            return None
        text = self._trailing.skip(text)
        return TextDelta(text) if text else None

    def _message_stop(self, event: _Event) -> Finish | None:
        stop = event.stop_reason or "end_turn"
        self.reason = STOP_REASONS.get(stop, stop)
        return self._finish() if self.usage is not None else None

    def _metadata(self, event: _Event) -> Finish | None:
        if event.usage is not None:
            usage = event.usage
            self.usage = Usage(prompt_tokens=usage.input_tokens,
                               completion_tokens=usage.output_tokens)  # fmt: skip
        return self._finish() if self.reason is not None and self.usage is not None else None

    def _finish(self) -> Finish:
        return Finish(self.reason or "stop", self.usage or Usage())
