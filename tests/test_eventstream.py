"""The AWS event-stream parser (``workers/providers/_eventstream.py``) over bytes split anywhere.

Frames are built by the fake provider's encoder (``devstack/fake_provider/_bedrock.py``),
written apart from the parser, plus a hand-built frame for the header types the
fake never sends.
"""

from __future__ import annotations

import struct
import zlib

from hypothesis import given
from hypothesis import strategies as st

from devstack.fake_provider._bedrock import frame
from workers.providers._eventstream import BadFrame, EventMessage, EventStreamParser

_names = st.binary(min_size=1, max_size=12)
_headers = st.lists(st.tuples(_names, st.binary(max_size=40)), max_size=4)
_frames = st.lists(st.tuples(_headers, st.binary(max_size=200)), min_size=1, max_size=5)


def _parse(data: bytes, cuts: list[int]) -> list[EventMessage | BadFrame]:
    parser = EventStreamParser()
    items: list[EventMessage | BadFrame] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        items += parser.feed(data[start:cut])
        start = cut
    return items + parser.close()


def _expected(frames: list[tuple[list[tuple[bytes, bytes]], bytes]]) -> list[EventMessage]:
    out = []
    for headers, payload in frames:
        decoded: dict[str, str | bool | int | bytes] = {}
        for name, value in headers:
            decoded[name.decode("latin-1")] = value.decode("latin-1")
        out.append(EventMessage(decoded, payload))
    return out


@given(_frames, st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_frames_split_anywhere_come_out_whole(
    frames: list[tuple[list[tuple[bytes, bytes]], bytes]], cuts: list[int]
) -> None:
    frames = [([(n.hex().encode(), v.hex().encode()) for n, v in h], p) for h, p in frames]
    data = b"".join(frame(h, p) for h, p in frames)
    assert _parse(data, [c for c in cuts if c <= len(data)]) == _expected(frames)


@given(_frames)
def test_every_split_point_of_a_stream_parses_alike(
    frames: list[tuple[list[tuple[bytes, bytes]], bytes]],
) -> None:
    frames = [([(n.hex()[:6].encode(), v.hex()[:6].encode()) for n, v in h], p[:20])
              for h, p in frames]  # fmt: skip
    data = b"".join(frame(h, p) for h, p in frames)
    for cut in range(len(data) + 1):
        assert _parse(data, [cut]) == _expected(frames)


def test_one_byte_at_a_time() -> None:
    data = frame([(b":event-type", b"messageStart")], b'{"role":"assistant"}') * 3
    parser = EventStreamParser()
    items = [item for i in range(len(data)) for item in parser.feed(data[i : i + 1])]
    assert len(items) == 3 and all(isinstance(i, EventMessage) for i in items)
    assert items[0] == EventMessage({":event-type": "messageStart"}, b'{"role":"assistant"}')


@given(st.data())
def test_a_flipped_byte_is_detected(data: st.DataObject) -> None:
    first = frame([(b":event-type", b"contentBlockDelta")], b'{"delta":{"text":"hi"}}')
    second = frame([(b":event-type", b"metadata")], b"{}")
    at = data.draw(st.integers(min_value=0, max_value=len(first) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    broken = bytearray(first)
    broken[at] ^= 1 << bit
    items = _parse(bytes(broken) + second, [])
    assert isinstance(items[0], BadFrame)
    if at >= 12:  # past the prelude: the frame is skipped and the next one still read
        assert not items[0].fatal
        assert items[1:] == [EventMessage({":event-type": "metadata"}, b"{}")]
    else:  # the prelude itself: framing lost, nothing after it is trusted
        assert items[-1] == BadFrame(items[-1].reason, fatal=True)


def test_a_body_that_ends_inside_a_frame_is_reported_once() -> None:
    data = frame([(b":event-type", b"messageStop")], b"{}")
    parser = EventStreamParser()
    assert parser.feed(data[:-3]) == []
    [item] = parser.close()
    assert isinstance(item, BadFrame) and item.fatal
    assert parser.close() == []


def test_every_header_value_type_decodes() -> None:
    block = b"".join([
        b"\x01t\x00", b"\x01f\x01", b"\x01b\x02\xff", b"\x01s\x03" + struct.pack(">h", -2),
        b"\x01i\x04" + struct.pack(">i", 7), b"\x01l\x05" + struct.pack(">q", 1 << 40),
        b"\x01y\x06\x00\x02\x00\x01", b"\x01z\x07\x00\x02ok",
        b"\x01d\x08" + struct.pack(">q", 1_700_000_000_000), b"\x01u\x09" + bytes(range(16)),
    ])  # fmt: skip
    prelude = struct.pack(">II", 16 + len(block) + 1, len(block))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + block + b"x"
    data = message + struct.pack(">I", zlib.crc32(message))
    [item] = _parse(data, [])
    assert item == EventMessage(
        {"t": True, "f": False, "b": -1, "s": -2, "i": 7, "l": 1 << 40, "y": b"\x00\x01",
         "z": "ok", "d": 1_700_000_000_000, "u": bytes(range(16))},
        b"x",
    )  # fmt: skip


def test_an_unknown_header_type_skips_the_frame_only() -> None:
    block = b"\x01q\x0a"
    prelude = struct.pack(">II", 16 + len(block), len(block))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + block
    odd = message + struct.pack(">I", zlib.crc32(message))
    good = frame([(b":event-type", b"metadata")], b"{}")
    items = _parse(odd + good, [])
    assert isinstance(items[0], BadFrame) and not items[0].fatal
    assert "unknown header value type 10" in items[0].reason
    assert items[1] == EventMessage({":event-type": "metadata"}, b"{}")
