"""Raw ``batch=1`` pulls on one priority-group consumer (NATS-NOTES.md).

Each outstanding pull stands for one free slot of the worker: a waiting
priority-0 pull is what makes JetStream hand a route job to this pool rather
than to a backup. The worker decides how many pulls each consumer gets; this
class only issues them, counts them, and reports what each pull ended with: a
job, or a status (408 expired, 409 and the like) meaning the slot is free again.

A pull the server forgot (reconnect, consumer re-created) would leak a slot, so
pulls older than their expiry plus a grace period are written off. When a
consumer's leader changes (or the consumer is deleted), the old leader drops
every pull waiting there but answers only one 409 per reply subject: all of a
puller's pulls share one inbox, so that one 409 frees them all.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from broker._jsapi import next_subject, pull_request_body
from broker._subjects import JOBS_STREAM, PRIORITY_GROUP

OnJob = Callable[[Msg, "Puller"], None]
OnIdle = Callable[["Puller"], None]

_GRACE_S = 2.0
# 409 descriptions that end every pull waiting on the consumer, not only one.
_ALL_PULLS_ENDED = frozenset({"Leadership Change", "Consumer Deleted"})


class Puller:
    """Outstanding pulls on one consumer at one priority."""

    def __init__(
        self,
        nc: NATS,
        *,
        consumer: str,
        route: str | None,
        rank: int,
        priority: int,
        min_pending: int | None = None,
        expires_s: float = 10.0,
    ) -> None:
        self.nc = nc
        self.consumer = consumer
        self.route = route  # None for the pool's own subject
        self.rank = rank
        self.priority = priority
        self.min_pending = min_pending
        self.expires_s = expires_s
        self._issued: deque[float] = deque()
        self.last_pull_at = 0.0
        self._sub: Subscription | None = None
        self._inbox = ""
        self._subject = next_subject(JOBS_STREAM, consumer)
        self._on_job: OnJob | None = None
        self._on_idle: OnIdle | None = None

    @property
    def outstanding(self) -> int:
        return len(self._issued)

    @property
    def is_route(self) -> bool:
        return self.route is not None

    async def start(self, on_job: OnJob, on_idle: OnIdle) -> None:
        self._on_job, self._on_idle = on_job, on_idle
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()
        self._issued.clear()

    async def pull(
        self, n: int = 1, *, min_pending: int | None = None, expires_s: float | None = None
    ) -> None:
        body = pull_request_body(
            group=PRIORITY_GROUP,
            priority=self.priority,
            expires_s=expires_s or self.expires_s,
            min_pending=min_pending if min_pending is not None else self.min_pending,
        )
        self.last_pull_at = time.monotonic()
        for _ in range(n):
            self._issued.append(self.last_pull_at)
            await self.nc.publish(self._subject, body, reply=self._inbox)

    def forget_all(self) -> int:
        """The connection was lost: the server dropped every pull we had waiting."""
        n = len(self._issued)
        self._issued.clear()
        return n

    def write_off_stale(self) -> int:
        """Forget pulls the server should have ended by now; return how many."""
        horizon = time.monotonic() - self.expires_s - _GRACE_S
        n = 0
        while self._issued and self._issued[0] < horizon:
            self._issued.popleft()
            n += 1
        return n

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100":  # idle heartbeat: the pull is still waiting
            return
        if status == "409" and (msg.headers or {}).get(Header.DESCRIPTION) in _ALL_PULLS_ENDED:
            self._issued.clear()
        elif self._issued:
            self._issued.popleft()
        if status is not None or not msg.reply:
            assert self._on_idle is not None
            self._on_idle(self)
            return
        assert self._on_job is not None
        self._on_job(msg, self)
