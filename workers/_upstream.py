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

import time
from collections.abc import AsyncIterator

import anyio

from broker._config import Timeouts
from broker._errors import DeadlineExceeded, ProviderTimeout, StreamInterrupted
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
    """The items of one provider call, each within its time limit."""

    def __init__(self, http: HttpShards, timeouts: Timeouts, deadline_s: float) -> None:
        self._http = http
        self._timeouts = timeouts
        self._deadline_s = deadline_s  # Unix time
        self._items: AsyncIterator[StreamItem] | None = None
        self._shard: int | None = None
        self.texts = 0  # text items seen: the first one ends the time-to-first-token wait

    def open(self, job: Job, prefill: str | None, *, model: str) -> None:
        self._shard, provider = self._http.acquire()
        self._items = provider.stream(job, model, prefill=prefill).__aiter__()

    async def next(self) -> StreamItem:
        """The next item, within the time-to-first-token or idle limit and the deadline."""
        assert self._items is not None
        limit = self._timeouts.ttft_s if not self.texts else self._timeouts.idle_s
        remaining = self._deadline_s - time.time()
        with anyio.move_on_after(min(limit, remaining)) as scope:
            try:
                return await self._items.__anext__()
            except StopAsyncIteration:
                raise StreamInterrupted("the provider's stream ended without a finish") from None
        assert scope.cancelled_caught
        if remaining <= limit:
            raise DeadlineExceeded("the job's deadline passed mid-answer")
        if not self.texts:
            raise ProviderTimeout(f"no first token within {limit:g}s")
        raise StreamInterrupted(f"the stream stalled for {limit:g}s mid-answer")

    async def close(self) -> None:
        """Close the provider's stream and free the shard (safe to call twice)."""
        items, self._items = self._items, None
        if items is not None:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        if self._shard is not None:
            self._http.release(self._shard)
            self._shard = None
