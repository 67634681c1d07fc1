"""Wire protocol: JSON round trips, forward compatibility, schema."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from broker import (
    ERROR_CODES,
    Chunk,
    Done,
    Error,
    Message,
    Notice,
    Timings,
    Usage,
    json_schema,
)
from broker._protocol import decode_event, decode_job, encode


def test_job_published_as_plain_json_decodes() -> None:
    raw = {
        "id": "r1",
        "route": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "reply_to": "llm.reply.r1",
        "deadline_ms": 1,
    }
    job = decode_job(json.dumps(raw).encode())
    assert job.messages == [Message(role="user", content="hi")]
    assert job.attempts == [] and job.pool is None


def test_unknown_fields_from_a_newer_client_are_ignored() -> None:
    raw = {
        "id": "r1",
        "route": "chat",
        "messages": [{"role": "user", "content": "hi", "future": 1}],
        "reply_to": "x",
        "deadline_ms": 1,
        "brand_new_field": {"nested": True},
    }
    assert decode_job(json.dumps(raw).encode()).id == "r1"


def test_events_are_a_tagged_union() -> None:
    events = [
        Chunk(seq=0, attempt=1, delta="He"),
        Notice(kind="failover", attempt=2, from_pool="a", to_pool="b", reset=True),
        Done(
            attempt=2,
            finish_reason="stop",
            usage=Usage(prompt_tokens=3, completion_tokens=4),
            pool="b",
            model="m",
            timings=Timings(total_ms=5.0),
        ),
        Error(code="all_providers_failed", message="x"),
    ]
    for event in events:
        data = encode(event)
        assert json.loads(data)["type"] in {"chunk", "notice", "done", "error"}
        assert decode_event(data) == event


@given(st.text(), st.integers(min_value=0, max_value=2**40), st.integers(min_value=0, max_value=99))
def test_chunk_round_trip(delta: str, seq: int, attempt: int) -> None:
    chunk = Chunk(seq=seq, attempt=attempt, delta=delta)
    assert decode_event(encode(chunk)) == chunk


def test_bad_job_is_a_validation_error() -> None:
    try:
        decode_job(b'{"id": 1}')
    except msgspec.ValidationError as exc:
        assert "id" in str(exc)
    else:
        raise AssertionError("expected a validation error")


def test_schema_covers_job_events_and_error_codes() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    for name in ("Job", "Chunk", "Notice", "Done", "Error", "Message", "Attempt"):
        assert name in defs
    assert set(schema["error_codes"]) == set(ERROR_CODES)
    required = set(defs["Job"]["required"])
    assert {"id", "route", "messages", "reply_to", "deadline_ms"} <= required
    assert "attempts" not in required  # optional: an older client may omit it
