"""Ollama's native chat API: ``POST {base_url}/api/chat``, answered as NDJSON.

Each line is ``{"message": {"content": ...}, "done": false}`` until the last,
``{"done": true, "done_reason", "prompt_eval_count", "eval_count"}``, which
carries the usage. Ollama reports failures as ``{"error": "..."}``, either as
the whole body of an error status or as a line inside a 200 stream. Sampling
parameters live under ``options`` (``num_predict`` is Ollama's max_tokens).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import StreamInterrupted
from broker._protocol import Job, Usage
from workers.providers._base import Finish, Malformed, StreamItem, TextDelta
from workers.providers._errors_map import error_for_payload
from workers.providers._http import (
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


class _Message(msgspec.Struct):
    content: str = ""


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
    (``"json"``, or the JSON schema itself)."""

    features: ClassVar[frozenset[str]] = frozenset({"response_format"})

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        self._client = client
        self._url = join_url(pool.base_url, "/api/chat")
        # Ollama itself needs no key; one set on the pool is for a proxy in front of it.
        auth = {"authorization": f"Bearer {pool.api_key.reveal()}"} if pool.api_key else {}
        self._headers = static_headers(pool, {"accept": "application/x-ndjson", **auth})

    async def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        headers = job_headers(self._headers, job)
        body_bytes = request_body(job, model, prefill)
        async with open_stream(self._client, self._url, headers=headers, body=body_bytes) as body:
            async for line in body.items(NDJSONParser()):
                for item in _items(line):
                    body.complete = isinstance(item, Finish)
                    yield item
                    if body.complete:
                        return
        raise StreamInterrupted("the stream ended before done: true: answer truncated")


def request_body(job: Job, model: str, prefill: str | None = None) -> bytes:
    """The request; a ``prefill`` is a last assistant message, which Ollama continues."""
    messages = [{"role": m.role, "content": m.content} for m in job.messages]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    options = job_params(job, _OPTIONS)
    if options:
        body["options"] = options
    fmt = job.response_format
    if fmt is not None and fmt.type == "json_object":
        body["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        body["format"] = (fmt.json_schema.schema if fmt.json_schema else None) or "json"
    return _encoder.encode(with_provider_options(body, job, "ollama"))


def _items(line: bytes) -> list[StreamItem]:
    try:
        decoded = _line_decoder.decode(line)
    except msgspec.DecodeError:
        return [Malformed(line.decode("utf-8", "replace"))]
    if decoded.error is not None:
        raise error_for_payload({"error": decoded.error})
    items: list[StreamItem] = []
    if decoded.message is not None and decoded.message.content:
        items.append(TextDelta(decoded.message.content))
    if decoded.done:
        usage = Usage(prompt_tokens=decoded.prompt_eval_count, completion_tokens=decoded.eval_count)
        items.append(Finish(decoded.done_reason or "stop", usage))
    return items
