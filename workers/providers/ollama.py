"""Ollama's native chat API: ``POST {base_url}/api/chat``, answered as NDJSON.

Each line is ``{"message": {"content": ...}, "done": false}`` until the last,
``{"done": true, "done_reason", "prompt_eval_count", "eval_count"}``, which
carries the usage. Ollama reports failures as ``{"error": "..."}``, either as
the whole body of an error status or as a line inside a 200 stream. Sampling
parameters live under ``options`` (``num_predict`` is Ollama's max_tokens).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar

import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import FeatureUnsupported, StreamInterrupted
from broker._protocol import ImagePart, Job, Message, ToolCallDelta, Usage
from workers.providers._base import Finish, Malformed, ReasoningDelta, StreamItem, TextDelta
from workers.providers._embed import ollama_embeddings
from workers.providers._errors_map import error_for_payload
from workers.providers._http import (
    answer_items,
    arguments_object,
    job_headers,
    job_params,
    join_url,
    open_stream,
    static_headers,
    with_provider_options,
)
from workers.providers._sse import NDJSONParser

_OPTIONS = {
    "max_tokens": "num_predict",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
}


class _Function(msgspec.Struct):
    name: str = ""
    arguments: Any = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str = ""
    thinking: str = ""  # a thinking model's reasoning, streamed before the answer
    tool_calls: list[_ToolCall] | None = None


class _Line(msgspec.Struct):
    message: _Message | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    eval_count: int = 0
    error: Any = None


_line_decoder = msgspec.json.Decoder(_Line)
_encoder = msgspec.json.Encoder()


class OllamaProvider:
    """Adapter for ``kind: ollama`` pools: structured output is Ollama's ``format``
    (``"json"``, or the JSON schema itself); tools pass in OpenAI's shape and a call
    comes back whole in one line (arguments as an object, no id: ids are made up
    from the call's place); images go as a message's base64 ``images``."""

    features: ClassVar[frozenset[str]] = frozenset(
        {"tools", "images", "response_format", "embeddings"}
    )

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        self._client = client
        self._url = join_url(pool.base_url, "/api/chat")
        self._embed_url = join_url(pool.base_url, "/api/embed")
        # Ollama itself needs no key; one set on the pool is for a proxy in front of it.
        auth = {"authorization": f"Bearer {pool.api_key.reveal()}"} if pool.api_key else {}
        self._headers = static_headers(pool, {"accept": "application/x-ndjson", **auth})

    async def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        if job.embed is not None:  # one non-streamed call (``_embed.py``)
            yield await ollama_embeddings(self._client, self._embed_url, self._headers, job, model)
            return
        headers = job_headers(self._headers, job)
        body_bytes = request_body(job, model, prefill)
        async with open_stream(self._client, self._url, headers=headers, body=body_bytes) as body:
            async with aclosing(answer_items(body, NDJSONParser(), _Lines().items)) as items:
                async for item in items:
                    yield item
            if body.complete:
                return
        raise StreamInterrupted("the stream ended before done: true: answer truncated")


def request_body(job: Job, model: str, prefill: str | None = None) -> bytes:
    """The request; a ``prefill`` is a last assistant message, which Ollama continues."""
    names = {c.id: c.function.name for m in job.messages for c in m.tool_calls or ()}
    messages = [_message(m, names) for m in job.messages]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if job.tools:
        body["tools"] = job.tools
    options = job_params(job, _OPTIONS)
    if options:
        body["options"] = options
    fmt = job.response_format
    if fmt is not None and fmt.type == "json_object":
        body["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        body["format"] = (fmt.json_schema.schema if fmt.json_schema else None) or "json"
    return _encoder.encode(with_provider_options(body, job, "ollama"))


def _message(m: Message, names: dict[str, str]) -> dict[str, Any]:
    """One message in Ollama's words: tool calls with object arguments, a tool result
    with the name of the tool it answers, images as base64 data."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "function": {
                    "name": c.function.name,
                    "arguments": arguments_object(c.function.arguments),
                }
            }
            for c in m.tool_calls
        ]
    if m.role == "tool" and m.tool_call_id in names:
        out["tool_name"] = names[m.tool_call_id]
    images = [_base64(p.image_url.url) for p in m.parts or () if isinstance(p, ImagePart)]
    if images:
        out["images"] = images
    return out


def _base64(url: str) -> str:
    """An image's data: Ollama takes base64 only, not URLs to fetch."""
    if not url.startswith("data:") or ";base64," not in url:
        raise FeatureUnsupported(
            "images: ollama pools take images as data: URLs (base64), not links",
            features=frozenset({"images"}),
        )
    return url.partition(";base64,")[2]


class _Lines:
    """Items of the NDJSON lines; tool calls are numbered across lines."""

    def __init__(self) -> None:
        self.calls = 0

    def items(self, line: bytes) -> list[StreamItem]:
        try:
            decoded = _line_decoder.decode(line)
        except msgspec.DecodeError:
            return [Malformed(line.decode("utf-8", "replace"))]
        if decoded.error is not None:
            raise error_for_payload({"error": decoded.error})
        items: list[StreamItem] = []
        message = decoded.message
        if message is not None and message.thinking:
            items.append(ReasoningDelta(message.thinking))
        if message is not None and message.content:
            items.append(TextDelta(message.content))
        for call in (message.tool_calls or ()) if message is not None else ():
            fn = call.function or _Function()
            arguments = msgspec.json.encode(fn.arguments or {}).decode()
            items.append(ToolCallDelta(index=self.calls, id=f"call_{self.calls}",
                                       name=fn.name, arguments=arguments))  # fmt: skip
            self.calls += 1
        if decoded.done:
            usage = Usage(prompt_tokens=decoded.prompt_eval_count,
                          completion_tokens=decoded.eval_count)  # fmt: skip
            reason = "tool_calls" if self.calls else decoded.done_reason or "stop"
            items.append(Finish(reason, usage))
        return items
