"""One delivery of a job message to this worker: which job it is, whether the worker
still holds it, and the ways it ends (ack, nak, re-queue).

**Trust.** A job's routing state is the workers'. On a subject clients publish
to (``llm.jobs.<route>``, ``llm.pool.<pool>``) a job's ``attempts``, ``rank``
and ``resume`` (the answer so far) are dropped and the subject decides its
route, or the pool it is pinned to (``trusted``); only a re-queue, on
``llm.requeue.<pool>`` (workers only, nats.conf), keeps them, and names its job
and attempt base in the ``Llmrelay-Job-Seq`` and ``Llmrelay-Attempt-Base`` headers.

**Tenant.** A job on ``llm.jobs.<route>.<tenant>`` (or ``llm.pool.<pool>.<tenant>``)
is that tenant's: it may be answered only on ``llm.reply.<tenant>.<id>``, and a
job without a tenant only on ``llm.reply.<id>`` (``may_answer``). A re-queue
keeps its job as it is: its reply subject was checked when a client's job arrived.

**Identity.** ``job_seq`` is the job's stream sequence as its client published
it, ``attempt`` this delivery's id (``broker/_fold.py``): the events of the run
carry both, so no other job and no superseded attempt counts for the client.

**Lease.** A delivery is this worker's while its ack deadline holds: the
worker's housekeeping extends it with in-progress acks (``touch``). Once the
last one is older than ``LEASE_SHARE`` of ``ack_wait_s`` (the worker was
stopped, starved or cut off from NATS) the job may be with a redelivery
already: ``hold`` raises ``LeaseLost`` before the run publishes, acks, naks or
re-queues anything, and the lease is never extended again.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker._errors import BrokerUnavailable, LeaseLost, RelayError
from broker._fold import attempt_id, requeue_base
from broker._nats import nats_errors
from broker._protocol import Job, encode
from broker._subjects import (
    ATTEMPT_BASE_HEADER,
    JOB_SEQ_HEADER,
    arrival,
    requeue_subject,
    tenant_of,
)
from broker._validate import reply_allowed

# A delivery is held while its last in-progress ack is younger than this share of
# ack_wait_s; the rest is margin for the server's clock and the ack's way there.
LEASE_SHARE = 0.8


class Delivery:
    """A pulled job message: identity, lease, settlement."""

    def __init__(self, msg: Msg, ack_wait_s: float) -> None:
        self.msg = msg
        self.ack_wait_s = ack_wait_s
        self.deliveries = int(msg.metadata.num_delivered)
        self.job_seq, base = _identity(msg)
        self.attempt = attempt_id(base, self.deliveries)
        self.last_progress = time.monotonic()  # the delivery, then each in-progress ack
        self.lost = False
        self._requeue_id = uuid.uuid4().hex[:16]  # a re-queue id nobody can take first
        self.tenant = tenant_of(msg.subject)  # None: no tenant, or a re-queue

    # --- lease -------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        age_s = time.monotonic() - self.last_progress
        return not self.lost and age_s < self.ack_wait_s * LEASE_SHARE

    def hold(self) -> None:
        """Raise ``LeaseLost`` once the ack deadline may have passed: the job is not ours."""
        if not self.held:
            self.lost = True
            raise LeaseLost(
                f"attempt {self.attempt}: no in-progress ack for "
                f"{time.monotonic() - self.last_progress:.1f}s (ack_wait_s "
                f"{self.ack_wait_s:g}); the job was delivered again"
            )

    async def touch(self) -> bool:
        """Extend the ack deadline; False (and never again) once the lease had lapsed."""
        if not self.held:
            self.lost = True
            return False
        self.last_progress = time.monotonic()
        await self.msg.in_progress()
        return True

    # --- settlement ----------------------------------------------------------------------

    async def ack(self) -> None:
        self.hold()
        await self.msg.ack()

    async def nak(self, delay_s: float | None = None) -> None:
        self.hold()
        await self.msg.nak(delay=delay_s)

    def may_answer(self, reply_to: object) -> bool:
        """Whether this delivery's job may be answered on ``reply_to`` (its tenant's)."""
        return reply_allowed(self.msg.subject, reply_to)

    def trusted(self, job: Job) -> Job:
        """The job as the workers see it: a client cannot write routing state."""
        kind, name = arrival(self.msg.subject)
        if kind == "requeue":
            return job
        if kind == "route":
            return msgspec.structs.replace(
                job, route=name, pool=None, attempts=[], rank=0, resume=None
            )
        if kind == "pool":
            return msgspec.structs.replace(job, pool=name, attempts=[], rank=0, resume=None)
        return msgspec.structs.replace(job, attempts=[], rank=0, resume=None)

    async def requeue(
        self, js: JetStreamContext, pool: str, moved: Job, remaining_s: float
    ) -> None:
        """Store ``moved`` on ``llm.requeue.<pool>``, exactly once, or raise ``RelayError``.

        The ``Nats-Msg-Id`` names this delivery plus a random part, so no client
        can take it first (the duplicate window is the whole stream's). A publish
        whose PubAck timed out is sent once more under the same id: a duplicate
        then means the first one was stored. A duplicate on the first try means
        the id was taken: raise, so that the job is handed back, never acked unstored.
        """
        self.hold()
        ttl_s = max(1, math.ceil(remaining_s) + 1)
        msg_id = f"{moved.id}.rq.{self.job_seq}.{self.attempt}.{self._requeue_id}"
        headers = {
            "Nats-Msg-Id": msg_id,
            "Nats-TTL": f"{ttl_s}s",
            JOB_SEQ_HEADER: str(self.job_seq),
            ATTEMPT_BASE_HEADER: str(requeue_base(self.attempt)),
        }
        subject, data = requeue_subject(pool), encode(moved)
        for first in (True, False):
            try:
                with nats_errors(f"re-queue to {subject}"):
                    ack = await js.publish(subject, data, headers=headers, timeout=5.0)
            except BrokerUnavailable:
                if first:
                    continue  # no PubAck: it may be stored; the same id again is safe
                raise
            if ack.duplicate and first:
                raise RelayError(f"re-queue id {msg_id} was already taken")
            return


def _identity(msg: Msg) -> tuple[int, int]:
    return stored_identity(msg.subject, msg.headers, int(msg.metadata.sequence.stream))


def stored_identity(subject: str, headers: Mapping[str, str] | None, seq: int) -> tuple[int, int]:
    """(job_seq, attempt base) of a job message: a re-queue's from its worker's
    headers, else its own stream sequence and base 0."""
    if arrival(subject)[0] != "requeue":
        return seq, 0
    try:
        return int((headers or {})[JOB_SEQ_HEADER]), int((headers or {})[ATTEMPT_BASE_HEADER])
    except (KeyError, ValueError):
        return seq, 0
