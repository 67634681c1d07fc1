"""The wire protocol: every struct that crosses NATS, in one module.

JSON on the wire so that any NATS client in any language can publish a job
(`llm.jobs.<route>`) and read its events (`llm.reply.<request_id>`). Structs only
ever grow by adding fields with defaults, and decoding ignores unknown fields, so
an older worker reads a newer client's job.

Events are a tagged union on the ``type`` field::

    Event = Chunk | Notice | Done | Error

Every event carries ``attempt`` (the id of one delivery of the job to a
provider: unique, and growing with every redelivery and re-queue) and
``job_seq`` (the stream sequence of the job as its client published it, the
seq of its PubAck), and chunks carry ``seq`` (0, 1, 2 ... within that attempt).
A client keeps only the text of the newest attempt of its own job
(``broker/_fold.py``): a ``Notice`` with ``reset=True``, or an event of a newer
attempt, discards what came before, and events of older attempts or of another
job never count.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

Role = Literal["system", "user", "assistant", "tool"]


class FunctionCall(msgspec.Struct, kw_only=True):
    """What a tool call asks: the function's name and its arguments as JSON text."""

    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct, kw_only=True):
    """A call the model made (an assistant message's ``tool_calls``), OpenAI-style."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ImageUrl(msgspec.Struct, omit_defaults=True, kw_only=True):
    """An image by URL: ``https://...``, or the image itself as ``data:<type>;base64,...``."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class InputAudio(msgspec.Struct, kw_only=True):
    data: str  # base64
    format: Literal["wav", "mp3"]


class TextPart(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type", kw_only=True):
    image_url: ImageUrl


class AudioPart(msgspec.Struct, tag="input_audio", tag_field="type", kw_only=True):
    input_audio: InputAudio


ContentPart = TextPart | ImagePart | AudioPart


class Message(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One chat message, OpenAI-style: an assistant message may carry ``tool_calls``
    (and no text), a ``tool`` message answers the call ``tool_call_id`` names.

    ``content`` is the message's text. A message with images or audio also has
    ``parts``, its whole content in order (OpenAI's content parts); ``content`` is
    then the text of those parts, for targets and checks that read text only.
    """

    role: Role
    content: str = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    parts: list[ContentPart] | None = None


class FunctionDef(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A function the model may call: its name, what it does, its JSON-schema parameters."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, omit_defaults=True, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallDelta(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A fragment of a tool call being streamed: ``index`` says which call; its first
    fragment names ``id`` and ``name``, the rest add ``arguments`` text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class TopLogprob(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One of the likeliest tokens at a place in the answer, with its log probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A token of the answer with its log probability (``Job.logprobs``), in OpenAI's shape;
    ``top_logprobs``: the ``Job.top_logprobs`` likeliest tokens at its place."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class Attempt(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One failed try of a job on one pool, kept in the job and in errors."""

    pool: str
    model: str
    code: str
    message: str
    retryable: bool = False
    status: int | None = None
    deliveries: int = 1
    chunks_sent: int = 0
    at_ms: int = 0
    # Of the text this attempt sent, how much the answer kept (a continuation
    # builds on it), and what it cost (the provider's count, else an estimate).
    chars: int = 0
    completion_tokens: int = 0
    # USD this failed try cost (``broker/_cost.attempt_cost``): absent when unknown.
    cost_usd: float | UnsetType = UNSET


class Resume(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The answer so far of a job whose stream broke after its caller had text.

    A re-queued job carries it (workers' routing state: never taken from a
    client), and the next attempt continues the answer from there instead of
    restarting it (``workers/_continuation.py``). ``text`` is exactly what the
    caller has; ``completion_tokens`` what writing it cost, over every attempt.
    """

    text: str
    completion_tokens: int = 0


class JsonSchemaFormat(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A named JSON schema the answer must follow (OpenAI's ``json_schema`` format)."""

    name: str
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The shape of the answer: free text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


ReasoningEffort = Literal["minimal", "low", "medium", "high"]


class EmbedRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What an embeddings job asks: one vector per text of ``input``, of ``dimensions``
    numbers where the model can shorten its vectors (None: the model's own size)."""

    input: list[str]
    dimensions: int | None = None


class Job(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A chat request plus its routing state.

    ``deadline_ms`` is absolute (Unix epoch milliseconds). ``reply_to`` is the
    subject events are published on, normally ``llm.reply.<id>``. ``pool`` pins
    the job to one pool (no failover). ``attempts`` lists every failed try.
    """

    id: str
    route: str
    messages: list[Message]
    reply_to: str
    deadline_ms: int
    pool: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    traceparent: str | None = None
    created_ms: int = 0
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # Reserved routing state: the rank of the target a re-queued job is meant for.
    rank: int = 0
    # The secret a cancel must carry (the payload of `llm.cancel.<id>`): clients
    # cannot read jobs, so only the submitter knows it. Unset: anyone may cancel.
    cancel_key: str | None = None
    # Reserved routing state: the answer so far, which the next attempt continues.
    resume: Resume | None = None
    # Functions the model may call (OpenAI's shape); ``tool_choice``: "none", "auto",
    # "required", or {"type": "function", "function": {"name": ...}}.
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Structured output and reasoning, for the targets that map them (see
    # ``features``); a target that cannot serve one refuses the job (bad_request).
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    # Log probabilities of the answer's tokens (and of the ``top_logprobs`` likeliest at
    # each place), for the targets that report them; they come back on the chunks.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Provider parameters llmrelay does not model, by provider kind
    # (``{"openai": {"logit_bias": {...}}}``): merged into that kind's request body;
    # a key llmrelay sets itself is refused, never overridden.
    provider_options: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # An embeddings job (its ``messages`` are empty): answered by a ``Done`` whose
    # ``embeddings`` hold the vectors; a target that cannot embed refuses it.
    embed: EmbedRequest | None = None
    # The client reads a ``Done``'s ``final``: a worker may then send an answer's last
    # text inside ``done`` when the provider sent it together with the finish (one
    # message fewer per answer). llmrelay's clients set it; unset, every text is a chunk.
    final_in_done: bool = False


class Usage(msgspec.Struct, omit_defaults=False, kw_only=True):
    """Tokens of an answer. ``cached_tokens`` (of the prompt, read from the provider's
    cache) and ``reasoning_tokens`` (of the completion, spent thinking) appear only
    when the provider reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | UnsetType = UNSET
    reasoning_tokens: int | UnsetType = UNSET


class Timings(msgspec.Struct, kw_only=True):
    """Milliseconds: queued (publish to start), ttft (start to first token), total."""

    queued_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0


class Chunk(msgspec.Struct, tag="chunk", tag_field="type", kw_only=True, omit_defaults=True):
    """A piece of the answer. The first chunk of each attempt (``seq`` 0) also
    names the ``pool`` and upstream ``model`` answering, so a client can show
    who is answering before ``done``."""

    seq: int
    attempt: int
    delta: str
    pool: str | None = None
    model: str | None = None
    # Fragments of tool calls (``delta`` is then usually "").
    tool_calls: list[ToolCallDelta] | None = None
    # Reasoning text ("thinking") the model streamed beside the answer; never part
    # of ``delta``, and not kept across a failover (the continuation is the answer's).
    reasoning: str = ""
    # The log probabilities of ``delta``'s tokens, when the job asked for them.
    logprobs: list[TokenLogprob] | None = None
    # The job's stream sequence as its client published it (0: not from a delivery).
    job_seq: int = 0
    # On the first chunk (seq 0) of an attempt that continues the caller's text: the
    # characters of the answer it continues after, as its resume notice says. A client
    # that missed that notice (lost with a NATS node) folds the chunk as the notice,
    # never as an answer that starts over (``broker/_fold.py``).
    offset: int | None = None


NoticeKind = Literal["retry", "failover", "requeued", "redelivered", "degraded", "resumed"]


class Notice(msgspec.Struct, tag="notice", tag_field="type", kw_only=True, omit_defaults=True):
    """Something the client may want to show: a retry, a failover, a reset, a resume.

    ``reset``: the text so far is void (the next attempt starts over).
    ``resume``: the first ``offset`` characters of the answer stand, and the next
    text continues them: a failover that carries the text along says so, and so
    does the continuing attempt before its first chunk (``kind: resumed``).
    """

    kind: NoticeKind
    attempt: int
    message: str = ""
    from_pool: str | None = None
    to_pool: str | None = None
    reset: bool = False
    delay_ms: int | None = None
    resume: bool = False
    offset: int | None = None
    # The job's stream sequence as its client published it (0: not from a delivery).
    job_seq: int = 0


class Done(msgspec.Struct, tag="done", tag_field="type", kw_only=True):
    """The answer is complete. ``pool``/``model`` name who actually answered."""

    attempt: int
    finish_reason: str
    usage: Usage
    pool: str
    model: str
    timings: Timings
    degraded: bool = False
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # The job's stream sequence as its client published it (0: not from a delivery).
    job_seq: int = 0
    # How many chunks this attempt published (seq 0 .. chunks - 1): a fold that got
    # fewer knows the answer has a hole (0: not said, from an older worker).
    chunks: int = 0
    # An embeddings job's vectors, one per input in order: each the base64 of its
    # little-endian float32 numbers (``broker/_vectors.py``); absent from a chat answer.
    embeddings: list[str] | UnsetType = UNSET
    # USD the answering attempt cost, from its usage at its target's price
    # (``broker/_cost.py``; failed attempts' costs are theirs); absent when unpriced.
    cost_usd: float | UnsetType = UNSET
    # The attempt's last chunk (``seq`` ``chunks - 1``), sent inside ``done`` because the
    # provider sent it with the finish; only to a job with ``final_in_done``. A reader
    # takes it as the chunk before ``done`` (``decode_events``).
    final: Chunk | UnsetType = UNSET


class Error(msgspec.Struct, tag="error", tag_field="type", kw_only=True):
    """The job ended without an answer. ``code`` is one of ``broker.ERROR_CODES``."""

    code: str
    message: str
    retryable: bool = False
    attempt: int = 0
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # The job's stream sequence as its client published it (0: not from a delivery).
    job_seq: int = 0


Event = Chunk | Notice | Done | Error


class DeadLetter(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What `llm.dlq.<route>` holds: the job, or a preview of a payload that was
    not one, and why it died.

    ``raw`` is never the payload itself: it is its first 2 KiB as escaped text
    (``broker/_validate.preview``), and ``raw_bytes`` the payload's full size.
    """

    code: str
    message: str
    at_ms: int
    route: str
    job: Job | None = None
    raw: str | None = None
    raw_bytes: int = 0


class Heartbeat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A worker's entry in the `llm_workers` KV bucket."""

    pool: str
    worker_id: str
    slots: int
    busy: int
    circuit: str = "closed"
    version: str = ""
    at_ms: int = 0
    rpm_used: int = 0
    metrics_port: int | None = None
    # Tokens this worker charged to the pool's budget in the last minute.
    tpm_used: int = 0
    # The circuits of single upstream models that are not closed: model -> state
    # ("open" or "half_open"); ``circuit`` is the pool-level state.
    circuits: dict[str, str] = msgspec.field(default_factory=dict)
    # USD this worker's jobs cost since it started, by route (``llmrelay status``).
    cost_usd: dict[str, float] = msgspec.field(default_factory=dict)


class LifecycleEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What `llm.events.<kind>` carries: one line per thing that happened."""

    kind: str
    request_id: str
    route: str = ""
    pool: str = ""
    at_ms: int = 0
    detail: str = ""


class PoolPause(msgspec.Struct, kw_only=True):
    """What `llm.control.<pool>.pause` carries: every worker of the pool stops
    pulling until ``until_ms`` (an upstream 429 with Retry-After)."""

    until_ms: int


# Encoders and decoders are built once and reused (msgspec perf-tips).
_encoder = msgspec.json.Encoder()
_job_decoder = msgspec.json.Decoder(Job)
_event_decoder = msgspec.json.Decoder(Event)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
_lifecycle_decoder = msgspec.json.Decoder(LifecycleEvent)
_pause_decoder = msgspec.json.Decoder(PoolPause)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_job(data: bytes) -> Job:
    """Decode a job; raises ``msgspec.ValidationError``/``DecodeError`` on bad input."""
    return _job_decoder.decode(data)


def decode_event(data: bytes) -> Event:
    event: Event = _event_decoder.decode(data)
    return event


def decode_events(data: bytes) -> tuple[Event, ...]:
    """The events of one reply message: a ``done`` with a ``final`` chunk is that chunk,
    then the ``done`` without it; any other message is one event."""
    event = decode_event(data)
    if type(event) is not Done or type(event.final) is not Chunk:
        return (event,)
    return event.final, msgspec.structs.replace(event, final=UNSET)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dead_letter_decoder.decode(data)


def decode_lifecycle(data: bytes) -> LifecycleEvent:
    return _lifecycle_decoder.decode(data)


def decode_pause(data: bytes) -> PoolPause:
    return _pause_decoder.decode(data)


def requested_features(job: Job) -> set[str]:
    """The optional features a job asks of its target (what ``Provider.features`` covers)."""
    wanted = set()
    if job.tools or any(m.tool_calls or m.role == "tool" for m in job.messages):
        wanted.add("tools")
    for m in job.messages:
        for part in m.parts or ():
            if isinstance(part, ImagePart):
                wanted.add("images")
            elif isinstance(part, AudioPart):
                wanted.add("audio")
    if job.response_format is not None and job.response_format.type != "text":
        wanted.add("response_format")
    if job.reasoning_effort is not None:
        wanted.add("reasoning_effort")
    if job.embed is not None:
        wanted.add("embeddings")
    if job.logprobs:
        wanted.add("logprobs")
    return wanted


def new_request_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000
