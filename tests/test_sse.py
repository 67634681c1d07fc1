"""The SSE and NDJSON parsers give the same items however the network splits the bytes."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from broker._errors import RelayError, UpstreamRejected
from broker._protocol import TokenLogprob, ToolCallDelta
from workers.providers._base import Finish, ReasoningDelta, StreamItem, TextDelta
from workers.providers._http import (
    UpstreamBody,
    _items_of,
    answer_items,
    coalesced,
    optional,
    with_last,
)
from workers.providers._sse import NDJSONParser, SSEEvent, SSEParser

# Captured shapes of real provider streams (abridged).
OPENAI = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo \\u00e9\xc3\xa9"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":25}}}\n\n'
    b"event: ping\n"
    b'data: {"type": "ping"}\n\n'
    b": a comment the parser must skip\n"
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)
MULTILINE = b"id: 7\nevent: note\ndata: first\ndata:second\ndata:  third\n\n:keepalive\n\ndata\n\n"
OLLAMA = (
    b'{"message":{"content":"Hel"},"done":false}\n'
    b'{"message":{"content":"lo"},"done":false}\n'
    b"\n"
    b'{"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":2}\n'
)
SSE_STREAMS = [OPENAI, ANTHROPIC, MULTILINE]


def parse_sse(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close()


def parse_ndjson(*chunks: bytes) -> list[bytes]:
    parser = NDJSONParser()
    lines = [line for chunk in chunks for line in parser.feed(chunk)]
    return lines + parser.close()


def test_openai_stream_yields_one_event_per_data_line() -> None:
    events = parse_sse(OPENAI)
    assert len(events) == 6
    assert events[-1] == SSEEvent("[DONE]")
    assert "lo \\u00e9é" in events[2].data


def test_anthropic_stream_keeps_event_names_and_skips_comments() -> None:
    names = [event.event for event in parse_sse(ANTHROPIC)]
    assert names == [
        "message_start",
        "ping",
        "content_block_delta",
        "message_delta",
        "message_stop",
    ]


def test_multiline_data_is_joined_with_newlines() -> None:
    events = parse_sse(MULTILINE)
    assert events == [SSEEvent("first\nsecond\n third", "note", "7"), SSEEvent("", "message", "7")]


def test_event_type_resets_after_each_event_but_id_persists() -> None:
    events = parse_sse(b"event: a\nid: 1\ndata: x\n\ndata: y\n\n")
    assert events == [SSEEvent("x", "a", "1"), SSEEvent("y", "message", "1")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert parse_sse(b"\n\n\nevent: lonely\n\n: only a comment\n\n") == []


def test_crlf_and_lone_cr_line_ends_give_the_same_events() -> None:
    for stream in SSE_STREAMS:
        expected = parse_sse(stream)
        assert parse_sse(stream.replace(b"\n", b"\r\n")) == expected
        assert parse_sse(stream.replace(b"\n", b"\r")) == expected


def test_a_leading_byte_order_mark_is_ignored() -> None:
    assert parse_sse(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent("x")]


def test_close_flushes_an_event_missing_its_final_blank_line() -> None:
    assert parse_sse(b"data: a\n\ndata: [DONE]\n") == [SSEEvent("a"), SSEEvent("[DONE]")]
    assert parse_sse(b"data: [DONE]") == [SSEEvent("[DONE]")]


def test_every_two_way_split_gives_identical_events() -> None:
    for stream in [*SSE_STREAMS, OPENAI.replace(b"\n", b"\r\n")]:
        expected = parse_sse(stream)
        for cut in range(len(stream) + 1):
            assert parse_sse(stream[:cut], stream[cut:]) == expected, cut


def test_one_byte_at_a_time_gives_identical_events() -> None:
    for stream in [*SSE_STREAMS, ANTHROPIC.replace(b"\n", b"\r\n")]:
        assert parse_sse(*(stream[i : i + 1] for i in range(len(stream)))) == parse_sse(stream)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    stream=st.sampled_from(SSE_STREAMS),
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
def test_any_split_gives_identical_events(stream: bytes, line_end: bytes, cuts: list[int]) -> None:
    data = stream.replace(b"\n", line_end)
    assert parse_sse(*_split(data, cuts)) == parse_sse(stream)


def test_ndjson_frames_lines_and_skips_blank_ones() -> None:
    lines = parse_ndjson(OLLAMA)
    assert len(lines) == 3
    assert lines[-1].startswith(b'{"done":true')


def test_ndjson_every_split_and_crlf_give_identical_lines() -> None:
    expected = parse_ndjson(OLLAMA)
    crlf = OLLAMA.replace(b"\n", b"\r\n")
    for data in (OLLAMA, crlf):
        for cut in range(len(data) + 1):
            assert parse_ndjson(data[:cut], data[cut:]) == expected, cut


def test_ndjson_last_line_without_newline_comes_out_at_close() -> None:
    parser = NDJSONParser()
    assert parser.feed(b'{"a":1}\n{"b":') == [b'{"a":1}']
    assert parser.feed(b"2}") == []
    assert parser.close() == [b'{"b":2}']


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_ndjson_any_split_gives_identical_lines(cuts: list[int]) -> None:
    assert parse_ndjson(*_split(OLLAMA, cuts)) == parse_ndjson(OLLAMA)


def test_the_text_of_one_read_is_one_delta_and_nothing_else_moves() -> None:
    """``answer_items`` joins runs of text (and of reasoning) from one read; a tool-call
    fragment, text with logprobs, and the finish stay where they were."""
    lp = [TokenLogprob(token="c", logprob=-0.5)]
    call = ToolCallDelta(index=0, id="x", name="f")
    items = [TextDelta("a"), TextDelta("b"), ReasoningDelta("r1"), ReasoningDelta("r2"),
             TextDelta("c", lp), TextDelta("d"), call, TextDelta("e"), TextDelta("f"),
             Finish("stop")]  # fmt: skip
    assert coalesced(items) == [
        TextDelta("ab", tokens=2), ReasoningDelta("r1r2"), TextDelta("c", lp), TextDelta("d"),
        call, TextDelta("ef", tokens=2), Finish("stop"),
    ]  # fmt: skip
    assert coalesced([TextDelta("only")]) == [TextDelta("only")]


# --- the fast paths: a read of whole one-line ``data:`` events, and one event per read ---

_VALUE = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)))
_LINE = st.one_of(
    st.builds(lambda v: b"data: " + v.encode(), _VALUE),
    st.builds(lambda v: b"data:" + v.encode(), _VALUE),
    st.sampled_from(
        [b"data", b"data:", b"data: ", b"event: note", b"id: 9", b": ping", b"retry: 5"]
    ),
    st.builds(lambda v: b"event: " + v.encode(), _VALUE),
    st.builds(lambda v: b"id:" + v.encode(), _VALUE),
    st.just(b"\xff\xfe bad utf-8 data: \xc3"),
    st.sampled_from([b"data: a\rdata: b", b"data: c\r", b"data: \rid: 3"]),  # a lone CR ends a line
)
# An event: its lines, then a blank line (mostly LF, as providers send; sometimes not).
_EVENT = st.builds(
    lambda lines, end: b"".join(line + end for line in lines) + end,
    st.lists(_LINE, min_size=0, max_size=4),
    st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"]),
)
# Lines of an event that its next read finishes (an ``event:`` line read on its own).
_OPENING = st.builds(lambda lines: b"".join(line + b"\n" for line in lines),
                     st.lists(st.one_of(st.sampled_from([b"event: x", b"id: 2"]), _LINE),
                              min_size=1, max_size=2))  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    events=st.lists(st.one_of(_EVENT, _EVENT, _OPENING), max_size=12),
    bom=st.booleans(),
    reads=st.lists(st.integers(min_value=0, max_value=2), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_reads_of_whole_events_give_what_the_line_by_line_path_gives(
    events: list[bytes], bom: bool, reads: list[int], cuts: list[int]
) -> None:
    """Reads that end at event boundaries (the fast path's case: a read of whole
    ``data:`` events), or anywhere: the same events as one byte at a time (which only
    the line-by-line path can take)."""
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(events)
    ends = [0]  # reads of n whole events each, then the rest
    for n in reads:
        ends.append(min(ends[-1] + n, len(events)))
    offsets = [sum(map(len, events[:k])) + (3 if bom and k else 0) for k in ends]
    chunks = [data[a:b] for a, b in itertools.pairwise([*offsets, len(data)])]
    expected = parse_sse(*(data[i : i + 1] for i in range(len(data))))
    assert parse_sse(*chunks) == expected
    assert parse_sse(*_split(data, cuts)) == expected


def test_a_read_of_one_data_event_skips_the_line_splitter() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: delta\nid: 4\n") == []
    parser._lines = None  # type: ignore[assignment]  # (the fast path never touches it)
    assert parser.feed(b'data: {"t":"\xc3\xa9"}\n\n') == [SSEEvent('{"t":"é"}', "delta", "4")]
    assert parser.feed(b"data: a\n\ndata:b\n\n") == [SSEEvent("a", id="4"), SSEEvent("b", id="4")]


def test_a_read_that_is_not_whole_data_events_takes_the_line_by_line_path() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\n") == [SSEEvent("a")]
    assert parser.feed(b"data: b\ndata: c\n\n") == [SSEEvent("b\nc")]  # two data lines
    assert parser.feed(b"data: d\r\n\r\n") == [SSEEvent("d")]
    assert parser.feed(b"data: c\r\n\n") == [SSEEvent("c")]  # a CR ends a line too
    assert parser.feed(b"data: a\rdata: b\n\n") == [SSEEvent("a\nb")]
    assert parser.feed(b"data: x\n\ndata: y\r\n\n") == [SSEEvent("x"), SSEEvent("y")]
    assert parser.feed(b"data: z\n:data: no\n\n") == [SSEEvent("z")]  # a comment line
    assert parser.feed(b": ping\n\ndata: e\n\n") == [SSEEvent("e")]
    assert parser.feed(b"data: f\n\ndata: g") == [SSEEvent("f")]  # an unfinished tail
    assert parser.feed(b"\n\n") == [SSEEvent("g")]


_LP = [TokenLogprob(token="p", logprob=-0.1)]
# What an event's data asks ``_to_items`` for (one letter per item; "e": fails).
_ITEMS: dict[str, StreamItem] = {
    "t": TextDelta("t"), "u": TextDelta("u"), "l": TextDelta("l", _LP), "r": ReasoningDelta("r"),
    "c": ToolCallDelta(index=0, id="c", name="f"), "f": Finish("stop"),
}  # fmt: skip


def _to_items(event: SSEEvent) -> Iterable[StreamItem]:
    if "e" in event.data:
        raise UpstreamRejected(f"event {event.data}")
    items = [_ITEMS[code] for code in event.data.strip(".")]
    if len(items) == 1 and event.data.endswith("."):
        return optional(items[0])  # a tuple, as some adapters answer
    return items


async def _answer(reads: list[bytes]) -> tuple[list[StreamItem], str | None]:
    async def body() -> AsyncIterator[bytes]:
        for read in reads:
            yield read

    got: list[StreamItem] = []
    try:
        upstream = UpstreamBody(httpx.Response(200, content=body()))
        async for item in answer_items(upstream, SSEParser(), _to_items):
            got.append(item)
    except RelayError as exc:
        return got, exc.message
    return got, None


def _answer_read_by_read(reads: list[bytes]) -> tuple[list[StreamItem], str | None]:
    """What ``answer_items`` gives, as its general path (every read's items joined and
    marked) computes it."""
    parser, got = SSEParser(), []
    for read in [*reads, None]:
        events = parser.close() if read is None else parser.feed(read)
        items, failure = _items_of(events, _to_items)
        for item in with_last(coalesced(items)):
            got.append(item)
            if isinstance(item, Finish):
                return got, None
        if failure is not None:
            return got, failure.message
    return got, None


_CODES = st.text(alphabet="tulrcfe", min_size=0, max_size=3).map(
    lambda codes: codes + "." if len(codes) == 1 else codes or "."
)


@settings(max_examples=300, deadline=None)
@given(reads=st.lists(st.lists(_CODES, min_size=0, max_size=3), max_size=8))
def test_a_read_of_one_event_gives_what_the_general_path_gives(reads: list[list[str]]) -> None:
    """Reads of any number of events (one, the common case, included), giving any items,
    or failing, come out as joining each read's text and marking the text before a
    finish gives them."""
    raw = [b"".join(b"data: %s\n\n" % code.encode() for code in read) for read in reads]
    assert asyncio.run(_answer(raw)) == _answer_read_by_read(raw)


async def test_one_event_with_text_and_its_finish_marks_the_text_last() -> None:
    assert await _answer([b"data: t\n\n", b"data: tf\n\n"]) == (
        [TextDelta("t"), TextDelta("t", last=True), Finish("stop")], None)  # fmt: skip
    assert await _answer([b"data: t\n\n", b"data: e\n\n", b"data: t\n\n"]) == (
        [TextDelta("t")], "event e")  # fmt: skip
