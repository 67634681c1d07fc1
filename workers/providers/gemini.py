"""Google Gemini API: ``POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse``.

The key goes in an ``x-goog-api-key`` header. The request is Gemini's own
shape: ``contents`` of ``user``/``model`` turns (an assistant is ``model``),
system messages joined into ``systemInstruction``, sampling parameters under
``generationConfig`` (structured output too: ``responseMimeType`` and
``responseJsonSchema``). A prefill is a last ``model`` turn, which Gemini continues.

Each SSE ``data:`` chunk is a whole ``GenerateContentResponse``: text in
``candidates[0].content.parts``, and in the last chunk a ``finishReason`` with
``usageMetadata``. The answer is final at the chunk that carries both (a server
that keeps the socket open after it costs nothing), or at the end of the body
after a ``finishReason``; a body that ends without one is truncated and raises
``StreamInterrupted``. A prompt blocked by Google's filters comes as
``promptFeedback.blockReason`` (``ContentFiltered``), an error mid-stream as a
chunk with an ``error`` object (Google's error body). Finish reasons are
normalised to OpenAI's words (``STOP`` -> ``stop``, ``MAX_TOKENS`` -> ``length``,
the safety family -> ``content_filter``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import ContentFiltered, StreamInterrupted
from broker._protocol import Job, Message, Usage
from workers.providers._base import Finish, Malformed, StreamItem, TextDelta
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

_PARAMS = {
    "max_tokens": "maxOutputTokens",
    "temperature": "temperature",
    "top_p": "topP",
    "stop": "stopSequences",
    "seed": "seed",
}
_FILTERED = ("SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY")
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"} | dict.fromkeys(
    _FILTERED, "content_filter"
)


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool | None = None  # a thinking model's summary, not part of the answer


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Chunk(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _PromptFeedback | None = None
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


class GeminiProvider:
    """Adapter for ``kind: gemini`` pools. Structured output (``responseSchema``) and
    reasoning (``thinkingConfig``) are not mapped yet: such jobs are refused."""

    features: ClassVar[frozenset[str]] = frozenset({"response_format"})

    def __init__(self, pool: PoolConfig, client: httpx.AsyncClient) -> None:
        self._client = client
        self._base_url = pool.base_url
        auth = {"x-goog-api-key": pool.api_key.reveal()} if pool.api_key else {}
        self._headers = static_headers(pool, {"accept": "text/event-stream", **auth})

    def _url(self, model: str) -> str:
        # quote: a model name may carry characters a path may not (the fake's "+" faults).
        path = f"/v1beta/models/{quote(model, safe='')}:streamGenerateContent"
        return join_url(self._base_url, path) + "?alt=sse"

    async def stream(
        self, job: Job, model: str, *, prefill: str | None = None
    ) -> AsyncIterator[StreamItem]:
        headers = job_headers(self._headers, job)
        body_bytes = request_body(job, prefill)
        url = self._url(model)
        async with open_stream(self._client, url, headers=headers, body=body_bytes) as body:
            state = _StreamState()
            async with aclosing(answer_items(body, SSEParser(), state.on_event)) as items:
                async for item in items:
                    yield item
            if not body.complete:
                yield state.at_end_of_body()


def request_body(job: Job, prefill: str | None = None) -> bytes:
    """The request (the model is in the URL); a ``prefill`` is the last ``model`` turn."""
    system = "\n\n".join(m.content for m in job.messages if m.role == "system")
    contents = [_turn(m) for m in job.messages if m.role != "system"]
    if prefill:
        contents.append(_content("model", prefill))
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config = job_params(job, _PARAMS) | _json_output(job)
    if config:
        body["generationConfig"] = config
    return _encoder.encode(with_provider_options(body, job, "gemini"))


def _json_output(job: Job) -> dict[str, Any]:
    """Structured output: JSON (``responseMimeType``), of a JSON Schema if one is given
    (``responseJsonSchema``, Gemini's field for standard JSON Schema)."""
    fmt = job.response_format
    if fmt is None or fmt.type == "text":
        return {}
    config: dict[str, Any] = {"responseMimeType": "application/json"}
    if fmt.json_schema is not None and fmt.json_schema.schema is not None:
        config["responseJsonSchema"] = fmt.json_schema.schema
    return config


def _turn(message: Message) -> dict[str, Any]:
    # Gemini has two roles; a plain-text tool result is the user's turn.
    return _content("model" if message.role == "assistant" else "user", message.content)


def _content(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"text": text}]}


class _StreamState:
    """What the stream has said so far: the finish reason and the latest usage."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage: Usage | None = None

    def on_event(self, event: SSEEvent) -> list[StreamItem]:
        try:
            chunk = _chunk_decoder.decode(event.data)
        except msgspec.DecodeError:
            return [Malformed(event.data)]
        return self.on_chunk(chunk)

    def on_chunk(self, chunk: _Chunk) -> list[StreamItem]:
        if chunk.error is not None:
            raise error_for_payload({"error": chunk.error})
        _check_feedback(chunk.prompt_feedback)
        items: list[StreamItem] = []
        if chunk.candidates:
            items.extend(self._candidate(chunk.candidates[0]))
        if chunk.usage_metadata is not None:
            self.usage = _usage(chunk.usage_metadata)
            if self.reason is not None:
                items.append(self._finish("usage came"))
        return items

    def _candidate(self, candidate: _Candidate) -> list[StreamItem]:
        if candidate.finish_reason:
            reason = candidate.finish_reason
            self.reason = FINISH_REASONS.get(reason, reason.lower())
        parts = candidate.content.parts if candidate.content else []
        return [TextDelta(p.text) for p in parts if p.text and not p.thought]

    def at_end_of_body(self) -> Finish:
        return self._finish("the stream ended")

    def _finish(self, where: str) -> Finish:
        if self.reason is None:
            raise StreamInterrupted(f"{where} before any finishReason: answer truncated")
        return Finish(self.reason, self.usage)


def _check_feedback(feedback: _PromptFeedback | None) -> None:
    if feedback is not None and feedback.block_reason:
        reason = feedback.block_reason
        raise ContentFiltered(f"the prompt was blocked by the provider ({reason})")


def _usage(meta: _UsageMetadata) -> Usage:
    # Thinking tokens are billed as output, so they count as completion tokens.
    completion = meta.candidates_token_count + meta.thoughts_token_count
    return Usage(prompt_tokens=meta.prompt_token_count, completion_tokens=completion)
