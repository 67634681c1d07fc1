"""The resume rule of the folds, and the splice of a restarted answer: pure logic.

A mid-stream failover that carries the text along says so (``notice{resume,
offset}``), and so does the attempt that continues it; every fold (the client's
``Answer``, the gateway's ``ReplyFold``) then keeps the caller's text and adds
only what is new. Anything it cannot put together ends in ``cannot_continue``,
never in a garbled answer.
"""

from __future__ import annotations

import pytest

from broker import Answer, Chunk, Done, Notice, Timings, Usage
from broker._errors import CannotContinue, StreamReset
from gateway import ReplyFold
from workers._continuation import Splice


def chunk(attempt: int, seq: int, delta: str) -> Chunk:
    return Chunk(seq=seq, attempt=attempt, delta=delta)


def failover(attempt: int, offset: int) -> Notice:
    return Notice(kind="failover", attempt=attempt, resume=True, offset=offset, to_pool="b")


def resumed(attempt: int, offset: int) -> Notice:
    return Notice(kind="resumed", attempt=attempt, resume=True, offset=offset)


def done(attempt: int) -> Done:
    return Done(
        attempt=attempt,
        finish_reason="stop",
        usage=Usage(),
        pool="b",
        model="mb",
        timings=Timings(),
    )


def continued_answer() -> list[Chunk | Notice | Done]:
    """Attempt 1 sends "Hello wor", breaks; attempt 1025 (its re-queue) continues."""
    return [
        chunk(1, 0, "Hello "),
        chunk(1, 1, "wor"),
        failover(1, 9),
        resumed(1025, 9),
        chunk(1025, 0, "ld."),
        done(1025),
    ]


def test_the_client_fold_keeps_the_text_across_a_continued_failover() -> None:
    answer = Answer()
    for event in continued_answer():
        answer.add(event)
    assert answer.text == "Hello world." and answer.done is not None and answer.resets == 0


def test_the_gateway_fold_streams_a_continuation_as_if_nothing_happened() -> None:
    fold = ReplyFold(0.0)
    sent = ""
    for event in continued_answer():
        if isinstance(event, Chunk):
            sent += fold.chunk(event, 0.0)
        elif isinstance(event, Notice):
            fold.notice(event)
        else:
            fold.add(event)
    assert sent + fold.finish() == "Hello world." and fold.done is not None


def test_a_backup_that_streams_before_the_failover_notice_arrives_still_continues() -> None:
    answer = Answer()
    events = continued_answer()
    for event in [*events[:2], *events[3:5], events[2], events[5]]:  # failover notice late
        answer.add(event)
    assert answer.text == "Hello world." and answer.done is not None


def test_a_continuation_with_nothing_to_add_keeps_the_text() -> None:
    answer = Answer()
    for event in [chunk(1, 0, "All of it."), failover(1, 10), resumed(1025, 10), done(1025)]:
        answer.add(event)
    assert answer.text == "All of it." and answer.done is not None


def test_a_resume_that_keeps_less_than_the_fold_has_drops_the_rest() -> None:
    """A redelivery after a worker died mid-continuation: its text past the offset is void."""
    answer = Answer()
    for event in [
        chunk(1, 0, "Hello "),
        resumed(1025, 6),
        chunk(1025, 0, "wo"),
        resumed(1026, 6),
        chunk(1026, 0, "world"),
    ]:
        answer.add(event)
    assert answer.text == "Hello world"


def test_the_gateway_cannot_take_back_sent_text_and_says_so() -> None:
    fold = ReplyFold(0.0)
    fold.chunk(chunk(1, 0, "Hello "), 0.0)
    fold.notice(resumed(1025, 6))
    fold.chunk(chunk(1025, 0, "wo"), 0.0)
    with pytest.raises(StreamReset, match="continued from character 6"):
        fold.notice(resumed(1026, 6))


def test_a_resume_past_the_text_that_arrived_ends_in_cannot_continue() -> None:
    for fold in (Answer(), ReplyFold(0.0)):
        fold.add(chunk(1, 0, "Hel"))
        fold.add(resumed(1025, 9))
        assert fold.error is not None and fold.error.code == "cannot_continue"
        assert fold.error.retryable
        assert fold.add(chunk(1025, 0, "ld.")) == ""  # nothing counts after the end


def test_a_reset_still_voids_the_text() -> None:
    answer = Answer()
    answer.add(chunk(1, 0, "Hello "))
    answer.add(Notice(kind="failover", attempt=1, reset=True))
    answer.add(chunk(1025, 0, "Hi there."))
    assert answer.text == "Hi there." and answer.resets == 1


def test_a_restart_that_begins_with_the_callers_text_is_spliced() -> None:
    splice = Splice("Hello wor")
    assert [splice.feed(d) for d in ("Hel", "lo w", "orld", ".")] == ["", "", "ld", "."]
    splice.finish()


def test_a_restart_that_differs_is_refused_at_the_first_differing_character() -> None:
    splice = Splice("Hello wor")
    assert splice.feed("Hello") == ""
    with pytest.raises(CannotContinue, match="does not begin with them"):
        splice.feed(" there")


def test_a_restart_shorter_than_the_callers_text_cannot_continue_it() -> None:
    splice = Splice("Hello world")
    splice.feed("Hello")
    with pytest.raises(CannotContinue, match="ended after 5"):
        splice.finish()


# --- a hole in the replies ---------------------------------------------------------------


def finished(attempt: int, chunks: int) -> Done:
    return Done(attempt=attempt, finish_reason="stop", usage=Usage(), pool="a", model="ma",
                timings=Timings(), chunks=chunks)  # fmt: skip


@pytest.mark.parametrize(
    ("events", "lost"),
    [
        ([chunk(1, 0, "Hello "), chunk(1, 2, "!"), finished(1, 3)], "chunk 1"),
        ([chunk(1, 0, "Hello "), chunk(1, 1, "world"), finished(1, 3)], "1 of its last chunks"),
        ([finished(1, 2)], "2 of its last chunks"),
    ],
)
def test_a_hole_in_the_replies_ends_the_answer_never_a_shorter_one(
    events: list[Chunk | Done], lost: str
) -> None:
    """A chunk that never arrived (a NATS node died with it, unstored) ends every fold with
    ``stream_interrupted`` (retryable): never an answer with a hole reported as done."""
    for fold in (Answer(), ReplyFold()):
        for event in events:
            fold.add(event)
        assert fold.done is None and fold.error is not None
        assert (fold.error.code, fold.error.retryable) == ("stream_interrupted", True)
        assert lost in fold.error.message and fold.lost_events


def test_a_chunk_seen_twice_counts_once_and_each_attempt_counts_from_0() -> None:
    answer = Answer()
    events = [chunk(1, 0, "Hel"), chunk(1, 0, "Hel"), chunk(1, 1, "lo"), failover(1, 5),
              resumed(1025, 5), chunk(1025, 0, "!"), finished(1025, 1)]  # fmt: skip
    for event in events:
        answer.add(event)
    assert answer.done is not None and answer.text == "Hello!"
    old = Answer()  # a worker that does not say how many chunks it sent (chunks: 0)
    for event in [chunk(1, 0, "Hi"), finished(1, 0)]:
        old.add(event)
    assert old.done is not None and old.text == "Hi"


def continuation_chunk(attempt: int, offset: int, delta: str) -> Chunk:
    """The first chunk of a continuing attempt: it says where it continues (``offset``)."""
    return Chunk(seq=0, attempt=attempt, delta=delta, offset=offset)


def test_a_continuation_whose_resume_notices_were_lost_still_keeps_the_callers_text() -> None:
    """The notices went with a NATS node that died; the first chunk of the continuing
    attempt says it continues after 9 characters, so the answer is not cut to "ld."."""
    events = [chunk(1, 0, "Hello "), chunk(1, 1, "wor"), continuation_chunk(2, 9, "ld."), done(2)]
    answer, fold, sent = Answer(), ReplyFold(0.0), ""
    for event in events:
        answer.add(event)
        if isinstance(event, Chunk):
            sent += fold.chunk(event, 0.0)
        else:
            fold.add(event)
    assert answer.text == "Hello world." and answer.done is not None
    assert sent + fold.finish() == "Hello world." and fold.done is not None


def test_a_continuation_past_the_text_that_arrived_ends_in_cannot_continue() -> None:
    for fold in (Answer(), ReplyFold(0.0)):
        fold.add(chunk(1, 0, "Hel"))
        assert fold.add(continuation_chunk(2, 9, "ld.")) == ""
        assert fold.error is not None and fold.error.code == "cannot_continue"
        assert fold.error.retryable


def test_a_newer_attempts_first_chunk_without_an_offset_still_starts_over() -> None:
    answer = Answer()
    for event in [chunk(1, 0, "Hello "), chunk(2, 0, "Hi there."), done(2)]:
        answer.add(event)
    assert answer.text == "Hi there."
