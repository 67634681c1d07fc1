"""What a job from an untrusted client must be before anything acts on it.

Every client is untrusted (DESIGN.md, Trust boundary). One pure function,
``validate_job(job, config, now_ms)``, checks every field of a decoded job and
returns the job to serve (its deadline clamped to the route's ``deadline_s``);
a refusal is an ``InvalidJob`` whose ``field`` names the field at fault (or
``PayloadTooLarge`` for a job too large once encoded). The worker's intake calls
it on every delivery, and ``RelayClient.submit_job`` before publishing, so a
library user hears of a bad job at once instead of from an ``error`` event.

The rest is for bytes that may not be a job at all:

- ``decode_untrusted``: ``decode_job`` whose every failure (bad JSON, wrong
  types, nesting too deep for the decoder, which raises ``RecursionError``) is
  an ``InvalidJob``;
- ``peek``: the reply subject and route of a payload that did not decode, so
  its client can still be answered;
- ``preview``: what a dead letter keeps of a bad payload: its first
  ``PREVIEW_BYTES`` bytes, undecodable bytes and control characters escaped,
  never the raw bytes (1 MB of ``0x01`` is 6 MB once JSON-escaped);
- ``is_reply_subject``: the one check of a subject a worker or the janitor is
  about to publish a job's events on;
- ``reply_fits``: whether a client's job may name that reply subject, given the
  tenant of the subject it arrived on (``llm.reply.<tenant>.<id>`` only).
"""

from __future__ import annotations

import math
import re
from typing import Any, get_args

import msgspec

from broker._config import Config, ProviderKind
from broker._errors import InvalidJob, PayloadTooLarge
from broker._protocol import ImagePart, Job, decode_job, encode
from broker._subjects import REPLY_PREFIX, arrival, is_valid_name, tenant_of

PREVIEW_BYTES = 2048
# The keys ``Job.provider_options`` may have.
PROVIDER_KINDS: tuple[str, ...] = get_args(ProviderKind)
# No model answers more in one go; a bound keeps budget charges finite.
MAX_TOKENS_LIMIT = 1_000_000
# OpenAI's own limit on the functions one request may offer.
MAX_TOOLS = 128
# Where an image part may point: the web, or the image itself.
IMAGE_URLS = ("https://", "http://", "data:image/")
MAX_ID_CHARS = 128
MAX_SUBJECT_CHARS = 256
MAX_STOP_SEQUENCES = 16
# OpenAI's metadata limits (16 pairs, keys of 64 and values of 512 characters),
# with room for the pairs llmrelay adds itself (the gateway's ``user``).
MAX_METADATA_PAIRS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_NAME_CHARS = 64
# RouteConfig's default deadline_s, for a pinned job of a pool that serves no route.
DEFAULT_DEADLINE_S = 120.0
# Room left in a job for the routing state workers add on failover (attempts).
ROUTING_RESERVE_FRACTION = 16
# OpenAI's own limit on the texts of one embeddings request; their total size is
# bounded by the job's (``max_job_bytes``).
MAX_EMBED_INPUTS = 2048
# No embedding model makes longer vectors (the largest are ~4096 numbers).
MAX_EMBED_DIMENSIONS = 65_536

_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
# W3C Trace Context, version 00 layout (lowercase hex only).
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# Control characters (but tab and newline) and bidirectional overrides: escaped in previews.
_UNPRINTABLE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_AT_RE = re.compile(r" - at `\$\.?(.*)`$")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")
_INT64_MAX = 2**63 - 1


def validate_job(job: Job, config: Config, now_ms: int) -> Job:
    """``job`` fit to serve, its deadline clamped; raise ``InvalidJob`` naming the field."""
    _check_identity(job)
    if job.embed is None:
        _check_messages(job)
    else:
        _check_embed(job)
    _check_sampling(job)
    _check_metadata(job)
    _check_provider_options(job)
    _check_traceparent(job.traceparent)
    _check_size(job, config.streams.max_job_bytes)
    latest_ms = now_ms + int(route_deadline_s(job, config) * 1000)
    created_ms = job.created_ms if 0 <= job.created_ms <= now_ms else 0
    if job.deadline_ms > latest_ms or created_ms != job.created_ms:
        return msgspec.structs.replace(
            job, deadline_ms=min(job.deadline_ms, latest_ms), created_ms=created_ms
        )
    return job


def route_deadline_s(job: Job, config: Config) -> float:
    """The longest a job may take: its route's ``deadline_s`` (a pinned job: its pool's)."""
    route = config.routes.get(job.route)
    if route is not None:
        return route.deadline_s
    if job.pool is not None and job.pool in config.pools:
        served = [config.routes[name].deadline_s for name, _, _ in config.routes_of_pool(job.pool)]
        return max(served, default=DEFAULT_DEADLINE_S)
    return DEFAULT_DEADLINE_S


def is_reply_subject(subject: object) -> bool:
    """A literal subject under ``llm.reply.``: a job must not make us publish elsewhere."""
    return (
        isinstance(subject, str)
        and len(REPLY_PREFIX) + 1 < len(subject) <= MAX_SUBJECT_CHARS
        and subject.startswith(REPLY_PREFIX + ".")
        and subject.isprintable()
        and not any(c in subject for c in "*> ")
        and ".." not in subject
        and not subject.endswith(".")
    )


def reply_fits(reply_to: object, tenant: str | None) -> bool:
    """The reply subject a client's job may name: ``llm.reply.<id>`` without a tenant,
    ``llm.reply.<tenant>.<id>`` for a job of ``tenant`` (the subject it arrived on says
    which). So no client makes a worker answer into another tenant's replies."""
    if not is_reply_subject(reply_to):
        return False
    assert isinstance(reply_to, str)
    tokens = reply_to.split(".")[2:]
    if tenant is None:
        return len(tokens) == 1
    return is_valid_name(tenant) and len(tokens) == 2 and tokens[0] == tenant


def valid_traceparent(value: str) -> bool:
    """A W3C ``traceparent``: the version 00 layout, no all-zero ids, not version ff."""
    if not _TRACEPARENT_RE.fullmatch(value):
        return False
    version, trace_id, parent_id, _ = value.split("-")
    return version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16


def decode_untrusted(data: bytes) -> Job:
    """Decode a client's job; every way it can fail is an ``InvalidJob`` naming the field."""
    try:
        return decode_job(data)
    except msgspec.ValidationError as exc:
        raise _invalid_field(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidJob(f"job: not a JSON job: {exc}", "job") from exc
    except RecursionError as exc:  # msgspec's guard against deep nesting
        raise InvalidJob("job: nested too deeply", "job") from exc


class _Peek(msgspec.Struct):
    """Not a wire struct but a view of a ``Job`` (``_protocol.py``): the two fields
    ``peek`` reads. Its decoder skips the rest unread, as ``Job``'s does, so a reply
    subject is still found next to bytes that are not UTF-8."""

    reply_to: Any = None
    route: Any = None


_peek_decoder = msgspec.json.Decoder(_Peek)


def peek(data: bytes) -> tuple[str | None, str | None]:
    """(reply subject, route) of a payload that is not a valid job, where they can be read."""
    try:
        value = _peek_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None, None
    reply, route = value.reply_to, value.route
    return (
        reply if is_reply_subject(reply) else None,
        route if isinstance(route, str) and is_valid_name(route) else None,
    )


def preview(data: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first ``limit`` bytes as text an operator can read safely, everything odd escaped."""
    return _escape(data[:limit].decode("utf-8", "backslashreplace"))


def _escape(text: str) -> str:
    return _UNPRINTABLE_RE.sub(lambda m: repr(m.group())[1:-1], text)


# --- the checks -----------------------------------------------------------------------


def _fail(field: str, reason: str) -> InvalidJob:
    return InvalidJob(f"{field}: {reason}", field)


def _check_identity(job: Job) -> None:
    if not (0 < len(job.id) <= MAX_ID_CHARS and _ID_RE.fullmatch(job.id)):
        raise _fail("id", f"1 to {MAX_ID_CHARS} letters, digits, '_' or '-'")
    if not is_reply_subject(job.reply_to):
        raise _fail("reply_to", "must be a plain subject under llm.reply.")
    if not (0 < len(job.route) <= MAX_SUBJECT_CHARS and job.route.isprintable()):
        raise _fail("route", f"1 to {MAX_SUBJECT_CHARS} printable characters")
    if job.pool is not None and not is_valid_name(job.pool):
        raise _fail("pool", "a pool name: lowercase letters, digits, '_' or '-'")


def _check_messages(job: Job) -> None:
    if not job.messages:
        raise _fail("messages", "a job needs at least one message")
    for i, message in enumerate(job.messages):
        if message.name is not None and not 0 < len(message.name) <= MAX_NAME_CHARS:
            raise _fail(f"messages[{i}].name", f"1 to {MAX_NAME_CHARS} characters")
        if message.tool_calls and message.role != "assistant":
            raise _fail(f"messages[{i}].tool_calls", "only an assistant message makes tool calls")
        if message.role == "tool" and not message.tool_call_id:
            raise _fail(f"messages[{i}].tool_call_id", "a tool message names the call it answers")
        for j, part in enumerate(message.parts or ()):
            if isinstance(part, ImagePart) and not part.image_url.url.startswith(IMAGE_URLS):
                where = f"messages[{i}].parts[{j}].image_url.url"
                raise _fail(where, "an image is an http(s) URL or a data:image/... URL")
    if job.tools is not None and len(job.tools) > MAX_TOOLS:
        raise _fail("tools", f"at most {MAX_TOOLS} tools")


def _check_embed(job: Job) -> None:
    """An embeddings job: texts to embed, no conversation."""
    assert job.embed is not None
    if job.messages:
        raise _fail("messages", "an embeddings job has no messages (its texts are embed.input)")
    texts = job.embed.input
    if not 0 < len(texts) <= MAX_EMBED_INPUTS:
        raise _fail("embed.input", f"1 to {MAX_EMBED_INPUTS} texts")
    for i, text in enumerate(texts):
        if not text:
            raise _fail(f"embed.input[{i}]", "an empty text has no embedding")
    dims = job.embed.dimensions
    if dims is not None and not 0 < dims <= MAX_EMBED_DIMENSIONS:
        raise _fail("embed.dimensions", f"must be between 1 and {MAX_EMBED_DIMENSIONS}")


def _check_sampling(job: Job) -> None:
    if job.max_tokens is not None and not 1 <= job.max_tokens <= MAX_TOKENS_LIMIT:
        raise _fail("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}")
    _check_range("temperature", job.temperature, 0.0, 2.0)
    _check_range("top_p", job.top_p, 0.0, 1.0)
    _check_range("top_logprobs", job.top_logprobs, 0, 20)  # OpenAI's bounds
    if job.top_logprobs and not job.logprobs:
        raise _fail("top_logprobs", "needs logprobs: true")
    if job.seed is not None and not -_INT64_MAX - 1 <= job.seed <= _INT64_MAX:
        raise _fail("seed", "must fit in 64 bits")
    if job.stop is not None:
        if len(job.stop) > MAX_STOP_SEQUENCES:
            raise _fail("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in job.stop):
            raise _fail("stop", "stop sequences must not be empty")


def _check_range(field: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise _fail(field, f"must be between {low:g} and {high:g}")


def _check_metadata(job: Job) -> None:
    if len(job.metadata) > MAX_METADATA_PAIRS:
        raise _fail("metadata", f"at most {MAX_METADATA_PAIRS} pairs")
    for key, value in job.metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
            raise _fail("metadata", f"keys are 1 to {MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise _fail(f"metadata.{key}", f"at most {MAX_METADATA_VALUE_CHARS} characters")


def _check_provider_options(job: Job) -> None:
    """Keys are provider kinds (``pools.<name>.kind``); what each holds is that provider's."""
    for kind in job.provider_options:
        if kind not in PROVIDER_KINDS:
            known = ", ".join(PROVIDER_KINDS)
            raise _fail("provider_options", f"{kind!r} is not a provider kind ({known})")


def _check_traceparent(value: str | None) -> None:
    # It becomes an HTTP header of the provider call: a newline there would be
    # refused by h11 (or, worse, split the request).
    if value is not None and not valid_traceparent(value):
        raise _fail("traceparent", "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")


def _check_size(job: Job, max_job_bytes: int) -> None:
    """The client's part of the job, as it is encoded again on failover, must leave room
    (for the attempts; a re-queue whose answer so far does not fit starts over)."""
    limit = max_job_bytes - max_job_bytes // ROUTING_RESERVE_FRACTION
    size = len(encode(msgspec.structs.replace(job, attempts=[], resume=None)))
    if size > limit:
        raise PayloadTooLarge(f"job: {size} bytes once encoded; at most {limit}")


def _invalid_field(text: str) -> InvalidJob:
    """msgspec's "Expected `int`, got `str` - at `$.messages[0].role`" as field + reason."""
    m = _AT_RE.search(text)
    where = m.group(1) if m else ""
    reason = text[: m.start()] if m else text
    missing = _MISSING_RE.search(reason)
    if missing:
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return _fail(where or "job", _clip(reason))


def _clip(reason: str, limit: int = 200) -> str:
    """msgspec may quote the offending value ("Invalid enum value ..."): keep it short, safe."""
    return _escape(reason if len(reason) <= limit else reason[:limit] + "...")


def reply_allowed(subject: str, reply_to: object) -> bool:
    """Whether a job stored on ``subject`` may be answered on ``reply_to``."""
    if arrival(subject)[0] == "requeue":
        return is_reply_subject(reply_to)
    return reply_fits(reply_to, tenant_of(subject))
