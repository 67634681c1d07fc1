"""RelayClient: submit jobs and read their streamed answers.

    async with RelayClient("nats://client:client-secret@127.0.0.1:4222") as relay:
        handle = await relay.submit("Hello", route="chat")
        async for event in handle.events():   # Chunk | Notice | Done | Error
            ...
        # or: text = await handle.text()

``submit`` subscribes to the job's reply subject before publishing, so no event
is missed, and publishes with ``Nats-Msg-Id`` = request id, so a retried submit
never creates a second job. A full queue raises ``QueueFull`` at once.

``text()`` returns one clean answer: when a worker restarts a job elsewhere
(``Notice(reset=True)``, or chunks of a newer attempt) the partial text of the
abandoned attempt is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType

import nats
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from broker._config import Config
from broker._errors import (
    ConnectFailed,
    DeadlineExceeded,
    PayloadTooLarge,
    QueueFull,
    RelayError,
    UnknownRoute,
    error_from_event,
)
from broker._jsapi import JetStreamApiError, consumer_info
from broker._protocol import (
    Chunk,
    Done,
    Error,
    Event,
    Job,
    Message,
    Notice,
    decode_event,
    encode,
    new_request_id,
    now_ms,
)
from broker._subjects import (
    JOBS_STREAM,
    cancel_subject,
    pool_consumer,
    pool_subject,
    reply_subject,
    route_consumer,
    route_subject,
)

# JetStream error codes (server/errors.json).
_ERR_MAX_MSGS_PER_SUBJECT = 10077
_ERR_MSG_SIZE = 10054
DEFAULT_TIMEOUT_S = 120.0


async def connect_nats(
    url: str,
    *,
    name: str = "llmrelay",
    timeout_s: float = 2.0,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    inbox_prefix: str = "_INBOX",
    reconnected: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect to NATS or raise ``ConnectFailed`` with one clear line.

    Workers pass a private ``inbox_prefix``: jobs are pulled into inboxes, and
    clients may subscribe to ``_INBOX.>`` (nats.conf), so a worker's inboxes
    must live elsewhere or any client could read other users' prompts.
    """

    first = _FirstConnect(servers=url.count(",") + 1)

    async def quiet(exc: Exception) -> None:
        first.failed(exc)

    async def _connect() -> NATS:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=timeout_s,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=quiet,
            user=user,
            password=password,
            token=token,
            inbox_prefix=inbox_prefix,
            reconnected_cb=reconnected,
        )

    try:
        return await first.run(_connect(), timeout_s=timeout_s * first.servers + 0.5)
    except (NoServersError, OSError, NatsTimeout) as exc:
        cause = first.error or exc
        if isinstance(cause, nats.errors.Error) and not isinstance(cause, NatsTimeout):
            raise ConnectFailed(f"cannot connect to {_redact(url)}: {cause}") from exc
        why = str(cause) or f"timed out after {timeout_s:g}s"
        raise ConnectFailed(f"no NATS server answered at {_redact(url)} ({why})") from exc
    except nats.errors.Error as exc:
        raise ConnectFailed(f"cannot connect to {_redact(url)}: {exc}") from exc


class _FirstConnect:
    """Give every server one try: nats-py retries a first connect forever when
    ``max_reconnect_attempts=-1`` (which we want for later reconnects)."""

    def __init__(self, servers: int) -> None:
        self.servers = servers
        self.error: Exception | None = None
        self._failures = 0
        self._gave_up = asyncio.Event()

    def failed(self, exc: Exception) -> None:
        self.error = exc
        self._failures += 1
        if self._failures >= self.servers:
            self._gave_up.set()

    async def run(self, connect: Awaitable[NATS], *, timeout_s: float) -> NATS:
        task = asyncio.ensure_future(connect)
        gave_up = asyncio.ensure_future(self._gave_up.wait())
        try:
            await asyncio.wait(
                {task, gave_up}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gave_up.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise NoServersError()


def _redact(url: str) -> str:
    """Hide a password in a URL (nats://user:pass@host -> nats://user:***@host)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class JobHandle:
    """A submitted job: iterate its events, or collect its text."""

    def __init__(self, client: RelayClient, job: Job, sub: Subscription) -> None:
        self.job = job
        self._client = client
        self._sub = sub
        self.done: Done | None = None
        self.notices: list[Notice] = []

    @property
    def id(self) -> str:
        return self.job.id

    async def events(self) -> AsyncIterator[Event]:
        """Events until ``done``/``error``; raises ``DeadlineExceeded`` past the deadline."""
        try:
            while True:
                event = await self._next_event()
                yield event
                if isinstance(event, Done | Error):
                    return
        finally:
            await self._close_sub()

    async def _next_event(self) -> Event:
        remaining_s = self.job.deadline_ms / 1000 - time.time()
        if remaining_s <= 0:
            raise DeadlineExceeded(f"request {self.id}: no answer before its deadline")
        try:
            msg = await self._sub.next_msg(timeout=remaining_s)
        except NatsTimeout as exc:
            raise DeadlineExceeded(f"request {self.id}: no answer before its deadline") from exc
        return decode_event(msg.data)

    async def text(self) -> str:
        """The complete answer; raises the matching ``RelayError`` on an error event."""
        answer = Answer()
        async for event in self.events():
            answer.add(event)
            if isinstance(event, Notice):
                self.notices.append(event)
        if answer.error is not None:
            e = answer.error
            raise error_from_event(e.code, e.message, e.retryable, e.attempts)
        self.done = answer.done
        return answer.text

    async def cancel(self) -> None:
        """Ask the worker to abort the upstream call (it answers ``cancelled``)."""
        await self._client.nc.publish(cancel_subject(self.id), b"")

    async def _close_sub(self) -> None:
        with contextlib.suppress(nats.errors.BadSubscriptionError):
            await self._sub.unsubscribe()


class Answer:
    """Folds events into one clean answer, honouring resets."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.attempt = 0
        self.done: Done | None = None
        self.error: Error | None = None
        self.resets = 0

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, event: Event) -> None:
        """Fold one event in. Events of an attempt older than the newest seen are stale.

        Chunks and notices of two attempts can interleave (a backup may stream
        before the failing worker's notice arrives), so only ``attempt`` orders them.
        """
        if isinstance(event, Chunk):
            if event.attempt < self.attempt:
                return
            if event.attempt > self.attempt:
                self._reset(event.attempt)
            self._parts.append(event.delta)
        elif isinstance(event, Notice):
            if event.reset and event.attempt >= self.attempt:
                self._reset(event.attempt)
        elif isinstance(event, Done):
            self.done = event
        else:
            self.error = event

    def _reset(self, attempt: int) -> None:
        if self._parts:
            self.resets += 1
        self._parts.clear()
        self.attempt = attempt


class RelayClient:
    """One NATS connection for submitting jobs. An async context manager."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        config: Config | None = None,
        nc: NATS | None = None,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.config = config
        self._nc = nc
        self._owns_nc = nc is None
        self.default_timeout_s = default_timeout_s
        self._known_targets: set[str] = set()
        self._capacity: int | None = config.streams.queue_capacity if config else None

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RelayError("RelayClient is not connected: use `async with RelayClient(...)`")
        return self._nc

    async def __aenter__(self) -> RelayClient:
        if self._nc is None:
            self._nc = await connect_nats(self.url, name="llmrelay-client")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (if this client opened it). Safe to call twice."""
        nc, self._nc = self._nc, None
        if nc is not None and self._owns_nc and not nc.is_closed:
            # flush + close, not drain: drain waits for handles nobody reads any more.
            with contextlib.suppress(nats.errors.Error):
                await nc.flush(timeout=2)
            await nc.close()

    def build_job(
        self,
        prompt: str | Sequence[Message],
        *,
        route: str,
        pool: str | None = None,
        system: str | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        **params: object,
    ) -> Job:
        rid = request_id or new_request_id()
        messages = _messages(prompt, system)
        timeout = timeout_s if timeout_s is not None else self._route_timeout(route)
        created = now_ms()
        return Job(
            id=rid,
            route=route,
            pool=pool,
            messages=messages,
            reply_to=reply_subject(rid),
            deadline_ms=created + int(timeout * 1000),
            created_ms=created,
            **params,  # type: ignore[arg-type]
        )

    def _route_timeout(self, route: str) -> float:
        if self.config and route in self.config.routes:
            return self.config.routes[route].deadline_s
        return self.default_timeout_s

    async def submit(
        self, prompt: str | Sequence[Message], *, route: str, **options: object
    ) -> JobHandle:
        """Publish a job; return a handle to its events. See ``build_job`` for options."""
        job = self.build_job(prompt, route=route, **options)  # type: ignore[arg-type]
        return await self.submit_job(job)

    async def submit_job(self, job: Job) -> JobHandle:
        """Publish a ready-made job (idempotent on ``job.id``)."""
        await self._check_target(job)
        sub = await self.nc.subscribe(job.reply_to, pending_msgs_limit=65536)
        try:
            await self._publish(job)
        except BaseException:
            await sub.unsubscribe()
            raise
        return JobHandle(self, job, sub)

    async def _publish(self, job: Job) -> None:
        data = encode(job)
        subject = pool_subject(job.pool) if job.pool else route_subject(job.route)
        ttl_s = max(1, math.ceil(job.deadline_ms / 1000 - time.time()) + 1)
        headers = {"Nats-Msg-Id": job.id, "Nats-TTL": f"{ttl_s}s"}
        try:
            await self.nc.jetstream().publish(subject, data, headers=headers, timeout=5.0)
        except ServiceUnavailableError as exc:
            if exc.err_code == _ERR_MAX_MSGS_PER_SUBJECT:
                raise QueueFull(await self._full_message(job)) from exc
            raise RelayError(f"publish to {subject} refused: {exc.description}") from exc
        except APIError as exc:
            if exc.err_code == _ERR_MSG_SIZE:
                raise PayloadTooLarge(
                    f"job {job.id} is {len(data)} bytes: {exc.description}"
                ) from exc
            raise RelayError(f"publish to {subject} refused: {exc.description}") from exc
        except NoStreamResponseError as exc:
            raise RelayError(
                f"no {JOBS_STREAM} stream answered for {subject}: start the broker "
                "(`llmrelay up`) or a worker, which create the streams"
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"job {job.id} is {len(data)} bytes: {exc}") from exc

    async def _full_message(self, job: Job) -> str:
        where = f"pool {job.pool}" if job.pool else f"route {job.route}"
        capacity = self._capacity
        if capacity is None:
            try:
                info = await self.nc.jetstream().stream_info(JOBS_STREAM)
                capacity = self._capacity = info.config.max_msgs_per_subject
            except (APIError, NatsTimeout):
                capacity = None
        size = f" ({capacity} jobs waiting)" if capacity else ""
        return f"{where} queue is full{size}; retry later"

    async def _check_target(self, job: Job) -> None:
        """Refuse an unknown route/pool before publishing a job nobody would take."""
        if self.config is not None:
            if job.pool is not None and job.pool not in self.config.pools:
                raise UnknownRoute(
                    f"no pool named {job.pool!r} (pools: {', '.join(self.config.pools)})"
                )
            if job.pool is None and job.route not in self.config.routes:
                raise UnknownRoute(
                    f"no route named {job.route!r} (routes: {', '.join(self.config.routes)})"
                )
            return
        consumer = pool_consumer(job.pool) if job.pool else route_consumer(job.route)
        if consumer in self._known_targets:
            return
        try:
            await consumer_info(self.nc, JOBS_STREAM, consumer)
        except JetStreamApiError as exc:
            if exc.status == 404:
                what = f"pool {job.pool!r}" if job.pool else f"route {job.route!r}"
                raise UnknownRoute(f"no {what} is configured on this broker") from exc
            raise
        self._known_targets.add(consumer)


def _messages(prompt: str | Sequence[Message], system: str | None) -> list[Message]:
    messages = [Message(role="user", content=prompt)] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages.insert(0, Message(role="system", content=system))
    return messages
