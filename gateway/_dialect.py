"""The seam between an HTTP API and the exchange machinery every API shares.

Every front door (OpenAI chat completions, Anthropic Messages) turns a request
into the same job and reads the same events through one ``Exchange`` (the fold,
the hold-back, the cancel on disconnect, the metrics); what differs is only how
a request is read and how an answer and an error are written. A ``Dialect`` is
one API, one instance per process: it finds the request's key, parses a body
into a ``Call`` (its route, the job's parts, the ``Writer`` of its answer) and
writes an error raised before a job exists. A ``Writer`` writes one request's answer:
whole, or as the stream a ``StreamEncoder`` encodes, and its errors.

``ChatDialect`` (``CHAT``) is the OpenAI chat completions API; the Anthropic
Messages API is ``gateway._messages`` (``MESSAGES``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import msgspec
from starlette.datastructures import Headers
from starlette.responses import Response

from broker._client import JobOptions
from broker._protocol import Done, Message, TokenLogprob, ToolCall
from gateway._apierror import ApiError
from gateway._request import ChatRequest, job_options, parse_request, to_messages
from gateway._responses import CompletionIds, SseWriter, completion, sse_data


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer as the fold put it together."""

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)


class StreamEncoder(Protocol):
    """The bytes of one streamed answer, piece by piece (``model``: the upstream model,
    once a chunk names it)."""

    model: str | None

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes: ...

    def reasoning(self, text: str) -> bytes: ...

    def tool_calls(self, calls: list[ToolCall]) -> bytes: ...

    def end(self, done: Done) -> bytes: ...


class Writer(Protocol):
    """How one request's answer and errors are written."""

    def whole(self, request_id: str, reply: Reply, done: Done) -> msgspec.Struct: ...

    def stream(self, request_id: str) -> StreamEncoder: ...

    def error_response(self, err: ApiError) -> Response: ...

    def error_event(self, err: ApiError) -> bytes: ...


class JobParts(NamedTuple):
    messages: list[Message]
    options: JobOptions


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """A parsed request: its route, the writer of its answer, and ``parts(traceparent)``,
    the job's messages and options (raises ``InvalidRequest`` naming the field)."""

    route: str
    stream: bool
    writer: Writer
    parts: Callable[[str | None], JobParts]


class Dialect(Protocol):
    """One API: its request's key, its parsing, its errors before a job exists."""

    def credential(self, headers: Headers) -> str:
        """The ``Authorization`` value to check (``Bearer <key>``)."""
        ...

    def parse(self, body: bytes) -> Call:
        """The request as a ``Call``; raises ``InvalidRequest`` naming the field."""
        ...

    def error_response(self, err: ApiError) -> Response: ...


class ChatWriter:
    """OpenAI's ``chat.completion`` object, or its ``chat.completion.chunk`` stream."""

    def __init__(self, req: ChatRequest) -> None:
        self.route = req.model
        self.include_usage = req.include_usage
        self.logprobs = bool(req.logprobs)
        self.created = int(time.time())

    def whole(self, request_id: str, reply: Reply, done: Done) -> msgspec.Struct:
        return completion(
            self._ids(request_id), reply.text, done, reply.tool_calls,
            reasoning=reply.reasoning, logprobs=reply.logprobs if self.logprobs else None,
        )  # fmt: skip

    def stream(self, request_id: str) -> StreamEncoder:
        return SseWriter(self._ids(request_id), self.include_usage)

    def error_response(self, err: ApiError) -> Response:
        return err.response()

    def error_event(self, err: ApiError) -> bytes:
        return sse_data(err.body())

    def _ids(self, request_id: str) -> CompletionIds:
        return CompletionIds(f"chatcmpl-{request_id}", self.created, self.route)


class ChatDialect:
    """``POST /v1/chat/completions``: a bearer key, OpenAI's request and error shapes."""

    def credential(self, headers: Headers) -> str:
        return headers.get("authorization", "")

    def parse(self, body: bytes) -> Call:
        req = parse_request(body)
        parts = functools.partial(_chat_parts, req)
        return Call(route=req.model, stream=req.stream, writer=ChatWriter(req), parts=parts)

    def error_response(self, err: ApiError) -> Response:
        return err.response()


def _chat_parts(req: ChatRequest, traceparent: str | None) -> JobParts:
    return JobParts(to_messages(req), job_options(req, traceparent))


CHAT = ChatDialect()
