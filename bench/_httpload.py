"""The load generator's HTTP client of the gateway: streamed chat completions, lean.

A Python load generator pays for its own HTTP client, and the one it uses decides
what it can send: httpx costs about 1 ms of CPU per streamed request on this
machine, which is the gateway's whole budget at 1,000 req/s. So the generator
posts through the worker's own keep-alive transport (``workers/_transport.py``):
one write per request, no client layer, at most ``connections`` open (a request
waits for a free one, as a browser's or an SDK's pool makes it wait).

An answer is read as the OpenAI SDK reads it: ``data:`` lines of SSE, the first
choice's ``delta.content`` counted as a chunk, an ``error`` object ending it with
its ``code``, ``data: [DONE]`` ending it. A status other than 200 is an error
whose code is the body's ``error.code`` (or ``http_<status>``).
"""

from __future__ import annotations

import ssl
import time
from typing import Any, Protocol

import httpx
import msgspec

from workers._transport import LeanTransport, Target

__all__ = ["GatewaySender", "RequestFigures"]

_DONE = b"[DONE]"


class RequestFigures(Protocol):
    """What a sender reports about one request (``bench._loadgen._Request``)."""

    code: str  # "unfinished" until the answer ends; "" when it completed
    pool: str

    def submitted(self) -> None: ...

    def chunk(self, attempt: int = 0, chars: int = 0) -> None: ...


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)


class _Error(msgspec.Struct):
    code: str | None = None
    type: str | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    error: _Error | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


class GatewaySender:
    """``POST {base}/chat/completions`` with ``stream: true``, one request per call."""

    def __init__(
        self, base_url: str, api_key: str, model: str, prompt: str, connections: int
    ) -> None:
        self.transport = LeanTransport(
            max_connections=connections,
            ssl_context=ssl.create_default_context(),
            on_connect=self._connected,
        )
        self.target = Target.of(base_url.rstrip("/") + "/chat/completions")
        self.headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        message = {"role": "user", "content": prompt}
        self.body = msgspec.json.encode({"model": model, "messages": [message], "stream": True})
        self.connections_opened = 0

    def _connected(self) -> None:
        self.connections_opened += 1

    async def __call__(self, req: RequestFigures, n: int) -> float:
        """Run one request; return perf_counter() when its answer was complete."""
        req.submitted()
        try:
            response = await self.transport.post(self.target, self.headers, self.body, 5.0)
        except httpx.HTTPError as exc:
            req.code = f"http_{type(exc).__name__}"
            return time.perf_counter()
        try:
            if response.status_code != 200:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
                req.code = _status_code(response.status_code, body)
                return time.perf_counter()
            return await _read_stream(response.aiter_bytes(), req)
        except httpx.HTTPError as exc:
            req.code = f"http_{type(exc).__name__}"
            return time.perf_counter()
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()


async def _read_stream(body: Any, req: RequestFigures) -> float:
    """Read SSE events to ``[DONE]``; the time the answer was complete."""
    buffer = b""
    finished = 0.0
    async for data in body:
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                finished = _event(line[6:], req, finished)
    return finished or time.perf_counter()


def _event(data: bytes, req: RequestFigures, finished: float) -> float:
    if data == _DONE:
        if req.code == "unfinished":  # no error event came before it
            req.code, req.pool = "", "gateway"
        return time.perf_counter()
    event = _decode_event(data)
    if event.error is not None:
        req.code = event.error.code or event.error.type or "error"
    elif event.choices and (text := event.choices[0].delta.content):
        req.chunk(0, len(text))
    return finished


def _status_code(status: int, body: bytes) -> str:
    try:
        event = _decode_event(body)
    except msgspec.DecodeError:
        return f"http_{status}"
    error = event.error
    return (error.code or error.type or f"http_{status}") if error else f"http_{status}"
