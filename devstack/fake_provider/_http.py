"""Just enough HTTP/1.1 for the fake provider: read a request, write framed responses.

Raw asyncio streams instead of a framework keep one core serving thousands of
streamed requests a second, and let the server count TCP connections apart
from requests (keep-alive is part of what the tests check). A request this
reader cannot make sense of comes back as a ``BadRequest`` value, and the
server drops that connection, as a real server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import socket
import struct
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "JSON",
    "LAST_CHUNK",
    "NDJSON",
    "SSE",
    "BadRequest",
    "HttpRequest",
    "abort",
    "chunk",
    "chunks",
    "head",
    "json_response",
    "read_request",
    "until_eof",
]

LAST_CHUNK = b"0\r\n\r\n"
JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
NDJSON = b"application/x-ndjson"


class HttpRequest(NamedTuple):
    """One request off the wire: what the routes and the chat handler look at."""

    method: bytes
    path: bytes
    body: bytes
    keep_alive: bool
    query: bytes = b""
    api_key: bool = False  # an ``api-key`` header came (Azure's)
    goog_api_key: bool = False  # an ``x-goog-api-key`` header came (Gemini's)
    authorization: bytes = b""  # the ``authorization`` header (Bedrock's SigV4)


class BadRequest(NamedTuple):
    """The client sent something that is not HTTP/1.1 the fake provider understands."""

    reason: str


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | BadRequest | None:
    """The next request on the connection, or None when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return BadRequest("bad request line")
    try:
        length, chunked, keep_alive, api_key, goog, auth = _parse_headers(
            lines[1:], parts[2] == b"HTTP/1.1"
        )
        body = await _read_chunked(reader) if chunked else await reader.readexactly(length)
    except ValueError as exc:  # a length that is not a number
        return BadRequest(f"bad framing: {exc}")
    path, _, query = parts[1].partition(b"?")
    return HttpRequest(parts[0], path, body, keep_alive, query, api_key, goog, auth)


def _parse_headers(
    lines: list[bytes], keep_alive: bool
) -> tuple[int, bool, bool, bool, bool, bytes]:
    length, chunked, api_key, goog, auth = 0, False, False, False, b""
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
        elif name == b"api-key":
            api_key = bool(value.strip())
        elif name == b"x-goog-api-key":
            goog = bool(value.strip())
        elif name == b"authorization":
            auth = value.strip()
    return length, chunked, keep_alive, api_key, goog, auth


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailers
    return b"".join(parts)


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Overloaded" if status == 529 else b"Unknown"


def head(status: int, content_type: bytes, length: int | None, extra: bytes = b"") -> bytes:
    """Status line and headers; no ``length`` means a chunked body follows."""
    framing = (
        b"content-length: %d" % length if length is not None else b"transfer-encoding: chunked"
    )
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n%s\r\n" % (
        status,
        _phrase(status),
        content_type,
        framing,
        extra,
    )


def json_response(status: int, payload: Any, extra: bytes = b"") -> bytes:
    """A whole response with a JSON body (``extra``: more header lines, each ending CRLF)."""
    body = msgspec.json.encode(payload)
    return head(status, JSON, len(body), extra) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunks(events: list[bytes]) -> bytes:
    """The events as chunks in one buffer (one write, one syscall); empty events are skipped."""
    return b"".join([chunk(e) for e in events if e])


def abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, so the client sees the connection die before any header."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Read and drop whatever the client sends until it closes the connection."""
    while await reader.read(65_536):
        pass
