"""Embeddings: one non-streamed POST to a provider's embeddings endpoint, as one ``Finish``.

An embeddings job (``Job.embed``) runs through the same ``JobRun`` as a chat
job: its adapter's ``stream`` makes this call and yields a single
``Finish(reason="stop", usage, embeddings)``, so retries, failover, circuits,
rate limits and deadlines apply unchanged. There is no first token: the whole
answer must come within the pool's ``timeouts.ttft_s``. The vectors are packed
for ``Done.embeddings`` (``broker/_vectors.py``).

Two wire shapes, chosen by the adapter:

- OpenAI-compatible (``openai``, ``azure``): ``POST .../embeddings`` with
  ``{model, input, dimensions?, encoding_format: "float"}``, answered with
  ``data[i].embedding`` (numbers; base64 is taken too, from servers that send it
  anyway) and ``usage.prompt_tokens``;
- Ollama: ``POST /api/embed`` with ``{model, input, dimensions?}``, answered with
  ``embeddings[i]`` and ``prompt_eval_count``.

Errors are the chat calls' (``_http.open_stream``). A body that is no such
answer, or holds a vector too few or too many, is a ``BadUpstreamEvent`` (fail
over); an answer larger than a reply can carry (``MAX_EMBEDDINGS_BYTES``) is
refused as the caller's (``UpstreamRejected``: send fewer inputs per request).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import httpx
import msgspec

from broker._errors import BadUpstreamEvent, UpstreamRejected
from broker._protocol import Job, Usage
from broker._vectors import pack_vector, unpack_vector
from workers.providers._base import Finish
from workers.providers._errors_map import error_for_payload
from workers.providers._http import job_headers, open_stream, with_provider_options

# The packed vectors of one answer travel in one ``Done`` event: this leaves room
# in NATS's default max_payload (1 MiB) for the rest of it.
MAX_EMBEDDINGS_BYTES = 768 * 1024
# An answer's JSON (numbers as text) is read whole, up to this.
_MAX_BODY_BYTES = 32 * 1024 * 1024


class _Answer(Protocol):
    error: Any


A = TypeVar("A", bound=_Answer)


class _Item(msgspec.Struct):
    embedding: list[float] | str
    index: int = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0


class _OpenAIAnswer(msgspec.Struct):
    data: list[_Item] = []
    usage: _Usage | None = None
    error: Any = None


class _OllamaAnswer(msgspec.Struct):
    embeddings: list[list[float]] = []
    prompt_eval_count: int = 0
    error: Any = None


_openai_decoder = msgspec.json.Decoder(_OpenAIAnswer)
_ollama_decoder = msgspec.json.Decoder(_OllamaAnswer)
_encoder = msgspec.json.Encoder()


async def openai_embeddings(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    job: Job,
    model: str,
    kind: str = "openai",
) -> Finish:
    """The embeddings of ``job`` from an OpenAI-compatible ``url``."""
    assert job.embed is not None
    body: dict[str, Any] = {"model": model, "input": job.embed.input, "encoding_format": "float"}
    if job.embed.dimensions is not None:
        body["dimensions"] = job.embed.dimensions
    data = await _post(client, url, headers, job, with_provider_options(body, job, kind))
    answer = _decoded(_openai_decoder, data)
    vectors = [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]
    return _finish(job, vectors, answer.usage.prompt_tokens if answer.usage else 0)


async def ollama_embeddings(
    client: httpx.AsyncClient, url: str, headers: Mapping[str, str], job: Job, model: str
) -> Finish:
    """The embeddings of ``job`` from Ollama's ``/api/embed`` at ``url``."""
    assert job.embed is not None
    body: dict[str, Any] = {"model": model, "input": job.embed.input}
    if job.embed.dimensions is not None:
        body["dimensions"] = job.embed.dimensions
    data = await _post(client, url, headers, job, with_provider_options(body, job, "ollama"))
    answer = _decoded(_ollama_decoder, data)
    return _finish(job, answer.embeddings, answer.prompt_eval_count)


async def _post(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    job: Job,
    body: dict[str, Any],
) -> bytes:
    """POST ``body``; the whole answer's bytes (an error status raises, as for chat)."""
    sent = {**job_headers(headers, job), "accept": "application/json"}
    parts: list[bytes] = []
    size = 0
    async with open_stream(client, url, headers=sent, body=_encoder.encode(body)) as upstream:
        while (part := await upstream.next_chunk()) is not None:
            size += len(part)
            if size > _MAX_BODY_BYTES:
                raise UpstreamRejected(_too_large(job, f"over {_MAX_BODY_BYTES} bytes of JSON"))
            parts.append(part)
        upstream.complete = True  # read to the end: the connection goes back for reuse
    return b"".join(parts)


def _decoded(decoder: msgspec.json.Decoder[A], data: bytes) -> A:
    try:
        answer = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadUpstreamEvent(f"not an embeddings answer: {data[:120]!r}") from exc
    if answer.error is not None:
        raise error_for_payload({"error": answer.error})
    return answer


def _finish(job: Job, vectors: Sequence[list[float] | str], prompt_tokens: int) -> Finish:
    assert job.embed is not None
    wanted = len(job.embed.input)
    if len(vectors) != wanted:
        raise BadUpstreamEvent(f"{len(vectors)} embeddings for {wanted} inputs")
    try:
        packed = [_packed(vector) for vector in vectors]
    except (ValueError, OverflowError) as exc:  # not float32 numbers
        raise BadUpstreamEvent(f"an embedding that is not float32 numbers: {exc}") from exc
    size = sum(len(p) for p in packed)
    if size > MAX_EMBEDDINGS_BYTES:
        raise UpstreamRejected(_too_large(job, f"{size} bytes packed"))
    usage = Usage(prompt_tokens=prompt_tokens) if prompt_tokens else None
    return Finish("stop", usage, embeddings=packed)


def _packed(vector: list[float] | str) -> str:
    if isinstance(vector, str):  # base64 float32 already (OpenAI's encoding_format=base64)
        unpack_vector(vector)
        return vector
    return pack_vector(vector)


def _too_large(job: Job, size: str) -> str:
    assert job.embed is not None
    return (
        f"the embeddings of {len(job.embed.input)} inputs are {size}, more than one answer "
        f"carries ({MAX_EMBEDDINGS_BYTES} bytes packed); send fewer inputs per request"
    )
