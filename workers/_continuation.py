"""How an attempt's text joins the answer its caller already has (a mid-stream failover).

A job re-queued after its caller had text carries that text (``Job.resume``,
workers' routing state). The next attempt continues the answer instead of
restarting it:

- **prefill**: the provider gets the text as the last assistant message and
  writes what follows (``Provider.stream(..., prefill=text)``); every delta is
  published as it arrives.
- **restart, spliced**: a pool with ``prefill: false``, a structured answer
  (``response_format``: its grammar starts at the beginning), or a model that refused
  the prefill (a 400 to the prefilled request: it is asked again at once
  without one, and this worker stops sending that model prefills), writes the
  answer from the start. Its text is held until it is as long as what the
  caller has, and spliced on only if it begins with exactly that text; the
  caller then gets the rest. Anything else is ``CannotContinue``: the caller
  gets a clean error, never a garbled or repeated answer.

The continuing attempt's first event is ``notice{kind: resumed, resume: true,
offset: len(text)}``, so that every fold keeps the caller's text
(``broker/_fold.py``); its chunks then carry only what is new.

A job delivered again after its worker was lost mid-answer (killed, stalled
past its lease, or stopped before it could finish) carries no text, but its
caller has some: ``lost_answer`` reads it back from ``LLM_REPLIES`` (every
event a worker published), folded as the caller folds it, and the redelivery
continues from there (``notice{redelivered, resume: true, offset}``). If the
lost attempt had ended the answer (only its ack was lost), nothing is called
again.
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.client import Client as NATS

from broker._config import PoolConfig
from broker._errors import CannotContinue, ProviderError, RelayError, UpstreamRejected
from broker._fold import Answer
from broker._protocol import Job, Notice, Resume
from broker._replay import stored_events

log = logging.getLogger("llmrelay.worker")

# How long a redelivery may spend reading back what a lost attempt sent.
RECOVER_TIMEOUT_S = 2.0

# Models a worker remembers as refusing prefills (a pinned job may name any model).
MAX_REMEMBERED_REFUSALS = 256


class Splice:
    """A restarted answer, held until it is known to begin with ``have``; then its rest."""

    def __init__(self, have: str) -> None:
        self._have: str | None = have
        self._held = ""

    def feed(self, delta: str) -> str:
        if self._have is None:
            return delta
        self._held += delta
        have, held = self._have, self._held
        if not (held.startswith(have) or have.startswith(held)):
            raise CannotContinue(
                f"the answer broke after {len(have)} characters, and the restarted "
                "answer does not begin with them: it cannot be continued"
            )
        if len(held) < len(have):
            return ""
        self._have, self._held = None, ""
        return held[len(have) :]

    def finish(self) -> None:
        if self._have is not None:
            raise CannotContinue(
                f"the answer broke after {len(self._have)} characters, and the restarted "
                f"answer ended after {len(self._held)}: it cannot be continued"
            )


class Continuation:
    """One attempt's place in its answer: the caller's text before it, and what it adds."""

    def __init__(self, job: Job, pool: PoolConfig, model: str, refused: set[str]) -> None:
        resume = job.resume
        self.have = resume.text if resume is not None else ""
        self.prior_tokens = resume.completion_tokens if resume is not None else 0
        # A structured answer is never prefilled: a JSON grammar (or Anthropic's forced
        # answer tool) starts at the answer's beginning, not after the caller's text.
        structured = job.response_format is not None and job.response_format.type != "text"
        self.prefill = bool(self.have) and pool.prefill and model not in refused and not structured
        self._splice = Splice(self.have) if self.have and not self.prefill else None
        self._sent: list[str] = []
        self.sent_tokens = 0  # the provider events of the text published, each ~a token
        self._announced = not self.have  # nothing to announce for a fresh answer
        self._model = model
        self._refused = refused
        self._refusal_pending = False  # a prefill was refused; remember once the restart works

    @property
    def active(self) -> bool:
        """This attempt continues text the caller already has."""
        return bool(self.have)

    @property
    def text(self) -> str:
        """The whole answer so far: the caller's text before this attempt, then its own."""
        return self.have + "".join(self._sent)

    @property
    def sent_chars(self) -> int:
        return sum(len(part) for part in self._sent)

    def request(self, job: Job) -> tuple[Job, str | None]:
        """What to ask the provider: the job, and the prefill to continue (None: none).

        A prefilled call writes only the rest of the answer, so its ``max_tokens``
        is what the earlier attempts left of the caller's (a restart writes the
        whole answer again, within the caller's own limit)."""
        if not self.prefill:
            return job, None
        if job.max_tokens is not None:
            left = max(1, job.max_tokens - self.prior_tokens)
            job = msgspec.structs.replace(job, max_tokens=left)
        return job, self.have

    def prefill_refused(self, err: ProviderError, chunks_sent: int) -> bool:
        """Was ``err`` the provider refusing the prefill? Then restart without one."""
        if not self.prefill or chunks_sent or type(err) is not UpstreamRejected:
            return False
        self.prefill = False
        self._splice = Splice(self.have)
        self._refusal_pending = True
        return True

    def feed(self, delta: str, tokens: int = 1) -> str:
        """The part of ``delta`` to publish ("" while a restart is held); raises
        ``CannotContinue`` when a restart does not begin with the caller's text.
        ``tokens``: the provider events the delta joins (``TextDelta.tokens``)."""
        if self._splice is not None:
            delta = self._splice.feed(delta)
        if self._refusal_pending:
            self._refusal_pending = False
            if len(self._refused) < MAX_REMEMBERED_REFUSALS:
                self._refused.add(self._model)  # the restart works: no prefill for it again
        if delta:
            self._sent.append(delta)
            self.sent_tokens += tokens
        return delta

    def finish(self) -> None:
        if self._splice is not None:
            self._splice.finish()

    def announcement(self, attempt: int, pool: str) -> Notice | None:
        """The ``resumed`` notice, once, before this attempt's first event of the answer."""
        if self._announced:
            return None
        self._announced = True
        how = "prefill" if self.prefill else "restart, spliced"
        return Notice(
            kind="resumed",
            attempt=attempt,
            to_pool=pool,
            resume=True,
            offset=len(self.have),
            message=f"continuing after {len(self.have)} characters ({how})",
        )

    def redelivered(self, attempt: int) -> Notice:
        """The notice of a delivery after one that was lost (a worker died or stalled)."""
        if self.active:  # the text the job carries stands; the lost attempt's own is void
            offset = len(self.have)
            return Notice(kind="redelivered", attempt=attempt, resume=True, offset=offset,
                          message=f"the job was delivered again; text after {offset} "
                          "characters is void")  # fmt: skip
        return Notice(
            kind="redelivered",
            attempt=attempt,
            reset=True,
            message="the job was delivered again; earlier text is void",
        )

    def carried(self) -> Resume:
        """What the next attempt continues: all the text so far, and what it cost."""
        return Resume(text=self.text, completion_tokens=self.prior_tokens + self.sent_tokens)


async def lost_answer(nc: NATS, job: Job, job_seq: int) -> Answer | None:
    """What the caller already has of ``job`` from deliveries that were lost: its
    replies in ``LLM_REPLIES``, folded as the caller folds them (only this job's
    events count). None when they cannot be read: the redelivery then starts over."""
    try:
        events = await stored_events(nc, job.reply_to, timeout_s=RECOVER_TIMEOUT_S)
    except RelayError as exc:
        log.warning("job %s: could not read back its replies (%s); starting over", job.id, exc)
        return None
    answer = Answer(job_seq)
    for event in events:
        answer.add(event)
    if answer.lost_events:  # the stored replies have a hole: what the caller has is unknown
        log.warning("job %s: its stored replies are incomplete; starting over", job.id)
        return None
    return answer


def resumed_job(job: Job, answer: Answer) -> Job:
    """``job`` carrying the text its caller has (a redelivery's); tokens estimated."""
    resume = Resume(text=answer.text, completion_tokens=max(1, len(answer.text) // 4))
    return msgspec.structs.replace(job, resume=resume)
