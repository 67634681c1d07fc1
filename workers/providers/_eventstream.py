"""An incremental parser of AWS's binary event stream (``application/vnd.amazon.eventstream``).

Bedrock's streamed answers are a sequence of frames, all integers big-endian:

    total length u32 | headers length u32 | prelude CRC32 (of the 8 bytes before)
    headers: name length u8, name, value type u8, value
    payload
    message CRC32 (of everything before it)

Header value types: 0/1 true/false, 2-5 signed ints of 1/2/4/8 bytes, 6 bytes
and 7 string (u16 length first), 8 timestamp (i64 milliseconds), 9 a 16-byte
UUID. Like the SSE parser, ``feed`` takes chunks split anywhere and returns the
complete frames, so ``UpstreamBody.items`` drives it.

A damaged frame is a ``BadFrame`` item, never an exception. When only the
message CRC (or a header) is wrong the prelude still says where the frame ends:
it is skipped (``fatal=False``), and what follows is read on. A wrong prelude
CRC or an impossible length loses the framing itself, so the parser reports
``fatal=True`` once and then ignores the rest of the body.
"""

from __future__ import annotations

import struct
import zlib

import msgspec

_PRELUDE = struct.Struct(">III")
_PRELUDE_BYTES = 12
_MIN_FRAME_BYTES = 16  # prelude and message CRC: a frame with no headers and no payload
_MAX_FRAME_BYTES = 16 * 1024 * 1024 + 128 * 1024  # AWS's limits: 16 MiB payload, 128 KiB headers
_FIXED = {2: struct.Struct(">b"), 3: struct.Struct(">h"), 4: struct.Struct(">i"),
          5: struct.Struct(">q"), 8: struct.Struct(">q")}  # fmt: skip
_U16 = struct.Struct(">H")

HeaderValue = bool | int | bytes | str


class EventMessage(msgspec.Struct, frozen=True):
    """One frame: its headers (``:event-type``, ``:message-type``, ...) and payload."""

    headers: dict[str, HeaderValue]
    payload: bytes

    def header(self, name: str) -> str:
        """A string header's value; ``""`` when absent or not a string."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else ""


class BadFrame(msgspec.Struct, frozen=True):
    """A frame that failed its checks; ``fatal``: the framing is lost, nothing follows."""

    reason: str
    fatal: bool = False


class EventStreamParser:
    """Feed bytes, get ``EventMessage``s (or ``BadFrame``s); ``close()`` at end of body."""

    __slots__ = ("_broken", "_buffer")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    def feed(self, chunk: bytes) -> list[EventMessage | BadFrame]:
        if self._broken:
            return []
        self._buffer += chunk
        items: list[EventMessage | BadFrame] = []
        offset = 0
        while not self._broken and len(self._buffer) - offset >= _PRELUDE_BYTES:
            total = self._frame_length(offset)
            if total is None:
                items.append(BadFrame("event stream prelude is corrupt", fatal=True))
                break
            if len(self._buffer) - offset < total:
                break
            items.append(_frame(bytes(self._buffer[offset : offset + total])))
            offset += total
        del self._buffer[:offset]
        return items

    def close(self) -> list[EventMessage | BadFrame]:
        """A partial frame left over means the body ended inside it."""
        left = bool(self._buffer) and not self._broken
        self._buffer.clear()
        return [BadFrame("the body ended inside a frame", fatal=True)] if left else []

    def _frame_length(self, offset: int) -> int | None:
        """The frame's total length from a checked prelude; None (and broken) if it is bad."""
        total, headers_len, crc = _PRELUDE.unpack_from(self._buffer, offset)
        prelude = bytes(self._buffer[offset : offset + 8])
        fits = _MIN_FRAME_BYTES <= total <= _MAX_FRAME_BYTES and headers_len <= total - 16
        if zlib.crc32(prelude) != crc or not fits:
            self._broken = True
            self._buffer.clear()
            return None
        return int(total)


def _frame(frame: bytes) -> EventMessage | BadFrame:
    """A whole frame whose prelude checked out: verify its CRC, decode its headers."""
    (crc,) = struct.unpack_from(">I", frame, len(frame) - 4)
    if zlib.crc32(frame[:-4]) != crc:
        return BadFrame("event stream message CRC mismatch")
    headers_len = struct.unpack_from(">I", frame, 4)[0]
    end = _PRELUDE_BYTES + headers_len
    try:
        headers = decode_headers(frame[_PRELUDE_BYTES:end])
    except ValueError as exc:
        return BadFrame(f"event stream headers: {exc}")
    return EventMessage(headers, frame[end:-4])


def decode_headers(data: bytes) -> dict[str, HeaderValue]:
    """The header block of a frame; raises ValueError for an unknown type or a short block."""
    headers: dict[str, HeaderValue] = {}
    at = 0
    try:
        while at < len(data):
            name_len = data[at]
            name = data[at + 1 : at + 1 + name_len].decode()
            at += 1 + name_len
            headers[name], at = _value(data, data[at], at + 1)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"truncated or undecodable header block ({exc})") from exc
    return headers


def _value(data: bytes, kind: int, at: int) -> tuple[HeaderValue, int]:
    if kind in (0, 1):
        return kind == 0, at
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return int(fixed.unpack_from(data, at)[0]), at + fixed.size
    if kind == 9:
        if at + 16 > len(data):
            raise IndexError("uuid")
        return data[at : at + 16], at + 16
    if kind in (6, 7):
        (size,) = _U16.unpack_from(data, at)
        raw = data[at + 2 : at + 2 + size]
        if len(raw) != size:
            raise IndexError("value")
        return (raw.decode() if kind == 7 else raw), at + 2 + size
    raise ValueError(f"unknown header value type {kind}")
