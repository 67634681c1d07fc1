"""One call to the provider for one job, under the pool's time limits, and a run's cancel switch.

``UpstreamCall`` takes an HTTP shard, opens the adapter's stream and hands out
its items one at a time (``next``), each within the time-to-first-token limit
(before the first text) or the stream-idle limit (after it), and within the
job's deadline. ``close`` aborts the call (failover, cancel) or, after its
``Finish``, lets the adapter drain the last bytes so the connection is reused;
it always gives the shard back.

``RunCancel`` is how the worker cancels a run (a client's cancel, shutdown, a
lapsed lease): it cancels the step in progress and every later one before it
starts, since a run may call upstream more than once (an in-place retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from broker._config import Timeouts
from broker._errors import DeadlineExceeded, ProviderTimeout, RelayError, StreamInterrupted
from broker._protocol import Job
from workers._http import HttpShards
from workers.providers._base import StreamItem


class RunCancel:
    """A run's cancel switch: it cancels the upstream call in progress, and every later
    step of the run (an in-place retry, its wait) before it starts."""

    def __init__(self) -> None:
        self.requested = False
        self._scope: anyio.CancelScope | None = None

    def cancel(self) -> None:
        self.requested = True
        if self._scope is not None:
            self._scope.cancel()

    def scope(self) -> anyio.CancelScope:
        """A fresh scope for one step, already cancelled if the run was."""
        self._scope = anyio.CancelScope()
        if self.requested:
            self._scope.cancel()
        return self._scope


class UpstreamCall:
    """The items of one provider call, each within its time limit.

    The limits are kept by one timer per call, not one per item: ``next`` notes when
    it started to wait, and the timer, when it fires, either finds the wait still
    within its limit (and is set again for when it would not be) or cancels the
    waiting task itself, which ``next`` turns into the limit's error. A cancel
    scope per item (``anyio.move_on_after``) was 15 % of a worker's CPU with 1,000
    long streams (bench/RESULTS.md, issue 16).
    """

    def __init__(self, http: HttpShards, timeouts: Timeouts, deadline_s: float) -> None:
        self._http = http
        self._timeouts = timeouts
        self._deadline_s = deadline_s  # Unix time
        self._items: AsyncIterator[StreamItem] | None = None
        self._shard: int | None = None
        self.texts = 0  # text items seen: the first one ends the time-to-first-token wait
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed_first = False  # whether the timer keeps the idle limit (else the TTFT one)
        self._waiting_since: float | None = None  # loop time; None while not waiting
        self._expired: RelayError | None = None  # the limit that ended the wait

    def open(self, job: Job, prefill: str | None, *, model: str) -> None:
        self._shard, provider = self._http.acquire()
        self._items = provider.stream(job, model, prefill=prefill).__aiter__()

    async def next(self) -> StreamItem:
        """The next item, within the time-to-first-token or idle limit and the deadline."""
        assert self._items is not None
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._waiting_since = loop.time()
        if self._timer is None or self._timed_first != bool(self.texts):
            self._arm(loop, self._waiting_since)
        try:
            return await self._items.__anext__()
        except StopAsyncIteration:
            raise StreamInterrupted("the provider's stream ended without a finish") from None
        except asyncio.CancelledError:
            expired, self._expired = self._expired, None
            if expired is None or self._task is None:
                raise
            self._task.uncancel()  # our own cancel, not the run's
            raise expired from None
        finally:
            self._waiting_since = None

    def _limit_s(self) -> float:
        return self._timeouts.idle_s if self.texts else self._timeouts.ttft_s

    def _due(self, loop: asyncio.AbstractEventLoop, since: float) -> float:
        """Loop time at which a wait begun at ``since`` runs out (its limit, or the deadline)."""
        deadline = loop.time() + self._deadline_s - time.time()
        return min(since + self._limit_s(), deadline)

    def _arm(self, loop: asyncio.AbstractEventLoop, since: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timed_first = bool(self.texts)
        self._timer = loop.call_at(self._due(loop, since), self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        since = self._waiting_since
        if since is None or loop.time() < self._due(loop, since) or self._task is None:
            self._arm(loop, loop.time() if since is None else since)  # not waiting, or not yet
            return
        limit = self._limit_s()
        if time.time() >= self._deadline_s - 0.001:
            self._expired = DeadlineExceeded("the job's deadline passed mid-answer")
        elif not self.texts:
            self._expired = ProviderTimeout(f"no first token within {limit:g}s")
        else:
            self._expired = StreamInterrupted(f"the stream stalled for {limit:g}s mid-answer")
        self._task.cancel()

    async def close(self) -> None:
        """Close the provider's stream and free the shard (safe to call twice)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, None
        if items is not None:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        if self._shard is not None:
            self._http.release(self._shard)
            self._shard = None
