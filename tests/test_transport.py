"""The worker's HTTP/1.1 transport (``workers/_transport.py``) against raw loopback servers:
bodies framed every way and split at every byte, keep-alive reuse, the pool's bound,
connections the server closed, and failures as httpx's exceptions.

(Every worker test also runs on it, against the fake provider.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers._transport import LeanClient, LeanTransport, _Dechunker


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.url = ""
        self.close_next = False  # close the connection after the next answer


Answer = Callable[[Server, bytes], Awaitable[bytes | None]]


@asynccontextmanager
async def serving(
    answer: Callable[[Server, bytes], Awaitable[bytes | None]],
) -> AsyncIterator[Server]:
    """A server that answers each request on a connection with ``answer``'s bytes
    (None: close the connection without answering)."""
    state = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.open += 1
        state.most_open = max(state.most_open, state.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                request = head + await reader.readexactly(length)
                state.requests.append(request)
                data = await answer(state, request)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
                if state.close_next:
                    state.close_next = False
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            state.open -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}/v1/chat"
    async with server:
        yield state


def client(max_connections: int = 4) -> httpx.AsyncClient:
    transport = LeanTransport(
        max_connections=max_connections, ssl_context=ssl.create_default_context()
    )
    return httpx.AsyncClient(transport=transport)


def chunked(*parts: bytes, close: bool = False) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    head += b"connection: close\r\n\r\n" if close else b"\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return head + body + b"0\r\n\r\n"


PARTS = (b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n")


async def always(data: bytes) -> Answer:
    async def answer(state: Server, request: bytes) -> bytes:
        return data

    return answer


async def test_a_chunked_body_arrives_whole_and_the_connection_is_reused() -> None:
    async with serving(await always(chunked(*PARTS))) as server, client() as http:
        for _ in range(3):
            async with http.stream("POST", server.url, content=b'{"a":1}') as response:
                body = b"".join([part async for part in response.aiter_raw()])
            assert response.status_code == 200
            assert body == b"".join(PARTS)
    assert server.connections == 1
    assert server.requests[0].endswith(b'\r\n\r\n{"a":1}')
    assert b"content-length: 7" in server.requests[0].lower()


async def test_a_body_split_at_every_byte_is_read_alike() -> None:
    """The server writes its answer one byte at a time."""
    data = chunked(*PARTS)

    async def byte_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    server = await asyncio.start_server(byte_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, client() as http, http.stream("POST", f"http://127.0.0.1:{port}/") as r:
        body = b"".join([part async for part in r.aiter_raw()])
    assert body == b"".join(PARTS)


async def test_the_chunks_of_one_read_come_as_one_piece_of_data() -> None:
    """A provider that sends many tokens at once (many HTTP chunks in one write) is
    read as one piece, so the worker sends one reply message for them, not one per
    chunk. (Before, each HTTP chunk was a piece of its own: 8 reply messages for 8
    tokens sent together.)"""
    async with (
        serving(await always(chunked(*PARTS))) as server,
        client() as http,
        http.stream("POST", server.url, content=b"{}") as response,
    ):
        pieces = [part async for part in response.aiter_raw()]
    assert pieces == [b"".join(PARTS)]


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_a_chunked_body_cut_anywhere_gives_the_same_data(cuts: list[int]) -> None:
    parts = (b"data: one\n\n", b"x" * 40, b"data: [DONE]\n\n")
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nT: v\r\n\r\n"
    decoder, data, at = _Dechunker(), b"", 0
    for cut in sorted({min(c, len(body)) for c in cuts} | {len(body)}):
        data += decoder.feed(body[at:cut])
        at = cut
    assert data == b"".join(parts) and decoder.done and not decoder.extra


def _dechunked(pieces: list[bytes]) -> tuple[bytes | None, bool, bool]:
    """A body fed in ``pieces``: its data (None: refused as malformed), done, extra."""
    decoder, data = _Dechunker(), b""
    try:
        for piece in pieces:
            data += decoder.feed(piece)
    except httpx.RemoteProtocolError:
        return None, False, False
    return data, decoder.done, decoder.extra


def _bytewise(body: bytes) -> list[bytes]:  # one byte per feed: only the general path
    return [body[i : i + 1] for i in range(len(body))]


_SIZE = st.sampled_from(
    [b"%x", b"%X", b"0%x", b"%x;ext=1", b"%x ", b"%x\n", b"0x%x", b"+%x", b"%x_"]
)
_CHUNK = st.builds(
    lambda data, size: (size % len(data)).replace(b"_", b"_0") + b"\r\n" + data + b"\r\n",
    st.binary(min_size=1, max_size=40) | st.sampled_from([b"data: x\n\n", b"5\r\nhello\r\n"]),
    _SIZE,
)
_NOISE = st.sampled_from(
    [b"0\r\n", b"\r\n", b"\n", b"zz\r\n", b"-1\r\n", b"3\r\nab", b"T: v\r\n", b"x"]
)


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(_CHUNK | _NOISE, max_size=10),
    end=st.sampled_from([b"0\r\n\r\n", b"0\r\nT: v\r\n\r\n", b"0\r\n\r\nstray", b""]),
    reads=st.lists(st.integers(min_value=0, max_value=3), max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=2_000), max_size=6),
)
def test_reads_of_whole_chunks_give_what_byte_by_byte_gives(
    parts: list[bytes], end: bytes, reads: list[int], cuts: list[int]
) -> None:
    """Reads of whole chunks (the fast paths: exactly one chunk, or several), reads cut
    anywhere, and one byte at a time (the general path only) give the same data, the
    same end, and refuse the same malformed bodies."""
    body = b"".join(parts) + end
    ends = [0]
    for n in reads:
        ends.append(min(ends[-1] + n, len(parts)))
    offsets = sorted({sum(map(len, parts[:k])) for k in ends} | {len(body)})
    whole = [body[a:b] for a, b in itertools.pairwise([0, *offsets])]
    points = sorted({0, len(body), *(min(c, len(body)) for c in cuts)})
    cut = [body[a:b] for a, b in itertools.pairwise(points)]
    expected = _dechunked(_bytewise(body))
    assert _dechunked(whole) == expected
    assert _dechunked(cut) == expected
    assert _dechunked([body]) == expected


def test_a_read_of_one_chunk_is_its_data_as_it_stands() -> None:
    decoder = _Dechunker()
    assert decoder.feed(b"1a\r\n" + b"x" * 26 + b"\r\n") == b"x" * 26
    assert decoder.feed(b"2\r\nab\r\n3\r\ncde\r\n") == b"abcde"
    assert decoder.feed(b"2\r\nfg\r\n1\r") == b"fg"  # then a cut: the general path
    assert decoder.feed(b"\nh\r\n0\r\n\r\n") == b"h"
    assert decoder.done and not decoder.extra
    assert decoder.feed(b"1\r\nx\r\n") == b"" and decoder.extra  # after the end: not data
    decoder = _Dechunker()
    assert decoder.feed(b"1") == b""  # a size cut short: "11" (17 bytes), not "1"
    assert decoder.feed(b"1\r\nx\r\n") == b"x\r\n"


@pytest.mark.parametrize(
    "reads",
    [
        [b"3\r\nabc", b"2\r\nde\r\n"],  # the CRLF after a chunk's data is missing
        [b"3\r\nabcXY", b"5\r\nhello\r\n"],  # something else stands in its place
        [b"5\n\r\nhello\r\n"],  # a size line "5\n", then data that begins "\r\n"
    ],
)
def test_a_malformed_body_is_refused_however_it_is_read(reads: list[bytes]) -> None:
    body = b"".join(reads)
    assert _dechunked(reads) == _dechunked([body]) == _dechunked(_bytewise(body))
    assert _dechunked(reads)[0] is None


@pytest.mark.parametrize(
    "body", [b"zz\r\nab\r\n0\r\n\r\n", b"-2\r\nab\r\n0\r\n\r\n", b"2\r\nabc\r\n0\r\n\r\n"]
)
def test_a_malformed_chunked_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        _Dechunker().feed(body)


async def test_bytes_after_a_chunked_body_close_the_connection() -> None:
    """A server that sends more than its framing says (here a stray line after the
    last chunk) would confuse the next answer on that connection: it is not reused."""
    async with serving(await always(chunked(*PARTS) + b"stray\r\n")) as server, client() as http:
        for _ in range(2):
            async with http.stream("POST", server.url, content=b"{}") as response:
                body = b"".join([part async for part in response.aiter_raw()])
            assert body == b"".join(PARTS)
    assert server.connections == 2


async def test_content_length_and_connection_close_bodies() -> None:
    sized = b'HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\n\r\n{"e":"no"}\n'
    async with serving(await always(sized)) as server, client() as http:
        first = await http.post(server.url, content=b"x")
        second = await http.post(server.url, content=b"x")
    assert (first.status_code, first.content) == (400, b'{"e":"no"}\n')
    assert second.content == first.content and server.connections == 1

    async with serving(await always(chunked(*PARTS, close=True))) as server, client() as http:
        for _ in range(2):
            assert (await http.post(server.url)).content == b"".join(PARTS)
    assert server.connections == 2  # "connection: close" is never reused


async def test_at_most_max_connections_are_open_at_once() -> None:
    release = asyncio.Event()

    async def slow(state: Server, request: bytes) -> bytes:
        await release.wait()
        return chunked(*PARTS)

    async with serving(slow) as server, client(max_connections=2) as http:
        tasks = [asyncio.create_task(http.post(server.url)) for _ in range(5)]
        while len(server.requests) < 2:
            await asyncio.sleep(0.01)
        assert server.open == 2  # the other three wait for a connection
        release.set()
        answers = await asyncio.gather(*tasks)
    assert [a.status_code for a in answers] == [200] * 5
    assert server.most_open == 2


async def test_a_connection_the_server_closed_is_not_reused() -> None:
    """Every second request is answered by closing the connection (as a server's
    keep-alive timeout racing a request does): that request fails before any response,
    and the next one gets a new connection."""

    async def once(state: Server, request: bytes) -> bytes | None:
        return chunked(*PARTS) if len(state.requests) % 2 else None

    async with serving(once) as server, client() as http:
        first = await http.post(server.url)
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post(server.url)  # answered by closing: no response at all
        third = await http.post(server.url)
    assert first.status_code == third.status_code == 200
    assert server.connections == 2


async def test_a_truncated_body_and_an_abandoned_one() -> None:
    cut = chunked(*PARTS)[:-20]

    async def then_close(state: Server, request: bytes) -> bytes | None:
        if len(state.requests) == 1:
            state.close_next = True  # the provider's stream breaks mid-body
            return cut
        return chunked(*PARTS)

    async with serving(then_close) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", server.url) as response:
                async for _ in response.aiter_raw():
                    pass
        async with http.stream("POST", server.url) as response:
            async for _ in response.aiter_raw():
                break  # abandoned: the connection cannot be reused
        again = await http.post(server.url)
    assert again.content == b"".join(PARTS)
    assert server.connections == 3


async def test_an_unreachable_origin_is_a_connect_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_https_with_the_pool_s_tls_context(tmp_path: Path) -> None:
    """TLS to a server whose certificate the context trusts; one that it does not trust
    is a connect error, never a plain-text fallback."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=local",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(chunked(*PARTS))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    trusting = ssl.create_default_context(cafile=tmp_path / "cert.pem")
    async with server:
        transport = LeanTransport(max_connections=1, ssl_context=trusting)
        async with httpx.AsyncClient(transport=transport) as http:
            answer = await http.post(url)
        async with client() as http:  # the system CAs: not this certificate's
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.post(url)
    assert answer.content == b"".join(PARTS)


async def test_post_stream_skips_httpx_and_reuses_its_connection() -> None:
    """The worker's path (``LeanClient.post_stream``): one connection for three posts,
    each reported to ``on_connect`` once, the head as the provider gets it."""
    opened: list[int] = []
    transport = LeanTransport(
        max_connections=2,
        ssl_context=ssl.create_default_context(),
        on_connect=lambda: opened.append(1),
    )
    answer = await always(chunked(*PARTS))
    async with serving(answer) as server, LeanClient(transport, connect_s=5.0) as http:
        for _ in range(3):
            response = await http.post_stream(
                server.url + "?alt=sse", {"content-type": "application/json"}, b"{}"
            )
            body = b"".join([part async for part in response.aiter_bytes()])
            await response.aclose()
            assert (response.status_code, response.is_success) == (200, True)
            assert body == b"".join(PARTS)
            assert response.headers["content-type"] == "text/event-stream"
    assert server.connections == 1 and opened == [1]
    port = server.url.split(":")[2].split("/")[0]
    assert server.requests[0] == (
        b"POST /v1/chat?alt=sse HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode()
        + b"\r\nuser-agent: llmrelay\r\ncontent-length: 2\r\n"
        b"content-type: application/json\r\n\r\n{}"
    )  # fmt: skip


async def test_post_stream_refuses_a_header_that_would_split_the_request() -> None:
    async with serving(await always(chunked(*PARTS))) as server:
        transport = LeanTransport(max_connections=1, ssl_context=ssl.create_default_context())
        async with LeanClient(transport, connect_s=5.0) as http:
            with pytest.raises(httpx.LocalProtocolError):
                await http.post_stream(server.url, {"x-trace": "a\r\nx-evil: 1"}, b"{}")
            ok = await http.post_stream(server.url, {}, b"{}")  # the pool still serves
            await ok.aclose()
    assert len(server.requests) == 1 and b"x-evil" not in server.requests[0]
