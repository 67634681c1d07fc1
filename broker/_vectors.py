"""Embedding vectors as they cross NATS: base64 of little-endian float32 numbers.

A worker packs each vector of an embeddings answer (``pack_vector``) into
``Done.embeddings``; the client library and the gateway unpack them
(``unpack_vector``), or the gateway hands them on as they are to a caller that
asked for ``encoding_format: base64`` (the OpenAI SDKs' default: the same
encoding). Four bytes a number, a third more in base64: about a quarter of
the size of the numbers as JSON text, and exact (float32 is what embedding
models produce; a float64 from a provider's JSON is rounded to it).

``Embeddings`` is what ``RelayClient.embed`` returns.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

import msgspec

from broker._protocol import Done, Usage


class Embeddings(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an embeddings job: one vector per input, in order, and who made them."""

    vectors: list[list[float]]
    usage: Usage
    pool: str
    model: str

    @classmethod
    def of(cls, done: Done) -> Embeddings:
        return cls(
            vectors=[unpack_vector(v) for v in done.embeddings or ()],
            usage=done.usage,
            pool=done.pool,
            model=done.model,
        )


def pack_vector(vector: Sequence[float]) -> str:
    """``vector`` as base64 of little-endian float32 (``Done.embeddings``' encoding)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def unpack_vector(packed: str) -> list[float]:
    """The numbers of a packed vector; raises ``ValueError`` if it is not one."""
    data = base64.b64decode(packed, validate=True)
    if len(data) % 4:
        raise ValueError(f"a packed vector of {len(data)} bytes: not float32 numbers")
    return list(struct.unpack(f"<{len(data) // 4}f", data))
