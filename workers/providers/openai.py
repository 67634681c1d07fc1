"""OpenAI-compatible chat completions: OpenAI itself, and the many servers that copy it.

``POST {base_url}/chat/completions`` with ``stream: true`` answers with SSE
``data:`` chunks. Usage comes in a last chunk with empty ``choices`` (asked for
with ``stream_options.include_usage``), then ``data: [DONE]``. The answer is
finalised as soon as it is known to be complete (the usage chunk after a
``finish_reason``), not when the server gets round to ``[DONE]`` or closing the
stream, so a server that forgets ``[DONE]`` costs nothing. A stream that ends
without any ``finish_reason`` is a truncated answer and raises
``StreamInterrupted``; it is never passed off as complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar

import httpx
import msgspec
from msgspec import UNSET

from broker._config import PoolConfig
from broker._errors import StreamInterrupted
from broker._protocol import Job, Message, TokenLogprob, ToolCallDelta, Usage
from workers.providers._base import Finish, Malformed, ReasoningDelta, StreamItem, TextDelta
from workers.providers._embed import openai_embeddings
from workers.providers._errors_map import error_for_payload
from workers.providers._http import (
    answer_items,
    job_headers,
    job_params,
    join_url,
    open_stream,
    static_headers,
    with_provider_options,
)
from workers.providers._sse import SSEEvent, SSEParser

_TOOL_PARAMS = {"tool_choice": "tool_choice", "parallel_tool_calls": "parallel_tool_calls"}
_PARAMS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
}


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None
    # Reasoning text: vLLM and DeepSeek call it ``reasoning_content``, OpenRouter ``reasoning``.
    reasoning_content: str | None = None
    reasoning: str | None = None


class _Logprobs(msgspec.Struct):
    content: list[TokenLogprob] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def usage(self) -> Usage:
        """As llmrelay counts it: the cached and reasoning parts when reported."""
        cached = self.prompt_tokens_details.cached_tokens if self.prompt_tokens_details else None
        details = self.completion_tokens_details
        reasoning = details.reasoning_tokens if details else None
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=UNSET if cached is None else cached,
            reasoning_tokens=UNSET if reasoning is None else reasoning,
        )


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


class OpenAIProvider:
    """Adapter for ``kind: openai`` pools: tools, tool calls and tool results, structured
    output, reasoning effort and logprobs pass through in OpenAI's own shapes; streamed
    tool-call fragments become ``ToolCallDelta`` items, reasoning text (vLLM's, DeepSeek's)
    ``ReasoningDelta`` items."""

    features: ClassVar[frozenset[str]] = frozenset(
        {"tools", "images", "audio", "response_format", "reasoning_effort", "logprobs"}
        | {"embeddings"}
    )
    kind = "openai"

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        self._client = client
        self._base_url = pool.base_url
        self._headers = static_headers(pool, {"accept": "text/event-stream", **self._auth(pool)})

    def _auth(self, pool: PoolConfig) -> dict[str, str]:
        return {"authorization": f"Bearer {pool.api_key.reveal()}"} if pool.api_key else {}

    def _url(self, model: str, path: str = "/chat/completions") -> str:
        return join_url(self._base_url, path)

    async def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        if job.embed is not None:  # one non-streamed call (``_embed.py``)
            url = self._url(model, "/embeddings")
            yield await openai_embeddings(self._client, url, self._headers, job, model, self.kind)
            return
        headers = job_headers(self._headers, job)
        body_bytes = request_body(job, model, prefill, self.kind)
        url = self._url(model)
        async with open_stream(self._client, url, headers=headers, body=body_bytes) as body:
            state = _StreamState()
            async with aclosing(answer_items(body, SSEParser(), state.on_event)) as items:
                async for item in items:
                    yield item
            if not body.complete:
                yield state.at_end_of_body()


def request_body(job: Job, model: str, prefill: str | None = None, kind: str = "openai") -> bytes:
    """The request; a ``prefill`` is the last assistant message, continued
    (``continue_final_message``, as vLLM and other OpenAI-compatible servers take it;
    OpenAI's own API refuses it with a 400, and the worker then restarts instead)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": _wire_messages(job.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        **job_params(job, _PARAMS),
    }
    if job.tools:
        body["tools"] = job.tools
        body |= job_params(job, _TOOL_PARAMS)
    if job.response_format is not None and job.response_format.type != "text":
        body["response_format"] = job.response_format
    if job.reasoning_effort is not None:
        body["reasoning_effort"] = job.reasoning_effort
    if job.logprobs:
        body["logprobs"] = True
        if job.top_logprobs:
            body["top_logprobs"] = job.top_logprobs
    if prefill:
        body["messages"] = [*job.messages, Message(role="assistant", content=prefill)]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return _encoder.encode(with_provider_options(body, job, kind))


class _StreamState:
    """What the stream has said so far: a finish reason and usage arrive separately."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage: Usage | None = None

    def on_event(self, event: SSEEvent) -> list[StreamItem]:
        if event.data == "[DONE]":
            return [self._finish("[DONE] came")]
        if event.event == "error":
            raise error_for_payload(_json_or_text(event.data))
        try:
            chunk = _chunk_decoder.decode(event.data)
        except msgspec.DecodeError:
            return [Malformed(event.data)]
        return self._on_chunk(chunk)

    def _on_chunk(self, chunk: _Chunk) -> list[StreamItem]:
        if chunk.error is not None:
            raise error_for_payload({"error": chunk.error})
        items: list[StreamItem] = []
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta is not None:
                logprobs = choice.logprobs.content if choice.logprobs is not None else None
                items.extend(_delta_items(choice.delta, logprobs))
            self.reason = choice.finish_reason or self.reason
        if chunk.usage is not None:
            self.usage = chunk.usage.usage()
            if self.reason is not None:
                items.append(self._finish("usage came"))
        return items

    def at_end_of_body(self) -> Finish:
        return self._finish("the stream ended")

    def _finish(self, where: str) -> Finish:
        if self.reason is None:
            raise StreamInterrupted(f"{where} before any finish_reason: answer truncated")
        return Finish(self.reason, self.usage)


def _wire_messages(messages: list[Message]) -> list[Any]:
    """The messages in OpenAI's shape: one with images or audio has its parts as content."""
    if not any(m.parts for m in messages):
        return messages
    return [m if not m.parts else _with_parts(m) for m in messages]


def _with_parts(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.parts}
    if m.name:
        out["name"] = m.name
    return out


def _delta_items(delta: _Delta, logprobs: list[TokenLogprob] | None) -> list[StreamItem]:
    items: list[StreamItem] = []
    reasoning = delta.reasoning_content or delta.reasoning
    if reasoning:
        items.append(ReasoningDelta(reasoning))
    if delta.content:
        items.append(TextDelta(delta.content, logprobs or None))
    if delta.tool_calls:
        items.extend(_tool_fragment(call) for call in delta.tool_calls)
    return items


def _tool_fragment(call: _ToolCallDelta) -> ToolCallDelta:
    fn = call.function
    name, arguments = (fn.name, fn.arguments or "") if fn is not None else (None, "")
    return ToolCallDelta(index=call.index, id=call.id, name=name, arguments=arguments)


def _json_or_text(data: str) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {"error": data}
