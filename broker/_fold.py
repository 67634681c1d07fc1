"""The reset fold: the one rule for which of a job's events count, and how attempts are named.

A job may be delivered to a provider more than once (retry, failover, a worker
that died or stalled), and every delivery has its own attempt id. Events of two
attempts can interleave (a backup may stream before the failing worker's
notice arrives, a stopped worker may wake up and go on), and other jobs may
name the same reply subject, so:

- an event of another job (``job_seq`` set and not this job's) never counts;
- an event of an older attempt than the newest seen is stale and never counts,
  ``done`` and ``error`` included: a superseded attempt cannot end the answer;
- an event of a newer attempt, or ``notice{reset: true}`` of the current one,
  voids the text of the attempt before it, except a ``notice{resume: true,
  offset: K}``: the answer's first K characters stand and the next text
  continues them (a mid-stream failover that carries the text along, and the
  continuing attempt before its first chunk). A resume past the text the fold
  holds (text it never saw) cannot be continued: the fold ends with an
  ``error{cannot_continue}`` rather than a garbled answer;
- ``done`` and ``error`` of the current (or a newer) attempt end the answer,
  and nothing counts after that.

**Attempt ids** (``attempt_id``, made by the worker, ``workers/_job.py``). A
message in the jobs stream has an attempt base: 0 for the job its client
published, and for a re-queue ``requeue_base(attempt)`` of the delivery that
re-queued it (the ``Llmrelay-Attempt-Base`` header, which only workers can
write: re-queues travel on ``llm.requeue.<pool>``). The n-th delivery of a
message has the id ``base + n``. Written in base 1024, an id is the list of
delivery counts along the job's path (``1``, ``2``: redelivered; ``2·1024+1``:
re-queued by its second delivery), so ids are unique per job, a redelivery
outranks the delivery before it, and a re-queue outranks every delivery of
the message it came from (also when two deliveries of one message both
re-queued it). ``job_seq`` (the stream sequence of the job as its client
published it, the seq of the client's PubAck) names the job itself, so a job
someone else aimed at the same reply subject never out-ranks it.

``Fold`` applies the rule and hands text to ``_text`` and voids to ``_void``.
``Answer`` (the client library, the CLI) keeps the current attempt's text;
the gateway's fold also knows what it already sent over HTTP and holds text back.
"""

from __future__ import annotations

from broker._errors import CannotContinue, StreamInterrupted
from broker._protocol import (
    Chunk,
    Done,
    Error,
    Event,
    FunctionCall,
    Notice,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
)

# Deliveries of one message that attempt ids tell apart (streams.max_deliver is far below).
ATTEMPT_RADIX = 1024


def attempt_id(base: int, delivery: int) -> int:
    """The id of the ``delivery``-th delivery (1, 2, ...) of a message with attempt ``base``."""
    return base + max(1, min(delivery, ATTEMPT_RADIX - 1))


def requeue_base(attempt: int) -> int:
    """The attempt base of a message re-queued by attempt ``attempt``: above all its ids."""
    return attempt * ATTEMPT_RADIX


class Fold:
    """Apply the attempt-ordering rule to a job's events, one at a time.

    ``job_seq``: the job's own stream sequence (a client knows it from its
    PubAck); unknown (None), the fold keeps to the job of the first event that
    names one.
    """

    def __init__(self, job_seq: int | None = None) -> None:
        self.attempt = 0
        self.job_seq = job_seq
        self.done: Done | None = None
        self.error: Error | None = None
        self.chars = 0  # characters of the answer so far
        self.tool_fragments: list[ToolCallDelta] = []  # the answer's tool calls, in pieces
        self.reasoning_parts: list[str] = []  # the reasoning streamed beside the answer
        self.logprobs: list[TokenLogprob] = []  # of the answer's tokens, when asked for
        self.lost_events = False  # a chunk of the answer never arrived (``_lost``)
        self._seq_attempt = 0  # the attempt whose chunks are counted, and the next seq
        self._next_seq = 0

    def accepts(self, event: Event) -> bool:
        """Would ``event`` count: this job's, of its current or a newer attempt, not ended?"""
        if self.finished or event.attempt < self.attempt:
            return False
        return not event.job_seq or self.job_seq is None or event.job_seq == self.job_seq

    def continues_past(self, event: Event) -> bool:
        """Whether ``event`` continues the answer after more text than the fold has (its
        earlier events were lost: a reader may find them in ``LLM_REPLIES``)."""
        resume = self._resume_in(event) if self.accepts(event) else None
        return resume is not None and resume.offset is not None and resume.offset > self.chars

    def _resume_in(self, event: Event) -> Notice | None:
        """The resume ``event`` is: a resume notice, or a continuing attempt's first chunk
        when its notice never arrived (``Chunk.offset``)."""
        if isinstance(event, Notice):
            return event if event.resume else None
        if isinstance(event, Chunk) and event.attempt > self.attempt and event.offset is not None:
            return _resume_of(event)
        return None

    def add(self, event: Event) -> str:
        """Fold one event in; return the text it adds to the answer ("" for none)."""
        if not self.accepts(event):
            return ""  # another job's, a superseded attempt's, or after the end
        if event.job_seq and self.job_seq is None:
            self.job_seq = event.job_seq
        if (resume := self._resume_in(event)) is not None:
            self._resume(resume)
            if self.error is not None:
                return ""  # it continues after text that never arrived
        elif event.attempt > self.attempt and _starts_over(event):
            self._void_all(event.attempt, f"attempt {event.attempt} started over")
        match event:
            case Chunk():
                return self._chunk(event) if self._in_sequence(event) else ""
            case Notice(reset=True):
                self._void_all(event.attempt, reset_reason(event))
            case Done(chunks=chunks):
                counted = self._next_seq if event.attempt == self._seq_attempt else 0
                if chunks > counted:
                    self._lost(event, f"{chunks - counted} of its last chunks")
                else:
                    self.done = event
            case Error():
                self.error = event
        return ""

    def _chunk(self, chunk: Chunk) -> str:
        if chunk.tool_calls:
            self.tool_fragments.extend(chunk.tool_calls)
        if chunk.reasoning:
            self.reasoning_parts.append(chunk.reasoning)
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        self.chars += len(chunk.delta)
        return self._text(chunk.delta) if chunk.delta else ""

    def _in_sequence(self, chunk: Chunk) -> bool:
        """Chunks of an attempt are 0, 1, 2 ...: one that skips means some never arrived
        (their publisher's NATS node died with them, and ``LLM_REPLIES`` did not store
        them either), and the answer ends with ``stream_interrupted``, never with a
        hole in it; one seen already (a replay's) does not count twice."""
        if chunk.attempt != self._seq_attempt:
            self._seq_attempt, self._next_seq = chunk.attempt, 0
        if chunk.seq < self._next_seq:
            return False
        if chunk.seq > self._next_seq:
            self._lost(chunk, f"chunk {self._next_seq}")
            return False
        self._next_seq += 1
        return True

    def _lost(self, event: Chunk | Done, what: str) -> None:
        self.lost_events = True
        self.error = Error(
            code=StreamInterrupted.code,
            message=f"the reply events of attempt {event.attempt} lost {what} on the way "
            "(a NATS node failed mid-answer): the answer is incomplete; retry the request",
            retryable=True,
            attempt=event.attempt,
            job_seq=event.job_seq,
        )

    @property
    def finished(self) -> bool:
        return self.done is not None or self.error is not None

    def _resume(self, notice: Notice) -> None:
        """The first ``offset`` characters stand; the text after them is void."""
        offset = self.chars if notice.offset is None else notice.offset
        if offset > self.chars:
            self.error = Error(
                code=CannotContinue.code,
                message=f"the answer continues after character {offset}, but only "
                f"{self.chars} arrived: it cannot be put together; retry the request",
                retryable=True,
                attempt=notice.attempt,
                job_seq=notice.job_seq,
            )
            return
        if offset < self.chars:
            self._keep(offset, reset_reason(notice))
            self.logprobs = _within(self.logprobs, offset)
        self.chars = offset
        self.attempt = max(self.attempt, notice.attempt)

    def _void_all(self, attempt: int, reason: str) -> None:
        self._void(attempt, reason)
        self.chars = 0
        self.tool_fragments = []
        self.reasoning_parts = []
        self.logprobs = []

    @property
    def reasoning_text(self) -> str:
        """The reasoning ("thinking") text of the attempts whose answer counts."""
        return "".join(self.reasoning_parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The answer's tool calls, put together from their fragments."""
        return assemble_tool_calls(self.tool_fragments)

    def _text(self, delta: str) -> str:
        return delta

    def _keep(self, chars: int, reason: str) -> None:
        """Keep the first ``chars`` characters of the answer (fewer than it has)."""

    def _void(self, attempt: int, reason: str) -> None:
        self.attempt = attempt


class Answer(Fold):
    """Folds events into one clean answer: the text of the newest attempt."""

    def __init__(self, job_seq: int | None = None) -> None:
        super().__init__(job_seq)
        self._parts: list[str] = []
        self.resets = 0

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _text(self, delta: str) -> str:
        self._parts.append(delta)
        return delta

    def _keep(self, chars: int, reason: str) -> None:
        text = self.text[:chars]
        self._parts = [text] if text else []
        self.resets += 1

    def _void(self, attempt: int, reason: str) -> None:
        if self._parts:
            self.resets += 1
        self._parts.clear()
        super()._void(attempt, reason)


def _resume_of(chunk: Chunk) -> Notice:
    """The resume notice a continuing attempt's first chunk stands for."""
    return Notice(
        kind="resumed",
        attempt=chunk.attempt,
        resume=True,
        offset=chunk.offset,
        job_seq=chunk.job_seq,
        message=f"continuing after {chunk.offset} characters",
    )


def _starts_over(event: Event) -> bool:
    """A newer attempt's event voids older text (a reset notice says why itself; an
    error ends the answer without one)."""
    return not isinstance(event, Error) and not (isinstance(event, Notice) and event.reset)


def reset_reason(notice: Notice) -> str:
    """A reset notice in words, for error messages."""
    where = f" from {notice.from_pool} to {notice.to_pool}" if notice.to_pool else ""
    detail = f": {notice.message}" if notice.message else ""
    return f"{notice.kind}{where}{detail}"


def _within(logprobs: list[TokenLogprob], chars: int) -> list[TokenLogprob]:
    """The log probabilities of the tokens in the answer's first ``chars`` characters."""
    kept, length = [], 0
    for entry in logprobs:
        length += len(entry.token)
        if length > chars:
            break
        kept.append(entry)
    return kept


def assemble_tool_calls(fragments: list[ToolCallDelta]) -> list[ToolCall]:
    """Tool calls from their streamed fragments: by ``index``, the first naming ``id`` and
    ``name``, the arguments text joined in order."""
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    parts: dict[int, list[str]] = {}
    for f in fragments:
        if f.id and not ids.get(f.index):
            ids[f.index] = f.id
        if f.name and not names.get(f.index):
            names[f.index] = f.name
        parts.setdefault(f.index, []).append(f.arguments)
    return [
        ToolCall(id=ids.get(i, ""), function=FunctionCall(name=names.get(i, ""),
                                                          arguments="".join(parts[i])))
        for i in sorted(parts)
    ]  # fmt: skip
