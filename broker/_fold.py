"""The reset fold: the one rule for which of a job's events count.

A job may be delivered to a provider more than once (retry, failover, a worker
that died), and every delivery has its own ``attempt`` number. Events of two
attempts can interleave (a backup may stream before the failing worker's
notice arrives), so only ``attempt`` orders them:

- a chunk of an older attempt than the newest seen is stale and ignored;
- a chunk of a newer attempt, or ``notice{reset: true}`` of the current or a
  newer attempt, voids the text of the attempt before it;
- ``done`` and ``error`` end the answer.

``Fold`` applies the rule and hands text to ``_text`` and voids to ``_void``.
``Answer`` (the client library, the CLI) keeps the current attempt's text;
the gateway's fold also knows what it already sent over HTTP and holds text back.
"""

from __future__ import annotations

from broker._protocol import Chunk, Done, Error, Event, Notice


class Fold:
    """Apply the attempt-ordering rule to a job's events, one at a time."""

    def __init__(self) -> None:
        self.attempt = 0
        self.done: Done | None = None
        self.error: Error | None = None

    def add(self, event: Event) -> str:
        """Fold one event in; return the text it adds to the answer ("" for none)."""
        match event:
            case Chunk(attempt=attempt) if attempt < self.attempt:
                return ""  # a straggler of an attempt that was already voided
            case Chunk(attempt=attempt, delta=delta):
                if attempt > self.attempt:
                    self._void(attempt, f"attempt {attempt} started over")
                return self._text(delta)
            case Notice(reset=True, attempt=attempt) if attempt >= self.attempt:
                self._void(attempt, reset_reason(event))
            case Done():
                self.done = event
            case Error():
                self.error = event
        return ""

    @property
    def finished(self) -> bool:
        return self.done is not None or self.error is not None

    def _text(self, delta: str) -> str:
        return delta

    def _void(self, attempt: int, reason: str) -> None:
        self.attempt = attempt


class Answer(Fold):
    """Folds events into one clean answer: the text of the newest attempt."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[str] = []
        self.resets = 0

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _text(self, delta: str) -> str:
        self._parts.append(delta)
        return delta

    def _void(self, attempt: int, reason: str) -> None:
        if self._parts:
            self.resets += 1
        self._parts.clear()
        super()._void(attempt, reason)


def reset_reason(notice: Notice) -> str:
    """A reset notice in words, for error messages."""
    where = f" from {notice.from_pool} to {notice.to_pool}" if notice.to_pool else ""
    detail = f": {notice.message}" if notice.message else ""
    return f"{notice.kind}{where}{detail}"
