"""Incremental parsers for the two streaming body formats providers use.

Network reads split a body at arbitrary bytes, so both parsers take chunks of
any size and return only complete items, keeping the unfinished tail for the
next ``feed``. They never see the whole body at once, which is what lets an
adapter hand each token on as soon as its bytes arrive.

* ``SSEParser``: Server-Sent Events (OpenAI, Anthropic), per the WHATWG
  event-stream rules: lines end in ``\\r\\n``, ``\\n`` or ``\\r``; ``data:`` lines
  of one event are joined with ``\\n``; lines starting with ``:`` are comments;
  a blank line dispatches the event.
* ``NDJSONParser``: one JSON document per line (Ollama); the parser only
  frames lines, the adapter decodes them.
"""

from __future__ import annotations

import msgspec

_LINE_ENDS = (b"\r\n", b"\n", b"\r")


class SSEEvent(msgspec.Struct, frozen=True):
    """One dispatched event. ``event`` is ``"message"`` when the stream named none."""

    data: str
    event: str = "message"
    id: str | None = None


class _LineSplitter:
    """Frames complete lines out of arbitrary byte chunks (any of the three line ends)."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._tail + chunk if self._tail else chunk
        lines = data.splitlines(keepends=True)
        # The last piece is unfinished if it has no line end; a trailing lone
        # "\r" is held back too, since the "\n" of a "\r\n" may be in the next chunk.
        if lines and (not lines[-1].endswith(_LINE_ENDS) or lines[-1].endswith(b"\r")):
            self._tail = lines.pop()
        else:
            self._tail = b""
        return [_strip_line_end(line) for line in lines]

    def close(self) -> list[bytes]:
        tail, self._tail = self._tail, b""
        return [_strip_line_end(tail)] if tail else []


def _strip_line_end(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith((b"\n", b"\r")):
        return line[:-1]
    return line


class SSEParser:
    """Feed bytes, get ``SSEEvent``s; ``close()`` at end of body flushes the last event.

    ``close()`` is lenient: an event whose final blank line never came is still
    dispatched (some servers end the body right after the last ``data:``).
    """

    __slots__ = ("_data", "_event", "_id", "_lines", "_started")

    def __init__(self) -> None:
        self._lines = _LineSplitter()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        for line in self._lines.feed(chunk):
            self._line(line, events)
        return events

    def close(self) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        for line in self._lines.close():
            self._line(line, events)
        self._dispatch(events)
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        line = raw.decode("utf-8", "replace")
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if not line:
            self._dispatch(events)
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            self._field(name, value.removeprefix(" "))

    def _field(self, name: str, value: str) -> None:
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(SSEEvent("\n".join(self._data), self._event or "message", self._id))
        self._data = []
        self._event = ""


class NDJSONParser:
    """Feed bytes, get complete non-blank lines (still encoded; the adapter decodes them)."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines = _LineSplitter()

    def feed(self, chunk: bytes) -> list[bytes]:
        return [line for line in self._lines.feed(chunk) if line.strip()]

    def close(self) -> list[bytes]:
        return [line for line in self._lines.close() if line.strip()]
