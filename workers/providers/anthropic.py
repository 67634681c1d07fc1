"""Anthropic Messages API: ``POST {base_url}/v1/messages`` with ``stream: true``.

The event stream is ``message_start`` (input tokens), ``content_block_delta``
(text), ``message_delta`` (stop reason, output tokens), ``message_stop``; ``ping``
is keep-alive noise and an ``error`` event (e.g. ``overloaded_error``) ends the
answer. The answer is final at the ``message_delta`` that carries the stop
reason, so a server that never sends ``message_stop`` costs nothing; a stream
that ends before a stop reason is truncated and raises ``StreamInterrupted``.

System messages go to the top-level ``system`` field, because the API accepts
only user/assistant turns, and ``max_tokens`` is mandatory there. Stop reasons
are normalised to OpenAI's words (``end_turn`` -> ``stop``, ``max_tokens`` ->
``length``) so the rest of llmrelay sees one vocabulary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import httpx
import msgspec

from broker._config import PoolConfig
from broker._errors import StreamInterrupted
from broker._protocol import Job, Message, Usage
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
from workers.providers._prefill import TrailingWhitespace
from workers.providers._sse import SSEEvent, SSEParser

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
_PARAMS = {"temperature": "temperature", "top_p": "top_p", "stop": "stop_sequences"}
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
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    message: _Message | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: Any = None


_event_decoder = msgspec.json.Decoder(_Event)
_encoder = msgspec.json.Encoder()


class AnthropicProvider:
    """Adapter for ``kind: anthropic`` pools. Structured output (a forced tool) and
    reasoning (``thinking``) are not mapped yet: such jobs are refused."""

    features: ClassVar[frozenset[str]] = frozenset()

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
            async for event in body.items(SSEParser()):
                item = state.on_event(event)
                if item is not None:
                    body.complete = isinstance(item, Finish)
                    yield item
                    if body.complete:
                        return
            yield state.at_end_of_body()


def request_body(job: Job, model: str, prefill: str = "") -> bytes:
    """The request; a ``prefill`` (without trailing whitespace, which the API refuses)
    is the last assistant turn, which the model continues."""
    system = "\n\n".join(m.content for m in job.messages if m.role == "system")
    turns = [_turn(m) for m in job.messages if m.role != "system"]
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
    return _encoder.encode(with_provider_options(body, job, "anthropic"))


def _turn(message: Message) -> dict[str, str]:
    # The Messages API has no "tool" role for plain-text results; they are user turns.
    role = "assistant" if message.role == "assistant" else "user"
    return {"role": role, "content": message.content}


class _StreamState:
    """Usage and stop reason gathered across events; one handler per event type.

    ``trailing``: the whitespace cut off the end of a prefill (``_prefill.py``).
    """

    def __init__(self, trailing: TrailingWhitespace | None = None) -> None:
        self._trailing = trailing or TrailingWhitespace(None)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reason: str | None = None
        self._handlers: dict[str, Callable[[_Event], StreamItem | None]] = {
            "message_start": self._message_start,
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

    def _content_delta(self, event: _Event) -> StreamItem | None:
        delta = event.delta
        if delta is not None and delta.type == "text_delta" and delta.text:
            text = self._trailing.skip(delta.text)
            return TextDelta(text) if text else None
        return None

    def _message_delta(self, event: _Event) -> Finish | None:
        # The stop reason and final usage are all message_stop would confirm, so the
        # answer is final here; a server that never sends message_stop costs nothing.
        self._count(event.usage)
        if event.delta is None or not event.delta.stop_reason:
            return None
        self.reason = STOP_REASONS.get(event.delta.stop_reason, event.delta.stop_reason)
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

    def _finish(self) -> Finish:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return Finish(self.reason or "stop", usage)
