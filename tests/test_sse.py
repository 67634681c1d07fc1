"""The SSE and NDJSON parsers give the same items however the network splits the bytes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from broker._protocol import TokenLogprob, ToolCallDelta
from workers.providers._base import Finish, ReasoningDelta, TextDelta
from workers.providers._http import coalesced
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
