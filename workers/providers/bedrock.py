"""AWS Bedrock ConverseStream: ``POST {base_url}/model/{modelId}/converse-stream``, SigV4-signed.

A Bedrock target's ``model`` is the model id (``anthropic.claude-3-5-haiku-20241022-v1:0``),
percent-encoded into the path. Every request is signed with the pool's AWS
credentials for its ``region`` and service ``bedrock`` (``_sigv4.py``): the
signature covers the exact body bytes, so the body is encoded once and signed
as sent, and the date, so each request is signed anew.

The request is Converse's: ``messages`` of ``user``/``assistant`` turns whose
``content`` is a list of ``{"text"}`` blocks (adjacent turns of one role are
merged, as Converse requires them to alternate; a ``tool`` message is a user
turn, as in ``anthropic.py``), system messages as ``system`` blocks, sampling
parameters under ``inferenceConfig``. A prefill is a last assistant turn (its
trailing whitespace cut, which Anthropic's models refuse), which the model continues.

The answer is a binary event stream (``_eventstream.py``): ``messageStart``,
``contentBlockDelta`` (text), ``contentBlockStop``, ``messageStop`` (the stop
reason, normalised to OpenAI's words) and ``metadata`` (usage). It is final
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
from broker._errors import ProviderError, StreamInterrupted
from broker._protocol import Job, Message, Usage
from workers.providers._base import Finish, Malformed, StreamItem, TextDelta
from workers.providers._errors_map import error_for_payload, error_for_status
from workers.providers._eventstream import BadFrame, EventMessage, EventStreamParser
from workers.providers._http import (
    answer_items,
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


class _Delta(msgspec.Struct):
    text: str | None = None


class _Usage(msgspec.Struct, rename="camel"):
    input_tokens: int = 0
    output_tokens: int = 0


class _Event(msgspec.Struct, rename="camel"):
    delta: _Delta | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_encoder = msgspec.json.Encoder()


class BedrockProvider:
    """Adapter for ``kind: bedrock`` pools (text only: no tools, images or documents yet)."""

    features: ClassVar[frozenset[str]] = frozenset()

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
            _add_turn(turns, _role(message), message.content)
    if prefill:
        _add_turn(turns, "assistant", prefill)
    body: dict[str, Any] = {"messages": turns}
    if system:
        body["system"] = system
    config = job_params(job, _PARAMS)
    if config:
        body["inferenceConfig"] = config
    return _encoder.encode(with_provider_options(body, job, "bedrock"))


def _role(message: Message) -> str:
    # Converse has only user and assistant turns; a plain-text tool result is the user's.
    return "assistant" if message.role == "assistant" else "user"


def _add_turn(turns: list[dict[str, Any]], role: str, text: str) -> None:
    """Append a text block; to the last turn if it has this role (turns must alternate)."""
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].append({"text": text})
    else:
        turns.append({"role": role, "content": [{"text": text}]})


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
        self.reason: str | None = None
        self.usage: Usage | None = None
        self._handlers: dict[str, Callable[[_Event], StreamItem | None]] = {
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
            return None  # messageStart, contentBlockStart/Stop: nothing to pass on
        try:
            event = _event_decoder.decode(message.payload)
        except msgspec.DecodeError:
            return Malformed(message.payload.decode("utf-8", "replace"))
        return handler(event)

    def at_end_of_body(self) -> Finish:
        if self.reason is None:
            raise StreamInterrupted("the stream ended before messageStop: answer truncated")
        return self._finish()

    def _content_delta(self, event: _Event) -> TextDelta | None:
        text = event.delta.text if event.delta is not None else None
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
