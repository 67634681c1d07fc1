"""Anthropic Messages API: ``POST {base_url}/v1/messages`` with ``stream: true``.

The event stream is ``message_start`` (input tokens), ``content_block_delta``
(text, tool input, thinking), ``message_delta`` (stop reason, output tokens),
``message_stop``; ``ping`` is keep-alive noise and an ``error`` event (e.g.
``overloaded_error``) ends the answer. The answer is final at the
``message_delta`` that carries the stop reason, so a server that never sends
``message_stop`` costs nothing; a stream that ends before a stop reason is
truncated and raises ``StreamInterrupted``.

System messages go to the top-level ``system`` field, because the API accepts
only user/assistant turns, and ``max_tokens`` is mandatory there. Stop reasons
are normalised to OpenAI's words (``end_turn`` -> ``stop``, ``max_tokens`` ->
``length``) so the rest of llmrelay sees one vocabulary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, ClassVar

import httpx
import msgspec
from msgspec import UNSET, UnsetType

from broker._config import PoolConfig
from broker._errors import StreamInterrupted, UpstreamRejected
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
from workers.providers._errors_map import error_for_payload
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
from workers.providers._sse import SSEEvent, SSEParser

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
_PARAMS = {"temperature": "temperature", "top_p": "top_p", "stop": "stop_sequences"}
# Structured output on Anthropic is a tool the model is made to call: its input is
# the JSON answer, streamed as the answer's text (never as a tool call).
ANSWER_TOOL = "json_answer"
_ANSWER_DESCRIPTION = "Give your whole answer as this tool's input, in the JSON it describes."
# reasoning_effort as a budget of thinking tokens (1,024 is Anthropic's least); the
# budget comes on top of the answer's max_tokens, which Anthropic counts it in.
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384}
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt_tokens(self) -> int | None:
        if self.input_tokens is None:
            return None
        cached = (self.cache_creation_input_tokens or 0) + (self.cache_read_input_tokens or 0)
        return self.input_tokens + cached


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    stop_reason: str | None = None


class _Block(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int = 0
    content_block: _Block | None = None
    message: _Message | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: Any = None


_event_decoder = msgspec.json.Decoder(_Event)
_encoder = msgspec.json.Encoder()


class AnthropicProvider:
    """Adapter for ``kind: anthropic`` pools. Tools map to Anthropic's (``tool_use`` and
    ``tool_result`` blocks, ``input_json_delta`` streamed as argument fragments), images
    to ``image`` blocks (by URL, or base64 from a data URL), ``response_format`` to a
    forced tool whose input is the answer (``ANSWER_TOOL``), and ``reasoning_effort``
    to extended thinking (``THINKING_BUDGETS``), whose ``thinking`` blocks stream as
    reasoning."""

    features: ClassVar[frozenset[str]] = frozenset(
        {"tools", "images", "response_format", "reasoning_effort"}
    )

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        self._client = client
        self._url = join_url(pool.base_url, "/v1/messages")
        auth = {"x-api-key": pool.api_key.reveal()} if pool.api_key else {}
        extra = {"accept": "text/event-stream", "anthropic-version": API_VERSION}
        self._headers = static_headers(pool, {**extra, **auth})

    async def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        headers = job_headers(self._headers, job)
        trailing = TrailingWhitespace(prefill)
        body_bytes = request_body(job, model, trailing.sent)
        async with open_stream(self._client, self._url, headers=headers, body=body_bytes) as body:
            state = _StreamState(trailing)
            parse = lambda event: optional(state.on_event(event))  # noqa: E731
            async with aclosing(answer_items(body, SSEParser(), parse)) as items:
                async for item in items:
                    yield item
            if not body.complete:
                yield state.at_end_of_body()


def request_body(job: Job, model: str, prefill: str = "") -> bytes:
    """The request; a ``prefill`` (without trailing whitespace, which the API refuses)
    is the last assistant turn, which the model continues."""
    system = "\n\n".join(m.content for m in job.messages if m.role == "system")
    turns = _merged([_turn(m) for m in job.messages if m.role != "system"])
    if prefill:
        turns.append({"role": "assistant", "content": prefill})
    body: dict[str, Any] = {
        "model": model,
        "messages": turns,
        "max_tokens": job.max_tokens or DEFAULT_MAX_TOKENS,
        "stream": True,
        **job_params(job, _PARAMS),
    }
    if system:
        body["system"] = system
    if job.tools:
        body["tools"] = [_tool(t) for t in job.tools]
        choice = _tool_choice(job.tool_choice, job.parallel_tool_calls)
        if choice is not None:
            body["tool_choice"] = choice
    if wants_json(job):
        _force_answer_tool(body, job)
    if job.reasoning_effort is not None:
        budget = THINKING_BUDGETS[job.reasoning_effort]
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        body["max_tokens"] += budget
    return _encoder.encode(with_provider_options(body, job, "anthropic"))


def wants_json(job: Job) -> bool:
    return job.response_format is not None and job.response_format.type != "text"


def _force_answer_tool(body: dict[str, Any], job: Job) -> None:
    """The answer as ``ANSWER_TOOL``'s input. With the caller's tools beside it the model
    must call one of them or the answer tool ("any"), as OpenAI's model may answer
    either way; a named ``tool_choice`` stays as it is."""
    assert job.response_format is not None
    spec = job.response_format.json_schema
    schema = (spec.schema if spec is not None else None) or {"type": "object"}
    if schema.get("type") != "object":
        raise UpstreamRejected("response_format: anthropic pools take a schema of an object")
    if any(t.function.name == ANSWER_TOOL for t in job.tools or ()):
        raise UpstreamRejected(f"response_format: a tool may not be called {ANSWER_TOOL!r} here")
    answer = {"name": ANSWER_TOOL, "description": _ANSWER_DESCRIPTION, "input_schema": schema}
    body["tools"] = [*body.get("tools", ()), answer]
    choice = body.get("tool_choice", {})
    if choice.get("type") != "tool":
        body["tool_choice"] = {"type": "tool", "name": ANSWER_TOOL}
        if job.tools and choice.get("type") != "none":
            body["tool_choice"] = {"type": "any"}
        else:
            body["tools"] = [answer]


def _turn(message: Message) -> dict[str, Any]:
    """One turn: a tool result is a user turn's ``tool_result`` block, an assistant's
    tool calls its ``tool_use`` blocks (after its text, if any)."""
    if message.role == "tool":
        result = {"type": "tool_result", "tool_use_id": message.tool_call_id,
                  "content": message.content}  # fmt: skip
        return {"role": "user", "content": [result]}
    role = "assistant" if message.role == "assistant" else "user"
    if message.parts:
        return {"role": role, "content": [_part(part) for part in message.parts]}
    if not message.tool_calls:
        return {"role": role, "content": message.content}
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
    blocks = blocks if message.content else []
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                       "input": arguments_object(call.function.arguments)})  # fmt: skip
    return {"role": role, "content": blocks}


def _part(part: ContentPart) -> dict[str, Any]:
    """A content part as Anthropic's block: an image by URL, or base64 from a data URL."""
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if not isinstance(part, ImagePart):  # audio: refused before (``features``)
        raise UpstreamRejected("audio parts are not supported by anthropic pools")
    url = part.image_url.url
    if url.startswith("data:"):
        media, _, data = url[len("data:") :].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _merged(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive turns of one role as one (several tool results answer one message)."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        if out and out[-1]["role"] == turn["role"]:
            out[-1] = {"role": turn["role"], "content": _blocks(out[-1]) + _blocks(turn)}
        else:
            out.append(turn)
    return out


def _blocks(turn: dict[str, Any]) -> list[dict[str, Any]]:
    content = turn["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _tool(tool: Tool) -> dict[str, Any]:
    fn = tool.function
    out: dict[str, Any] = {"name": fn.name, "input_schema": fn.parameters or {"type": "object"}}
    if fn.description:
        out["description"] = fn.description
    return out


def _tool_choice(choice: str | dict[str, Any] | None, parallel: bool | None) -> Any:
    """OpenAI's ``tool_choice`` (and ``parallel_tool_calls``) in Anthropic's words."""
    if choice is None and parallel is None:
        return None
    if isinstance(choice, dict):
        out: dict[str, Any] = {"type": "tool", "name": choice.get("function", {}).get("name")}
    else:
        out = {"type": {"required": "any", "none": "none"}.get(choice or "auto", "auto")}
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


class _StreamState:
    """Usage and stop reason gathered across events; one handler per event type.

    ``trailing``: the whitespace cut off the end of a prefill (``_prefill.py``).
    """

    def __init__(self, trailing: TrailingWhitespace | None = None) -> None:
        self._trailing = trailing or TrailingWhitespace(None)
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self._answer_blocks: set[int] = set()  # blocks of the ``ANSWER_TOOL``: the JSON text
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens: int | UnsetType = UNSET  # read from the prompt cache, if said
        self.reason: str | None = None
        self._handlers: dict[str, Callable[[_Event], StreamItem | None]] = {
            "message_start": self._message_start,
            "content_block_start": self._block_start,
            "content_block_delta": self._content_delta,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
            "error": self._error,
        }

    def on_event(self, event: SSEEvent) -> StreamItem | None:
        try:
            decoded = _event_decoder.decode(event.data)
        except msgspec.DecodeError:
            return Malformed(event.data)
        handler = self._handlers.get(decoded.type or event.event)
        return handler(decoded) if handler is not None else None

    def at_end_of_body(self) -> Finish:
        raise StreamInterrupted("the stream ended before a stop_reason: answer truncated")

    def _message_start(self, event: _Event) -> None:
        usage = event.message.usage if event.message else None
        self._count(usage)

    def _block_start(self, event: _Event) -> StreamItem | None:
        """A ``tool_use`` block opens a tool call: its id and name (OpenAI numbers tool
        calls 0, 1, ... where Anthropic numbers every content block)."""
        block = event.content_block
        if block is None or block.type != "tool_use":
            return None
        if block.name == ANSWER_TOOL:
            self._answer_blocks.add(event.index)
            return None
        self._tool_index[event.index] = index = len(self._tool_index)
        return ToolCallDelta(index=index, id=block.id, name=block.name)

    def _content_delta(self, event: _Event) -> StreamItem | None:
        delta = event.delta
        if delta is None:
            return None
        if delta.type == "text_delta" and delta.text:
            text = self._trailing.skip(delta.text)
            return TextDelta(text) if text else None
        if delta.type == "thinking_delta" and delta.thinking:
            return ReasoningDelta(delta.thinking)
        if delta.type == "input_json_delta" and delta.partial_json:
            if event.index in self._answer_blocks:
                return TextDelta(self._trailing.skip(delta.partial_json))
            index = self._tool_index.get(event.index)
            if index is not None:
                return ToolCallDelta(index=index, arguments=delta.partial_json)
        return None

    def _message_delta(self, event: _Event) -> Finish | None:
        # The stop reason and final usage are all message_stop would confirm, so the
        # answer is final here; a server that never sends message_stop costs nothing.
        self._count(event.usage)
        if event.delta is None or not event.delta.stop_reason:
            return None
        self.reason = STOP_REASONS.get(event.delta.stop_reason, event.delta.stop_reason)
        if self.reason == "tool_calls" and not self._tool_index:
            self.reason = "stop"  # only the answer tool was called: the answer is its JSON
        return self._finish()

    def _message_stop(self, event: _Event) -> Finish:
        return self._finish()

    def _error(self, event: _Event) -> None:
        raise error_for_payload({"error": event.error})

    def _count(self, usage: _Usage | None) -> None:
        if usage is None:
            return
        prompt = usage.prompt_tokens()
        if prompt is not None:
            self.prompt_tokens = prompt
        if usage.output_tokens is not None:
            self.completion_tokens = usage.output_tokens
        if usage.cache_read_input_tokens is not None:
            self.cached_tokens = usage.cache_read_input_tokens

    def _finish(self) -> Finish:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                      cached_tokens=self.cached_tokens)  # fmt: skip
        return Finish(self.reason or "stop", usage)
