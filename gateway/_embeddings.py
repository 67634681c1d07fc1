"""OpenAI's embeddings API (``POST /v1/embeddings``) over the relay's jobs.

``model`` names a route, as on ``/v1/chat/completions``; ``input`` is one text
or a list of them (OpenAI's token-array inputs are refused: the gateway has no
tokenizer, and the providers behind a route need not share one). The request
becomes one embeddings job (``Job.embed``), accepted, submitted and answered
whole like a non-streamed chat completion (``EMBEDDINGS`` is its ``Dialect``):
queued on the route, failed over to a target that can embed, cancelled when the
client goes away. The answer is OpenAI's ``{"object": "list", "data": [{"object":
"embedding", "index", "embedding"}], "model", "usage"}``: with ``encoding_format:
base64`` (what the OpenAI SDKs ask for unless told otherwise) each embedding is
the vector's base64 float32 exactly as the worker sent it (``Done.embeddings``),
else a list of numbers. ``model`` is the upstream model that answered.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UnsetType
from starlette.datastructures import Headers
from starlette.responses import Response

from broker._client import JobOptions
from broker._errors import InternalError, InvalidRequest
from broker._protocol import Done, EmbedRequest
from broker._validate import valid_traceparent
from broker._vectors import unpack_vector
from gateway._apierror import ApiError
from gateway._dialect import Call, JobParts, Reply, StreamEncoder
from gateway._request import decode_body
from gateway._responses import sse_data


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """The fields of an OpenAI embeddings request that llmrelay honours."""

    model: str
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


class Embedding(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsList(msgspec.Struct, kw_only=True):
    """OpenAI's ``CreateEmbeddingResponse``."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


_request_decoder = msgspec.json.Decoder(EmbeddingsRequest)


def parse_embeddings(body: bytes) -> EmbeddingsRequest:
    """Decode and check a request body; raise ``InvalidRequest`` naming the field."""
    req = decode_body(_request_decoder, body)
    texts(req)
    return req


def texts(req: EmbeddingsRequest) -> list[str]:
    """The texts to embed: one string, or a list of non-empty strings."""
    items = [req.input] if isinstance(req.input, str) else req.input
    if not items:
        raise InvalidRequest("input: at least one text to embed", "input")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidRequest(
                f"input[{i}]: token arrays are not relayed (the gateway has no tokenizer); "
                "send the texts",
                "input",
            )
        if not item:
            raise InvalidRequest(f"input[{i}]: an empty text has no embedding", "input")
    return items


def job_parts(req: EmbeddingsRequest, traceparent: str | None) -> JobParts:
    """The job's parts: no messages, the texts as ``embed``, ``user`` as metadata."""
    if traceparent is not None and not valid_traceparent(traceparent):
        traceparent = None  # dropped, as for a chat completion (``job_options``)
    embed = EmbedRequest(input=texts(req), dimensions=req.dimensions)
    metadata = {"user": req.user} if req.user else {}
    return JobParts([], JobOptions(metadata=metadata, traceparent=traceparent, embed=embed))


class EmbeddingsWriter:
    """OpenAI's embeddings list, numbers or base64 as the request asked."""

    def __init__(self, req: EmbeddingsRequest) -> None:
        self.encoding = req.encoding_format

    def whole(self, request_id: str, reply: Reply, done: Done) -> msgspec.Struct:
        if isinstance(done.embeddings, UnsetType):  # a worker that does not know embeddings
            raise InternalError("the answer carries no embeddings")
        try:
            data = [Embedding(index=i, embedding=self._encoded(packed))
                    for i, packed in enumerate(done.embeddings)]  # fmt: skip
        except ValueError as exc:
            raise InternalError(f"an embedding in the answer is not float32: {exc}") from exc
        tokens = done.usage.prompt_tokens
        usage = EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens)
        return EmbeddingsList(data=data, model=done.model, usage=usage)

    def _encoded(self, packed: str) -> list[float] | str:
        return packed if self.encoding == "base64" else unpack_vector(packed)

    def stream(self, request_id: str) -> StreamEncoder:
        raise InvalidRequest("stream: embeddings are answered whole", "stream")

    def error_response(self, err: ApiError) -> Response:
        return err.response()

    def error_event(self, err: ApiError) -> bytes:
        return sse_data(err.body())


class EmbeddingsDialect:
    """``POST /v1/embeddings``: a bearer key, OpenAI's request and error shapes."""

    def credential(self, headers: Headers) -> str:
        return headers.get("authorization", "")

    def parse(self, body: bytes) -> Call:
        req = parse_embeddings(body)
        parts = functools.partial(job_parts, req)
        return Call(route=req.model, stream=False, writer=EmbeddingsWriter(req), parts=parts)

    def error_response(self, err: ApiError) -> Response:
        return err.response()


EMBEDDINGS = EmbeddingsDialect()
