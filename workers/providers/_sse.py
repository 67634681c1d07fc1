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

Most reads of a streamed answer are one token: one ``data:`` line and its blank
line. ``SSEParser`` takes a read of such whole events without splitting it into
lines (a third of the CPU of the line-by-line path, ``bench/chunk_path.py``);
any other read goes line by line, with the same events as a result.
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

    @property
    def pending(self) -> bool:
        """An unfinished line is held for the next chunk."""
        return bool(self._tail)

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

    __slots__ = ("_between_events", "_data", "_event", "_id", "_lines", "_started")

    def __init__(self) -> None:
        self._lines = _LineSplitter()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False
        # Started, nothing of an event read yet, no unfinished line: a read of whole
        # ``data:`` events may skip the line-by-line path (``_whole_data_events``).
        self._between_events = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._between_events:
            end = chunk.find(b"\n")  # one event of one "data: " line, a token? (cheapest first)
            one = end == len(chunk) - 2 and chunk[-1] == 10 and chunk.startswith(b"data: ")
            if one and chunk.find(b"\r") < 0:
                return [self._event_of(chunk[6:end])]
            events = self._whole_data_events(chunk)
            if events is not None:
                return events
        events = []
        for line in self._lines.feed(chunk):
            self._line(line, events)
        self._between_events = self._started and not self._data and not self._lines.pending
        return events

    def _whole_data_events(self, chunk: bytes) -> list[SSEEvent] | None:
        """The events of a read that is only whole one-line ``data:`` events (LF line
        ends), as the line-by-line path would give them; None for any other read (and
        nothing changed), which that path then takes."""
        if not chunk.endswith(b"\n\n") or b"\r" in chunk:
            return None
        values: list[bytes] = []
        i, n = 0, len(chunk)
        while i < n:
            end = chunk.find(b"\n", i)  # found: the read ends in one
            if chunk[end + 1 : end + 2] != b"\n" or not chunk.startswith(b"data:", i):
                return None
            start = i + 6 if chunk[i + 5 : i + 6] == b" " else i + 5
            values.append(chunk[start:end])
            i = end + 2
        return [self._event_of(value) for value in values]

    def _event_of(self, value: bytes) -> SSEEvent:
        """The event of one ``data:`` line's value, dispatched at once."""
        name, self._event = self._event or "message", ""
        return SSEEvent(value.decode("utf-8", "replace"), name, self._id)

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
