"""The gateway's reset policy: what a client may see of a job whose attempts restart.

When a provider breaks mid-answer the worker re-queues the job with the text so
far, and the next attempt continues it (``notice{resume: true, offset}``): the
stream goes on as if nothing happened. Only a route with ``midstream: restart``
sends ``notice{reset: true}``: the text of that attempt is void, and another
attempt starts over. ``broker._fold.Fold`` decides which events count; text
already sent over HTTP cannot be taken back, so ``ReplyFold`` adds the policy:

- Text is forwarded as soon as it arrives (``gateway.stream_holdback_ms: 0``,
  the default), so the gateway adds no time to the first token.
- A resume at the end of the text sent (the normal continuation) changes
  nothing the client sees; one that keeps less than was sent (a redelivery
  after a worker died mid-answer) is a reset of the text past it.
- A reset before any text was sent changes nothing the client sees: the next
  attempt streams as if it were the first.
- A reset after text was sent raises ``StreamReset``: the stream ends with an
  SSE error event (``code: stream_interrupted``, never ``[DONE]``) and the job,
  whose new attempt nobody would read, is cancelled. The client sees the same
  thing as when a provider's own stream breaks, never a mix of two attempts.
- Reasoning text is sent as it arrives (never held back); once some was sent, a
  reset raises ``StreamReset`` as one after sent text does, so a caller never
  reads two attempts' reasoning. Log probabilities go with the text they belong to.
- With ``stream_holdback_ms: N`` the first text of a stream is held until it is
  N ms old (or the answer is done), so a provider that fails within N ms of its
  first token is replaced invisibly, at the cost of up to N ms added to the
  time to first token. A non-streamed answer is held whole (``math.inf``), so
  its failover is always invisible.
"""

from __future__ import annotations

from broker._errors import StreamReset
from broker._fold import Fold
from broker._protocol import Chunk, Notice, TokenLogprob


class ReplyFold(Fold):
    """Folds a job's events into the text an OpenAI client may see.

    ``chunk()`` returns the text to send now ("" while it is held back);
    ``finish()`` returns what is still held when the answer is done. A reset
    (``notice{reset}``, or a chunk of a newer attempt) drops held text silently
    and raises ``StreamReset`` if text of the voided attempt was already sent.
    ``holdback_s``: how long the first text is held (``math.inf``: until done).
    Events of a superseded attempt or of another job never count (``Fold``): a
    late ``done`` of an older attempt does not end the answer.
    """

    def __init__(self, holdback_s: float = 0.0, job_seq: int | None = None) -> None:
        super().__init__(job_seq)
        self.holdback_s = holdback_s
        self.sent_chars = 0
        self.resets = 0
        self.reasoning_sent = False  # then a void raises StreamReset, as after sent text
        self._held: list[str] = []
        self._held_since: float | None = None
        self._now = 0.0
        self._reasoning_taken = 0
        self._logprobs_taken = 0

    def take_reasoning(self) -> str:
        """The reasoning that arrived since the last call (it is never held back)."""
        new = self.reasoning_parts[self._reasoning_taken :]
        self._reasoning_taken = len(self.reasoning_parts)
        return "".join(new)

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log probabilities that arrived since the last call (sent with the text)."""
        new = self.logprobs[self._logprobs_taken :]
        self._logprobs_taken = len(self.logprobs)
        return new

    def chunk(self, chunk: Chunk, now: float) -> str:
        self._now = now
        return self.add(chunk)

    def notice(self, notice: Notice) -> None:
        self.add(notice)

    def flush(self, now: float) -> str:
        """The held text, if it has been held long enough; else ""."""
        due = self.due_at()
        return self._release() if due is not None and now >= due else ""

    def finish(self) -> str:
        return self._release()

    def due_at(self) -> float | None:
        """When the held text must be sent (None: nothing is held)."""
        if self._held_since is None:
            return None
        return self._held_since + self.holdback_s

    def _text(self, delta: str) -> str:
        if self.sent_chars:
            self.sent_chars += len(delta)
            return delta
        self._held.append(delta)
        if self._held_since is None:
            self._held_since = self._now
        return self.flush(self._now)

    def _keep(self, chars: int, reason: str) -> None:
        if chars < self.sent_chars:
            raise StreamReset(
                f"the answer was continued from character {chars} ({reason}) after "
                f"{self.sent_chars} characters had been sent; the request was cancelled: retry it"
            )
        held = "".join(self._held)[: chars - self.sent_chars]
        self._held = [held] if held else []
        if not held:
            self._held_since = None

    def _void(self, attempt: int, reason: str) -> None:
        if self.sent_chars:
            raise StreamReset(
                f"the answer was restarted ({reason}) after {self.sent_chars} characters "
                "had been sent; they are void and the request was cancelled: retry it"
            )
        if self.reasoning_sent:
            raise StreamReset(
                f"the answer was restarted ({reason}) after its reasoning had been sent; "
                "it is void and the request was cancelled: retry it"
            )
        self._reasoning_taken = self._logprobs_taken = 0
        if self._held:
            self.resets += 1
        self._held.clear()
        self._held_since = None
        super()._void(attempt, reason)

    def _release(self) -> str:
        text = "".join(self._held)
        self._held.clear()
        self._held_since = None
        self.sent_chars += len(text)
        return text
