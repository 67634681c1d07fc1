"""A lean HTTP/1.1 transport for httpx: the worker's keep-alive connections to its provider.

httpx's default transport (httpcore over anyio streams and h11) is most of a
worker's CPU per streamed request on this machine (bench/RESULTS.md, issue 16):
it writes a request's head and body in two syscalls, scans every pooled
connection with a ``poll`` and a ``getpeername`` for each request, and runs
h11's state machine per event. ``LeanTransport`` does what a worker needs and no
more:

- one ``write`` per request (head and body together) on an asyncio stream;
- a LIFO list of idle connections, so a busy pool reuses its warmest one, with
  no per-request scan (a connection the server closed is seen as at EOF and
  dropped; idle longer than ``keepalive_expiry_s``, it is closed);
- at most ``max_connections`` open at once (a semaphore: the pool's fixed size);
- response bodies framed by ``Content-Length``, chunked encoding, or the end of
  the connection, read as the bytes arrive.

It speaks HTTP/1.1 only, over TCP or TLS, with no proxy and no HTTP/2 (providers
stream answers over HTTP/1.1; the worker never needed more). Failures are
httpx's own exception classes, so ``error_for_transport`` reads them as it reads
httpcore's, and an ``AsyncClient`` on top keeps event hooks and the response
API; ``LeanClient.post_stream`` skips httpx's client layer for the worker's one
kind of request. ``on_connect`` is told of each new connection (the worker
counts them for connection reuse).
Tests inject any other ``httpx.AsyncBaseTransport`` instead (``Worker(transport=)``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple

import httpx

__all__ = ["LeanClient", "LeanResponse", "LeanTransport", "Target"]

_MAX_HEAD_BYTES = 65_536
_READ_SIZE = 65_536
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
Origin = tuple[bytes, bytes, int]  # scheme, host, port
USER_AGENT = b"llmrelay"
_MAX_TARGETS = 1024  # parsed URLs a client keeps (one per pool and model, usually)


class Target(NamedTuple):
    """A URL parsed once: where to connect, and the start of a POST's head."""

    origin: Origin
    request_line: bytes  # "POST <path> HTTP/1.1\r\nhost: ...\r\nuser-agent: ...\r\n"

    @classmethod
    def of(cls, url: str) -> Target:
        parsed = httpx.URL(url)
        scheme, host = parsed.raw_scheme, parsed.raw_host
        port = parsed.port or _DEFAULT_PORTS.get(scheme, 80)
        netloc = host if parsed.port is None else b"%s:%d" % (host, port)
        line = b"POST %s HTTP/1.1\r\nhost: %s\r\nuser-agent: %s\r\n" % (
            parsed.raw_path,
            netloc,
            USER_AGENT,
        )
        return cls((scheme, host, port), line)


class LeanResponse:
    """What ``open_stream`` reads of an answer: status, headers (lower-case names), body."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: _Body) -> None:
        self.status_code = status
        self.headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in headers}
        self._body = body
        # The body's next bytes (None at its end), for ``UpstreamBody`` to call directly.
        self.next_bytes = body.next

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._body.__aiter__()

    async def aclose(self) -> None:
        await self._body.aclose()


class LeanClient(httpx.AsyncClient):
    """An httpx client on a ``LeanTransport`` that also posts past httpx's client layer
    (``post_stream``): request building, URL parsing, cookies and hooks are most of what
    is left of a streamed call's CPU once the transport is lean (bench/RESULTS.md)."""

    def __init__(self, transport: LeanTransport, connect_s: float | None, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self.lean = transport
        self._connect_s = connect_s
        self._targets: dict[str, Target] = {}

    async def post_stream(self, url: str, headers: Mapping[str, str], body: bytes) -> LeanResponse:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            target = self._targets[url] = Target.of(url)
        return await self.lean.post(target, headers, body, self._connect_s)


class _Connection:
    """One keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self, expiry_s: float) -> bool:
        """Still open (the server did not close it) and not idle past its expiry."""
        if self.reader.at_eof() or self.writer.is_closing():
            return False
        return time.monotonic() - self.idle_since < expiry_s

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections to any origin, at most ``max_connections`` open."""

    def __init__(
        self,
        *,
        max_connections: int,
        ssl_context: ssl.SSLContext,
        keepalive_expiry_s: float = 60.0,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._on_connect = on_connect  # told of each new connection (the reuse metric)
        self._expiry_s = keepalive_expiry_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 80))
        body = request.content if hasattr(request, "_content") else await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path)]
        head += [b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw]
        timeout = request.extensions.get("timeout", {}).get("connect")
        status, reason, headers, stream = await self._send(
            origin, b"".join(head) + b"\r\n" + body, timeout, request.method == "HEAD"
        )
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def post(
        self, target: Target, headers: Mapping[str, str], body: bytes, connect_s: float | None
    ) -> LeanResponse:
        """POST ``body`` to ``target`` without httpx's client layer (the worker's one kind
        of request); raises httpx's exceptions, as ``handle_async_request`` does."""
        head = [target.request_line, b"content-length: %d\r\n" % len(body)]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise httpx.LocalProtocolError(f"illegal header value for {name!r}")
            head.append(f"{name}: {value}\r\n".encode())
        data = b"".join(head) + b"\r\n" + body
        status, _, raw, stream = await self._send(target.origin, data, connect_s, False)
        return LeanResponse(status, raw, stream)

    async def _send(
        self, origin: Origin, data: bytes, connect_s: float | None, head_only: bool
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], _Body]:
        """One request on a pooled connection: its status, reason, headers and body."""
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn = await self._connection(origin, connect_s)
            status, reason, headers = await _exchange(conn, data)
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise
        return (
            status,
            reason,
            headers,
            _Body(self, origin, conn, _framing(head_only, status, headers)),
        )

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _connection(self, origin: Origin, connect_s: float | None) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable(self._expiry_s):
                return conn
            conn.close()
        return await self._connect(origin, connect_s)

    async def _connect(self, origin: Origin, connect_s: float | None) -> _Connection:
        scheme, host, port = origin
        tls = self._ssl if scheme == b"https" else None
        try:
            async with asyncio.timeout(connect_s):
                reader, writer = await asyncio.open_connection(
                    host.decode("ascii"), port, ssl=tls, limit=_MAX_HEAD_BYTES
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout("connect timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        if self._on_connect is not None:
            self._on_connect()
        return _Connection(reader, writer)

    def _release(self, origin: Origin, conn: _Connection, reuse: bool) -> None:
        if reuse and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.close()
        self._slots.release()


async def _exchange(conn: _Connection, data: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Send a request in one write; read the response's status line and headers."""
    try:
        conn.writer.write(data)
        await conn.writer.drain()
    except OSError as exc:
        raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
    try:
        raw = await conn.reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from exc
    except asyncio.LimitOverrunError as exc:
        raise httpx.RemoteProtocolError("the response head is too large") from exc
    except OSError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    return _parse_head(raw)


def _parse_head(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError("a malformed response header")
        headers.append((name.strip(), value.strip()))
    return int(code), reason, headers


class _Framing:
    """How the body ends: ``length`` bytes, chunked, or at the end of the connection."""

    def __init__(self, length: int | None, chunked: bool, keep_alive: bool) -> None:
        self.length = length
        self.chunked = chunked
        self.keep_alive = keep_alive


def _framing(head_only: bool, status: int, headers: list[tuple[bytes, bytes]]) -> _Framing:
    values = {name.lower(): value.lower() for name, value in headers}
    keep_alive = values.get(b"connection") != b"close"
    if head_only or status in (204, 304) or 100 <= status < 200:
        return _Framing(0, False, keep_alive)
    if b"chunked" in values.get(b"transfer-encoding", b""):
        return _Framing(None, True, keep_alive)
    length = values.get(b"content-length")
    if length is not None and length.isdigit():
        return _Framing(int(length), False, keep_alive)
    return _Framing(None, False, False)  # ends with the connection


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; the connection goes back to the pool
    when the body was read to its end, else it is closed."""

    def __init__(
        self,
        pool: LeanTransport,
        origin: Origin,
        conn: _Connection,
        framing: _Framing,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Connection | None = conn
        self._framing = framing
        self._complete = framing.length == 0 and not framing.chunked
        self._dechunker = _Dechunker() if framing.chunked else None
        self._left = framing.length  # of a sized body, the bytes still to come
        self._failed = False  # a read failed: the body ends there (the generator's way)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (data := await self.next()) is not None:
            yield data

    async def next(self) -> bytes | None:
        """The next bytes of the body, or None at its end (or after it failed). A
        method, not only ``__aiter__``: each async-generator layer is CPU per chunk."""
        if self._complete or self._conn is None or self._failed:
            return None
        try:
            data = await self._read(self._conn.reader)
        except BaseException as exc:
            self._failed = True  # cancelled too: the body ends here
            if isinstance(exc, asyncio.IncompleteReadError):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                ) from exc
            if isinstance(exc, OSError):
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            raise
        if data is None:
            self._complete = True
        return data

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        """As much of the body as the next read brings (None: the end of the body)."""
        body = self._dechunker
        if body is not None:  # chunked: a read may hold any number of chunks, or part of one
            while not body.done:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)
                if out := body.feed(data):
                    return out
            self._framing.keep_alive = self._framing.keep_alive and not body.extra
            return None
        left = self._left
        if left is None:  # ends with the connection
            return await reader.read(_READ_SIZE) or None
        if not left:
            return None
        data = await reader.read(min(left, _READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        self._left = left - len(data)
        return data

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(self._origin, conn, self._complete and self._framing.keep_alive)


class _Dechunker:
    """The chunked transfer coding, undone as bytes arrive: ``feed`` takes any piece of
    the body and returns the data in it. One read holding many chunks (a provider's
    tokens sent together) is one piece of data, so one reply message, not one per
    chunk. ``extra``: bytes came after the body's end (the connection is not reused).
    A read of whole chunks (one token's, mostly) is taken without the line-by-line
    state machine, which the rest of any other read goes through."""

    __slots__ = ("_after_data", "_at_boundary", "_left", "_line", "_trailers", "done", "extra")

    def __init__(self) -> None:
        self._line = b""  # an unfinished size, CRLF or trailer line
        self._left = 0  # bytes of the current chunk's data still to come
        self._after_data = False  # the CRLF that ends a chunk's data is next
        self._trailers = False  # the last chunk came: trailer lines to the empty one
        self.done = False
        self._at_boundary = True  # the next byte starts a chunk (whole ones may skip ahead)
        self.extra = False

    def feed(self, data: bytes) -> bytes:
        if self._at_boundary:  # whole chunks first; the general path below takes the rest
            one = _one_chunk(data)
            if one is not None:
                return one
            i, out = _whole_chunks(data)
            if i == len(data):
                return b"".join(out)
        else:
            i, out = 0, []
        try:
            return self._general(data, i, out)
        finally:
            self._at_boundary = not (
                self._line or self._left or self._after_data or self._trailers or self.done
            )

    def _general(self, data: bytes, i: int, out: list[bytes]) -> bytes:
        """The data of ``data[i:]``, any state, byte by byte if need be, after ``out``."""
        n = len(data)
        while i < n:
            if self.done:
                self.extra = True
                break
            if self._left:
                take = min(self._left, n - i)
                out.append(data[i : i + take])
                i += take
                self._left -= take
                self._after_data = not self._left
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self._line += data[i:]
                if len(self._line) > _MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("a chunk size line is too long")
                break
            line, self._line = self._line + data[i : end + 1], b""
            i = end + 1
            self._take_line(line)
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_line(self, line: bytes) -> None:
        if self._after_data:
            self._after_data = False
            if line.strip():
                raise httpx.RemoteProtocolError("a chunk's data is longer than its size")
        elif self._trailers:
            self.done = not line.strip()
        else:
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(
                    f"a malformed chunk size: {size_text[:20]!r}"
                ) from None
            if size < 0:
                raise httpx.RemoteProtocolError(f"a negative chunk size: {size_text[:20]!r}")
            self._trailers = size == 0
            self._left = size


def _one_chunk(data: bytes) -> bytes | None:
    """The data of ``data`` when it is exactly one chunk (plain hex size, data, CRLF) and
    not the last one, else None: one token per read, the common case, at least cost."""
    end = data.find(b"\r\n", 0, 18)
    if end > 0 and data[:end].isalnum():
        try:
            stop = end + 2 + int(data[:end], 16)
        except ValueError:
            return None
        if len(data) == stop + 2 and stop > end + 2 and data.endswith(b"\r\n"):
            return data[end + 2 : stop]
    return None


def _whole_chunks(data: bytes) -> tuple[int, list[bytes]]:
    """The complete chunks at the start of ``data`` (a plain hex size, its data, CRLF):
    the offset after them and their data. One token per read is one such chunk; the
    general path in ``_Dechunker.feed`` takes what is left from that offset, so any
    other shape (a size with an extension, the last chunk, a cut) reads as before."""
    out: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        end = data.find(b"\r\n", i, i + 18)
        if end < 0:
            break
        size_text = data[i:end]
        if not size_text.isalnum():
            break
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        start = end + 2
        stop = start + size
        if not size or data[stop : stop + 2] != b"\r\n":
            break
        out.append(data[start:stop])
        i = stop + 2
    return i, out
