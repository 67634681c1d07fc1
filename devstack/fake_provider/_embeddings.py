"""The fake provider's embeddings endpoints, with vectors a test knows exactly.

    POST /v1/embeddings, /embeddings              OpenAI's shape; ``encoding_format``
                                                  ``float`` (the default) or ``base64``
    POST /openai/deployments/<d>/embeddings       the same, as Azure serves it
    POST /api/embed                               Ollama's shape (``embeddings[i]``)

The vector of a text is ``expected_embedding(model, text, dims)``: numbers from
a hash of the model and the text, ``dimensions`` of them (default
``DEFAULT_DIMENSIONS``), each a multiple of 1/128 in [-1, 1), so that it is the
same exactly as JSON numbers and as float32. ``model`` is the request's, without
its fault suffix. Usage: ``prompt_tokens`` (Ollama's ``prompt_eval_count``) is
the inputs' characters / 4, at least 1.

An embeddings request is planned and answered like a non-streamed chat request
(``_server.MockProvider``: a ``WireFormat`` whose whole answer is the vectors),
so the faults that make sense for one answer apply: ``status``/``error`` (the
provider's error JSON), ``reset``, ``noresponse``, ``ttft_ms`` (the delay before
the answer), ``cut`` and ``stall`` (half the JSON), ``error_after`` (a 500), and
``fail_first``. The stats log shows its ``inputs`` (how many), ``dimensions``
and ``encoding_format``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

from devstack.fake_provider._faults import ErrorKind
from devstack.fake_provider._http import JSON
from devstack.fake_provider._openai import OpenAIFormat
from devstack.fake_provider._plan import ChatRequest, Plan, Prefill, WireFormat

__all__ = [
    "DEFAULT_DIMENSIONS",
    "EMBED_PATHS",
    "OLLAMA_EMBED",
    "OPENAI_EMBED",
    "embed_texts",
    "expected_embedding",
]

DEFAULT_DIMENSIONS = 8


def expected_embedding(model: str, text: str, dims: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The vector the fake provider answers for ``text`` from ``model``, ``dims`` long."""
    numbers: list[float] = []
    block = 0
    while len(numbers) < dims:
        digest = hashlib.sha256(f"{model}\x00{text}\x00{block}".encode()).digest()
        numbers.extend((byte - 128) / 128 for byte in digest)
        block += 1
    return numbers[:dims]


def embed_texts(request: ChatRequest) -> list[str]:
    """The texts an embeddings request asks vectors for (one string is one text)."""
    if not request.input:
        raise ValueError("'input' is a required property, and not empty")
    if request.dimensions is not None and request.dimensions < 1:
        raise ValueError("'dimensions' must be at least 1")
    return [request.input] if isinstance(request.input, str) else list(request.input)


class _EmbeddingsFormat:
    """What both shapes share: never streamed, one "token" (no per-token delay), no
    prefill; the parts of a stream are empty."""

    content_type = JSON

    def wants_stream(self, request: ChatRequest) -> bool:
        embed_texts(request)  # a request without input is refused (a 400) here
        return False

    def limit(self, request: ChatRequest) -> int | None:
        return 1

    def prefill(self, request: ChatRequest) -> Prefill | None:
        return None

    def noprefill_body(self) -> Any:
        return None

    def opening(self, plan: Plan) -> list[bytes]:
        return []

    def token_events(self, plan: Plan) -> list[bytes]:
        return []

    def closing(self, plan: Plan) -> list[bytes]:
        return []

    def terminator(self, plan: Plan) -> list[bytes]:
        return []

    def garbage(self) -> bytes:
        return b""

    def stream_error(self, kind: ErrorKind) -> bytes:
        return b""


class OpenAIEmbeddings(_EmbeddingsFormat):
    """OpenAI's (and Azure's) ``/embeddings``."""

    def error_body(self, kind: ErrorKind) -> Any:
        return OpenAIFormat().error_body(kind)

    def full(self, plan: Plan) -> Any:
        texts, vectors = _vectors(plan)
        as_base64 = plan.embed is not None and plan.embed.encoding_format == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _packed(v) if as_base64 else v}
            for i, v in enumerate(vectors)
        ]
        tokens = _prompt_tokens(texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": plan.model, "usage": usage}


class OllamaEmbeddings(_EmbeddingsFormat):
    """Ollama's ``/api/embed``."""

    def error_body(self, kind: ErrorKind) -> Any:
        return {"error": kind.message}

    def full(self, plan: Plan) -> Any:
        texts, vectors = _vectors(plan)
        return {
            "model": plan.model,
            "embeddings": vectors,
            "total_duration": 1_000_000,
            "load_duration": 0,
            "prompt_eval_count": _prompt_tokens(texts),
        }


OPENAI_EMBED, OLLAMA_EMBED = OpenAIEmbeddings(), OllamaEmbeddings()
# The fixed paths; Azure's has the deployment in it (``_server.PATTERN_PATHS``).
EMBED_PATHS: dict[bytes, WireFormat] = {
    b"/v1/embeddings": OPENAI_EMBED,
    b"/embeddings": OPENAI_EMBED,
    b"/api/embed": OLLAMA_EMBED,
}


def _vectors(plan: Plan) -> tuple[list[str], list[list[float]]]:
    assert plan.embed is not None
    texts = embed_texts(plan.embed)
    dims = plan.embed.dimensions or DEFAULT_DIMENSIONS
    return texts, [expected_embedding(plan.model, text, dims) for text in texts]


def _prompt_tokens(texts: list[str]) -> int:
    return max(sum(len(text) for text in texts) // 4, 1)


def _packed(vector: list[float]) -> str:
    """OpenAI's ``base64``: the little-endian float32 numbers."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
