"""Google Gemini API: ``POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse``.

The key goes in an ``x-goog-api-key`` header. The request is Gemini's own
shape: ``contents`` of ``user``/``model`` turns (an assistant is ``model``),
system messages joined into ``systemInstruction``, sampling parameters under
``generationConfig`` (structured output too: ``responseMimeType`` and
``responseJsonSchema``). A prefill is a last ``model`` turn, which Gemini continues.

Tools are one ``tools`` entry of ``functionDeclarations`` (parameters as
``parametersJsonSchema``, which takes full JSON Schema), ``tool_choice`` is
``toolConfig.functionCallingConfig`` (``AUTO``/``NONE``/``ANY``, a named function
``ANY`` of that one name). An assistant's tool calls are ``functionCall`` parts of its
``model`` turn (``args`` an object), tool results ``functionResponse`` parts of one
``user`` turn, each named by the call it answers (Gemini matches results by name and
place, so no ids are sent). Images are ``inlineData`` (a data URL's base64) or
``fileData`` (an https link, which Gemini fetches; a plain http link goes to a
target that takes it: ``FeatureUnsupported``).

Each SSE ``data:`` chunk is a whole ``GenerateContentResponse``: text in
``candidates[0].content.parts``, and in the last chunk a ``finishReason`` with
``usageMetadata``. The answer is final at the chunk that carries both (a server
that keeps the socket open after it costs nothing), or at the end of the body
after a ``finishReason``; a body that ends without one is truncated and raises
``StreamInterrupted``. A prompt blocked by Google's filters comes as
``promptFeedback.blockReason`` (``ContentFiltered``), an error mid-stream as a
chunk with an ``error`` object (Google's error body). Finish reasons are
normalised to OpenAI's words (``STOP`` -> ``stop``, ``MAX_TOKENS`` -> ``length``,
the safety family -> ``content_filter``). A ``functionCall`` part comes whole in one
chunk, ``args`` an object: it is one ``ToolCallDelta`` with all the arguments, its id
Gemini's own or else made up from its place (``call_0``, ...), and an answer with
calls that says ``STOP`` (as Gemini does) finishes with ``tool_calls``.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar
from urllib.parse import quote, unquote_to_bytes, urlsplit

import httpx
import msgspec
from msgspec import UNSET

from broker._config import PoolConfig
from broker._errors import (
    ContentFiltered,
    FeatureUnsupported,
    StreamInterrupted,
    UpstreamRejected,
)
from broker._protocol import (
    ContentPart,
    ImagePart,
    Job,
    Message,
    TextPart,
    Tool,
    ToolCall,
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
_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}  # tool_choice -> mode
_IMAGES = frozenset({"images"})


class _FunctionCall(msgspec.Struct):
    name: str = ""
    args: Any = None
    id: str | None = None  # a recent API's own id for the call


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool | None = None  # a thinking model's summary, not part of the answer
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int | None = None
    cached_content_token_count: int | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Chunk(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _PromptFeedback | None = None
    error: Any = None


# reasoning_effort as Gemini 2.5's thinkingBudget (tokens); 24,576 is Flash's most.
THINKING_BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


class GeminiProvider:
    """Adapter for ``kind: gemini`` pools: tools, images, structured output, and
    ``reasoning_effort`` as a thinking budget (``THINKING_BUDGETS``) whose thought
    summaries stream as reasoning."""

    features: ClassVar[frozenset[str]] = frozenset(
        {"tools", "images", "response_format", "reasoning_effort"}
    )

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
    contents = _contents(job.messages)
    if prefill:
        contents.append(_content("model", prefill))
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if job.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(t) for t in job.tools]}]
        if job.tool_choice is not None:
            body["toolConfig"] = {"functionCallingConfig": _calling_config(job.tool_choice)}
    config = job_params(job, _PARAMS) | _json_output(job)
    if job.reasoning_effort is not None:
        budget = THINKING_BUDGETS[job.reasoning_effort]
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True}
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


def _declaration(tool: Tool) -> dict[str, Any]:
    """A function as Gemini declares it: its parameters as ``parametersJsonSchema``, which
    takes the JSON Schema OpenAI's tools carry (``parameters`` takes an OpenAPI subset)."""
    fn = tool.function
    out: dict[str, Any] = {"name": fn.name}
    if fn.description:
        out["description"] = fn.description
    if fn.parameters is not None:
        out["parametersJsonSchema"] = fn.parameters
    return out


def _calling_config(choice: str | dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``tool_choice`` as Gemini's mode; a named function is ``ANY`` of that name."""
    if isinstance(choice, dict):
        return {"mode": "ANY", "allowedFunctionNames": [choice.get("function", {}).get("name")]}
    return {"mode": _MODES.get(choice, "AUTO")}


def _contents(messages: list[Message]) -> list[dict[str, Any]]:
    """The turns (system messages go to ``systemInstruction``). The results of one call
    turn are one ``user`` turn: Gemini wants as many ``functionResponse`` parts there as
    the turn before it had calls."""
    names: dict[str, str] = {}  # tool call id -> the function's name, of the latest call
    contents: list[dict[str, Any]] = []
    after_result = False
    for message in messages:
        if message.role == "system":
            continue
        names.update((call.id, call.function.name) for call in message.tool_calls or ())
        turn = _turn(message, names)
        if after_result and message.role == "tool":
            contents[-1]["parts"] += turn["parts"]
        else:
            contents.append(turn)
        after_result = message.role == "tool"
    return contents


def _turn(message: Message, names: dict[str, str]) -> dict[str, Any]:
    """One turn; Gemini has two roles, so a tool result is a ``user`` turn."""
    if message.role == "tool":
        return {"role": "user", "parts": [_function_response(message, names)]}
    parts = [_part(part) for part in message.parts or ()]
    if not parts and (message.content or not message.tool_calls):
        parts = [{"text": message.content}]
    parts += [_function_call(call) for call in message.tool_calls or ()]
    return {"role": "model" if message.role == "assistant" else "user", "parts": parts}


def _content(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"text": text}]}


def _function_call(call: ToolCall) -> dict[str, Any]:
    return {
        "functionCall": {
            "name": call.function.name,
            "args": arguments_object(call.function.arguments),
        }
    }


def _function_response(message: Message, names: dict[str, str]) -> dict[str, Any]:
    """A tool's result, named by the call it answers; a result that is not a JSON object
    is wrapped (``{"result": text}``), as ``response`` is one."""
    call_id = message.tool_call_id or ""
    name = names.get(call_id, message.name)
    if name is None:
        raise UpstreamRejected(f"a tool result answers {call_id!r}, which no tool call is")
    if message.parts:  # images: a tool message carries no other parts (audio is refused)
        raise FeatureUnsupported("images: gemini pools take no images in tool results",
                                 features=_IMAGES)  # fmt: skip
    try:
        value = msgspec.json.decode(message.content)
    except msgspec.DecodeError:
        value = None
    response = value if isinstance(value, dict) else {"result": message.content}
    return {"functionResponse": {"name": name, "response": response}}


def _part(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"text": part.text}
    if not isinstance(part, ImagePart):  # audio: refused before (``features``)
        raise UpstreamRejected("audio parts are not supported by gemini pools")
    return _image(part.image_url.url)


def _image(url: str) -> dict[str, Any]:
    """An image as ``inlineData`` (a data URL's bytes, base64) or ``fileData`` (an https
    link, which Gemini fetches; its type guessed from the path, else Gemini reads it)."""
    if url.startswith("data:"):
        header, _, data = url[len("data:") :].partition(",")
        mime, _, encoding = header.partition(";")
        if encoding != "base64":  # percent-encoded, as an svg's may be
            data = base64.b64encode(unquote_to_bytes(data)).decode()
        return {"inlineData": {"mimeType": mime, "data": data}}
    if not url.startswith("https://"):
        raise FeatureUnsupported(
            "images: gemini pools fetch https links only (or take data: URLs)", features=_IMAGES
        )
    file = {"fileUri": url}
    guessed = mimetypes.guess_type(urlsplit(url).path)[0]
    if guessed is not None and guessed.startswith("image/"):
        file["mimeType"] = guessed
    return {"fileData": file}


class _StreamState:
    """What the stream has said so far: the finish reason and the latest usage."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.calls = 0  # function calls so far: the next one's index

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
        return [item for part in parts if (item := self._item(part)) is not None]

    def _item(self, part: _Part) -> StreamItem | None:
        if part.function_call is not None:
            return self._call(part.function_call)
        if not part.text:
            return None
        return ReasoningDelta(part.text) if part.thought else TextDelta(part.text)

    def _call(self, call: _FunctionCall) -> ToolCallDelta:
        """A whole call as one fragment: all its arguments, and Gemini's id or one made up."""
        index, self.calls = self.calls, self.calls + 1
        arguments = _encoder.encode(call.args if call.args is not None else {}).decode()
        return ToolCallDelta(index=index, id=call.id or f"call_{index}", name=call.name,
                             arguments=arguments)  # fmt: skip

    def at_end_of_body(self) -> Finish:
        return self._finish("the stream ended")

    def _finish(self, where: str) -> Finish:
        if self.reason is None:
            raise StreamInterrupted(f"{where} before any finishReason: answer truncated")
        # Gemini says STOP after function calls too; OpenAI's word for that is tool_calls.
        reason = "tool_calls" if self.calls and self.reason == "stop" else self.reason
        return Finish(reason, self.usage)


def _check_feedback(feedback: _PromptFeedback | None) -> None:
    if feedback is not None and feedback.block_reason:
        reason = feedback.block_reason
        raise ContentFiltered(f"the prompt was blocked by the provider ({reason})")


def _usage(meta: _UsageMetadata) -> Usage:
    # Thinking tokens are billed as output, so they count as completion tokens.
    thoughts, cached = meta.thoughts_token_count, meta.cached_content_token_count
    return Usage(
        prompt_tokens=meta.prompt_token_count,
        completion_tokens=meta.candidates_token_count + (thoughts or 0),
        cached_tokens=UNSET if cached is None else cached,
        reasoning_tokens=UNSET if thoughts is None else thoughts,
    )
