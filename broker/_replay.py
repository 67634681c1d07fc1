"""Reading a job's replies without a gap: live over core NATS, resumed from ``LLM_REPLIES``.

Replies are core NATS publishes: a client whose connection dropped (and came
back), or whose subscription overflowed (a slow consumer: nats-py drops what
does not fit), has lost some. ``LLM_REPLIES`` captured them all, so on a sign
of a gap ``ReplyReader`` resumes: it swaps the core subscription for an ordered
consumer from the first message on the job's reply subject, and leaves out
what it handed over before. The signs:

- a chunk whose ``seq`` skips (chunks are 0, 1, 2 ... within an attempt);
- a reconnect of the connection (``nc.stats["reconnects"]`` moved; checked
  at least every ``POLL_S`` while waiting, so a lost ``done`` is noticed too);
- a message the subscription dropped (a slow consumer: nats-py counts what it
  received, so received - taken - still queued is what it threw away).

Events are deduplicated by (attempt, seq) for chunks and by their bytes for the
rest, so each is handed over once, in order within its attempt. A ``done`` that
carries its attempt's last chunk (``Done.final``) is handed over as that chunk,
then the ``done``. On the
ordered consumer only a reconnect resumes again (it tracks its own sequence);
a chunk it lacks (aged out of the stream) is lost for good. A tenant may not
read ``LLM_REPLIES`` (``can_replay=False``): it reads live only. On a cluster a
resume right after a node died waits out the stream's leader election (it is
tried again until the job's deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import BadSubscriptionError, ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from nats.protocol.command import unsub_cmd

from broker._errors import BrokerUnavailable, DeadlineExceeded, RelayError
from broker._nats import nats_errors
from broker._protocol import Chunk, Event, decode_events
from broker._subjects import REPLIES_STREAM

# The longest wait without a look at the connection's reconnect count.
POLL_S = 0.25
# A resume whose request got no answer (a leader election) is tried again this often,
# within the job's deadline, or within RESUME_WITHIN_S when there is none.
RESUME_RETRY_S = 0.25
RESUME_WITHIN_S = 30.0


class ReplyReader:
    """The events of one reply subject, each once, resumed from ``LLM_REPLIES`` after a gap."""

    def __init__(
        self,
        nc: NATS,
        reply_to: str,
        sub: Subscription,
        *,
        what: str,
        can_replay: bool,
    ) -> None:
        self.nc, self.reply_to, self.what = nc, reply_to, what
        self._sub = sub
        self._taken = 0  # messages read from the core subscription
        self.can_replay = can_replay
        self.replaying = False  # reading the ordered consumer on LLM_REPLIES
        self.resumes = 0
        self._reconnects = nc.stats["reconnects"]
        self._seen: set[object] = set()
        self._next_seq: dict[int, int] = {}  # attempt -> the chunk seq due next
        # The rest of a message that holds two events (a done and its final chunk).
        self._queued: deque[tuple[Event, bytes]] = deque()

    async def next_event(
        self,
        deadline_s: float,
        counts: Callable[[Event], bool],
        wake_s: float | None = None,
        missing: Callable[[Event], bool] = lambda event: False,
    ) -> Event | None:
        """The next event not handed over before; ``counts``: would the fold take it
        (only such chunks' ``seq`` is checked); ``missing``: does the fold lack text this
        event continues (then, like a ``seq`` that skips, it is read again after the
        stream's copy of what came before). Raises ``DeadlineExceeded`` at ``deadline_s``;
        returns None at ``wake_s`` (wall clock) if no event came by then."""
        while True:
            got = await self._next_decoded(deadline_s, wake_s)
            if got is None:
                return None
            event, data = got
            key = _key(event, data)
            if key in self._seen:
                continue
            if self._before_it(event, counts, missing):
                await self.resume(deadline_s)  # what comes before it first, from the stream
                continue
            if isinstance(event, Chunk) and counts(event):
                self._next_seq[event.attempt] = event.seq + 1
            self._seen.add(key)
            return event

    async def _next_decoded(
        self, deadline_s: float, wake_s: float | None
    ) -> tuple[Event, bytes] | None:
        """The next event received (and its message's bytes); None at ``wake_s``."""
        if self._queued:
            return self._queued.popleft()
        while True:
            if self._gap_suspected():
                await self.resume(deadline_s)
            now = time.time()
            remaining_s = deadline_s - now
            if remaining_s <= 0:
                raise DeadlineExceeded(f"{self.what}: no answer before its deadline")
            msg = queued_message(self._sub)
            if msg is None and wake_s is not None and wake_s <= now:
                return None
            try:
                if msg is None:
                    wait_s = min(remaining_s, POLL_S, POLL_S if wake_s is None else wake_s - now)
                    with nats_errors(f"{self.what}: reading the answer"):
                        msg = await next_message(self._sub, wait_s)
            except RelayError as exc:
                if isinstance(exc.__cause__, NatsTimeout):
                    continue  # look at the connection (and the wake time), then wait on
                raise
            self._taken += 1
            first, *rest = decode_events(msg.data)
            self._queued.extend((event, msg.data) for event in rest)
            return first, msg.data

    def _before_it(
        self, event: Event, counts: Callable[[Event], bool], missing: Callable[[Event], bool]
    ) -> bool:
        """Whether events before ``event`` never arrived and the stream may have them."""
        if not self.can_replay or self.replaying:
            return False
        skips = isinstance(event, Chunk) and event.seq > self._next_seq.get(event.attempt, 0)
        return (skips and counts(event)) or missing(event)

    def _gap_suspected(self) -> bool:
        if not self.can_replay:
            return False
        if self.nc.stats["reconnects"] != self._reconnects:
            return True
        if self.replaying:
            return False
        return self._sub.delivered - self._taken - self._sub.pending_msgs > 0

    async def resume(self, deadline_s: float | None = None) -> None:
        """Read the reply subject from its first message in ``LLM_REPLIES``, then live.

        On a cluster the stream (or the JetStream API) may be electing a leader right
        after the node this connection was on died: a request that gets no answer is
        tried again until ``deadline_s`` (default: ``RESUME_WITHIN_S`` from now).
        """
        self._reconnects = self.nc.stats["reconnects"]
        self._queued.clear()  # read again from the stream
        await self.close()
        until_s = deadline_s if deadline_s is not None else time.time() + RESUME_WITHIN_S
        while True:
            try:
                self._sub = await self._replay_subscription()
                break
            except BrokerUnavailable as exc:
                unanswered = isinstance(exc.__cause__, NatsTimeout | NoRespondersError)
                if not unanswered or time.time() + RESUME_RETRY_S > until_s:
                    raise
            await anyio.sleep(RESUME_RETRY_S)
        self.replaying = True
        self.resumes += 1

    async def _replay_subscription(self) -> Subscription:
        with nats_errors(f"{self.what}: replaying its events"):
            sub: Subscription = await self.nc.jetstream().subscribe(
                self.reply_to,
                stream=REPLIES_STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
        return sub

    async def close(self) -> None:
        """Unsubscribe; safe twice."""
        if await unsubscribe_soon(self._sub):
            return
        try:
            with nats_errors(f"{self.what}: unsubscribing"):
                await self._sub.unsubscribe()
        except RelayError as exc:
            if not isinstance(exc.__cause__, BadSubscriptionError):  # already gone: fine
                raise


async def unsubscribe_soon(sub: Subscription) -> bool:
    """Unsubscribe a core subscription now on this side, its ``UNSUB`` sent with the
    connection's next write; False (nothing done) for any other subscription, or one
    already closed, or a connection not connected (``unsubscribe()`` then does it).

    nats-py's ``unsubscribe`` writes its ``UNSUB`` at once: one ``send()`` of its own
    per job for a client between jobs, a third of the gateway's writes to NATS, and on
    this VM a third of its CPU is socket writes (bench/RESULTS.md, issue 16). Here the
    subscription stops taking messages at once (nats-py drops what comes for an
    unknown sid), and the command waits in nats-py's pending buffer for the next
    publish or subscribe, or at most ``UNSUB_FLUSH_S``.
    """
    conn = sub._conn
    if type(sub) is not Subscription or sub._closed or not conn.is_connected:
        return False
    sub._closed = True
    sub._stop_processing()
    conn._remove_sub(sub._id)
    await conn._send_command(unsub_cmd(sub._id, 0))
    loop = asyncio.get_running_loop()
    if conn not in _flush_due:
        _flush_due[conn] = loop.call_later(UNSUB_FLUSH_S, _flush_later, conn)
    return True


def _flush_later(conn: NATS) -> None:
    _flush_due.pop(conn, None)
    if conn.is_connected:
        # A task of its own: nats-py's flush is a coroutine (it signals its flusher).
        _flushes.add(task := asyncio.ensure_future(conn._flush_pending()))
        task.add_done_callback(_flushes.discard)


# At most one timer per connection for the UNSUBs it holds back; the flush tasks they
# start, kept from the garbage collector until done.
UNSUB_FLUSH_S = 0.05
_flush_due: weakref.WeakKeyDictionary[NATS, asyncio.TimerHandle] = weakref.WeakKeyDictionary()
_flushes: set[asyncio.Future[Any]] = set()


def queued_message(sub: Subscription) -> Msg | None:
    """A message ``sub`` already holds, taken at once; None when it holds none.

    nats-py's ``next_msg`` makes a task, a ``uuid4`` and a ``wait_for`` for every
    message, even one already queued: taking queued ones here halved a busy
    client's CPU per request (bench/RESULTS.md, issue 16). This takes a queued
    one the way ``next_msg`` does (its pending-bytes count and ``task_done``
    included), from nats-py 2.x's queue of a
    core subscription; for any other (a replay's JetStream subscription, whose
    ``next_msg`` also answers flow control), or should that queue ever be gone, it
    returns None and ``next_msg`` does the work.
    """
    if type(sub) is not Subscription:  # a JetStream one answers flow control in next_msg
        return None
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or queue.empty():
        return None
    msg: Msg = queue.get_nowait()
    sub._pending_size -= len(msg.data)
    queue.task_done()
    return msg


async def next_message(sub: Subscription, timeout_s: float) -> Msg:
    """The next message of ``sub``, waited for at most ``timeout_s``: ``next_msg``'s
    result and errors, without its two tasks, ``uuid4`` and ``wait_for`` per call.

    A reader of a long stream waits once per chunk (the chunks come apart), so these
    were a reader's largest cost per chunk (bench/RESULTS.md, issue 16). The wait is on
    the core subscription's own queue, as ``queued_message`` takes from it; for any
    other subscription, ``next_msg``. nats-py cancels the waits of ``next_msg`` when
    its connection closes; this one sees the close at its timeout (callers wait at most
    ``POLL_S``), and raises ``ConnectionClosedError`` as ``next_msg`` does.
    """
    queue = getattr(sub, "_pending_queue", None)
    if type(sub) is not Subscription or not isinstance(queue, asyncio.Queue):
        msg: Msg = await sub.next_msg(timeout=timeout_s)
        return msg
    if sub._conn.is_closed:
        raise ConnectionClosedError
    try:
        async with asyncio.timeout(timeout_s):
            msg = await queue.get()
    except TimeoutError:
        raise ConnectionClosedError if sub._conn.is_closed else NatsTimeout from None
    sub._pending_size -= len(msg.data)
    queue.task_done()
    return msg


async def stored_events(nc: NATS, reply_to: str, *, timeout_s: float) -> list[Event]:
    """Every event ``LLM_REPLIES`` holds for ``reply_to``, in order (a worker reading what a
    lost attempt sent its caller). Raises ``RelayError`` if they cannot be read in time."""
    what = f"the stored replies on {reply_to}"
    js = nc.jetstream()
    with nats_errors(what):
        try:
            await js.get_last_msg(REPLIES_STREAM, reply_to)
        except NotFoundError:
            return []  # nothing was ever sent
        sub = await js.subscribe(
            reply_to, stream=REPLIES_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
    events: list[Event] = []
    try:
        with nats_errors(what):
            while True:
                msg = await sub.next_msg(timeout=timeout_s)
                with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                    events.extend(decode_events(msg.data))
                if msg.metadata.num_pending == 0:
                    return events
    finally:
        with nats_errors(f"{what}: unsubscribing"):
            await sub.unsubscribe()


def _key(event: Event, data: bytes) -> object:
    """What makes two copies of one event the same event."""
    if isinstance(event, Chunk):
        return ("chunk", event.attempt, event.seq)
    return data
