"""OpenAI's response objects as typed Structs, and the SSE frames of a streamed answer.

The field order and the fields that appear as ``null`` follow what the OpenAI
API sends, so that its SDKs read these answers unchanged: ``system_fingerprint``,
``logprobs``, a chunk's ``finish_reason`` and an error's ``param`` are always
present (``null`` when there is nothing to say). A ``ChoiceDelta`` leaves out
what it does not carry; a chunk's ``usage`` is left out (``UNSET``) unless the
client asked for usage, and is then ``null`` on every chunk but the last.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType
from starlette.responses import Response

from broker._protocol import Done, TokenLogprob, ToolCall


class PromptTokensDetails(msgspec.Struct, frozen=True, kw_only=True):
    cached_tokens: int


class CompletionTokensDetails(msgspec.Struct, frozen=True, kw_only=True):
    reasoning_tokens: int


class CompletionUsage(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's usage object; the details only when the upstream reported them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET

    @classmethod
    def of(cls, done: Done) -> CompletionUsage:
        u = done.usage
        cached, reasoning = u.cached_tokens, u.reasoning_tokens
        return cls(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details=UNSET
            if isinstance(cached, UnsetType)
            else PromptTokensDetails(cached_tokens=cached),
            completion_tokens_details=UNSET
            if isinstance(reasoning, UnsetType)
            else CompletionTokensDetails(reasoning_tokens=reasoning),
        )


class ToolCallFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call: whole in a ``message``; in a stream, one per call, with ``index``."""

    index: int | UnsetType = UNSET
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    @classmethod
    def of(cls, call: ToolCall, index: int | UnsetType = UNSET) -> ToolCallOut:
        fn = ToolCallFunction(name=call.function.name, arguments=call.function.arguments)
        return cls(index=index, id=call.id, function=fn)


class ChatCompletionMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | UnsetType = UNSET
    # Not OpenAI's: the reasoning text, under the name vLLM and DeepSeek use.
    reasoning_content: str | UnsetType = UNSET


class ChoiceLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    """``choices[].logprobs``: the answer's tokens with their log probabilities."""

    content: list[TokenLogprob]
    refusal: None = None


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """A ``chat.completion`` object: a whole (non-streamed) answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[Choice]
    usage: CompletionUsage


class ChoiceDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    """A ``chat.completion.chunk`` object: one SSE event of a streamed answer."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | UnsetType | None = UNSET


class Model(msgspec.Struct, frozen=True, kw_only=True):
    """A route, as ``GET /v1/models`` lists it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llmrelay"


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Model]


class AttemptInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One failed attempt, as an error object's ``attempts`` lists it."""

    pool: str
    model: str
    code: str
    status: int | None
    message: str


class ErrorObject(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str
    attempts: list[AttemptInfo] | UnsetType = UNSET


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorObject


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """The body of ``/healthz`` and ``/readyz``."""

    status: str
    reason: str | UnsetType = UNSET


_encoder = msgspec.json.Encoder()


def encode_json(body: msgspec.Struct) -> bytes:
    return _encoder.encode(body)


def json_response(
    body: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(encode_json(body), status, headers=headers, media_type="application/json")


def sse_data(body: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(body) + b"\n\n"


def model_card(route: str) -> Model:
    return Model(id=route)


def model_list(routes: Iterable[str]) -> ModelList:
    return ModelList(data=[model_card(r) for r in routes])


class CompletionIds(msgspec.Struct, frozen=True):
    """What every chunk of one answer repeats."""

    id: str
    created: int
    route: str


def completion(
    ids: CompletionIds,
    text: str,
    done: Done,
    tool_calls: list[ToolCall] | None = None,
    *,
    reasoning: str = "",
    logprobs: list[TokenLogprob] | None = None,
) -> ChatCompletion:
    """The ``chat.completion`` object of a whole answer (with its tool calls, reasoning
    and log probabilities, if any: ``logprobs`` None when the request did not ask)."""
    thought = reasoning or UNSET
    if tool_calls:
        calls = [ToolCallOut.of(call) for call in tool_calls]
        message = ChatCompletionMessage(content=text or None, tool_calls=calls,
                                        reasoning_content=thought)  # fmt: skip
    else:
        message = ChatCompletionMessage(content=text, reasoning_content=thought)
    scores = None if logprobs is None else ChoiceLogprobs(content=logprobs)
    choice = Choice(message=message, logprobs=scores, finish_reason=done.finish_reason)
    return ChatCompletion(
        id=ids.id,
        created=ids.created,
        model=done.model,
        choices=[choice],
        usage=CompletionUsage.of(done),
    )


class SseWriter:
    """Encodes ``chat.completion.chunk`` SSE frames for one answer."""

    def __init__(self, ids: CompletionIds, include_usage: bool) -> None:
        self.ids = ids
        self.include_usage = include_usage
        self.role_sent = False
        self.model: str | None = None  # the upstream model, once a chunk names it

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        scores = ChoiceLogprobs(content=logprobs) if logprobs else None
        choice = ChunkChoice(delta=ChoiceDelta(role=self._role(), content=text), logprobs=scores)
        return self._frame(self.model or self.ids.route, [choice])

    def _role(self) -> Literal["assistant"] | None:
        """``assistant`` on the answer's first delta only."""
        if self.role_sent:
            return None
        self.role_sent = True
        return "assistant"

    def reasoning(self, text: str) -> bytes:
        """Reasoning text as ``delta.reasoning_content`` (vLLM's and DeepSeek's name)."""
        delta = ChoiceDelta(role=self._role(), reasoning_content=text)
        return self._frame(self.model or self.ids.route, [ChunkChoice(delta=delta)])

    def tool_calls(self, calls: list[ToolCall]) -> bytes:
        """The answer's tool calls, each whole in one chunk (the gateway holds their
        fragments until the answer is done: a restart never leaves half an argument)."""
        frames = []
        for index, call in enumerate(calls):
            delta = ChoiceDelta(tool_calls=[ToolCallOut.of(call, index)])
            if not self.role_sent:
                delta = ChoiceDelta(role="assistant", tool_calls=delta.tool_calls)
                self.role_sent = True
            frames.append(self._frame(self.model or self.ids.route, [ChunkChoice(delta=delta)]))
        return b"".join(frames)

    def end(self, done: Done) -> bytes:
        """The finish_reason chunk, the usage chunk if asked for, and ``[DONE]``."""
        frames = [] if self.role_sent else [self.text("")]
        last = ChunkChoice(delta=ChoiceDelta(), finish_reason=done.finish_reason)
        frames.append(self._frame(done.model, [last]))
        if self.include_usage:
            frames.append(self._frame(done.model, [], usage=CompletionUsage.of(done)))
        frames.append(b"data: [DONE]\n\n")
        return b"".join(frames)

    def _frame(
        self, model: str, choices: list[ChunkChoice], usage: CompletionUsage | None = None
    ) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.ids.id,
            created=self.ids.created,
            model=model,
            choices=choices,
            usage=usage if self.include_usage else UNSET,
        )
        return sse_data(chunk)
