"""RelayClient: submit jobs and read their streamed answers.

    async with RelayClient("nats://client:client-secret@127.0.0.1:4222") as relay:
        handle = await relay.submit("Hello", route="chat")
        async for event in handle.events():   # Chunk | Notice | Done | Error
            ...
        # or: text = await handle.text()
        # an embeddings route: one vector per text
        vectors = (await relay.embed("embed", ["a text", "another"])).vectors

``submit`` subscribes to the job's reply subject before publishing, so no event
is missed, and publishes with ``Nats-Msg-Id`` = request id, so a retried submit
never creates a second job. A full queue raises ``QueueFull`` at once. A request
id the server has already seen raises ``DuplicateRequest``, unless the caller
says the submit is a retry (``retry=True``): then the handle replays the first
submit's events from ``LLM_REPLIES``, so it is never a handle to nothing.

``events()`` and ``text()`` keep to the job's own events (``broker/_fold.py``):
those of its current attempt, never of an attempt superseded by a redelivery or
a re-queue, nor of another job naming the same reply subject (the PubAck's
stream sequence names the job). ``text()`` returns one clean answer: when a
worker restarts a job elsewhere (``Notice(reset=True)``, or events of a newer
attempt) the partial text of the abandoned attempt is dropped.

**Tenants.** ``RelayClient(url, tenant="acme")`` (connecting as the NATS user
``acme`` of ``deploy/nats-tenants.conf``) publishes on ``llm.jobs.<route>.acme``
(``llm.pool.<pool>.acme``), reads ``llm.reply.acme.<id>`` and cancels on
``llm.cancel.acme.<id>``. A tenant may not read the JetStream API (consumer
and stream state reveal every tenant's queues) nor replay ``LLM_REPLIES``, so a
tenant's client checks routes against ``config=`` if it has one, else lets the
publish refuse an unknown route (``LLM_JOBS`` takes configured subjects only),
and a duplicate request id is a ``DuplicateRequest`` even with ``retry=True``.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError

from broker._config import Config, NatsSettings
from broker._errors import (
    BrokerUnavailable,
    ConfigError,
    DuplicateRequest,
    JetStreamApiError,
    PayloadTooLarge,
    QueueFull,
    RelayError,
    UnknownRoute,
    error_from_event,
)
from broker._fold import Answer, Fold
from broker._jsapi import consumer_info
from broker._nats import connect, nats_errors
from broker._protocol import (
    Done,
    EmbedRequest,
    Error,
    Event,
    Job,
    Message,
    Notice,
    ReasoningEffort,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    encode,
    new_request_id,
    now_ms,
)
from broker._replay import ReplyReader
from broker._subjects import (
    JOBS_STREAM,
    cancel_subject,
    is_valid_name,
    pool_consumer,
    pool_subject,
    reply_subject,
    route_consumer,
    route_subject,
)
from broker._validate import validate_job
from broker._vectors import Embeddings

DEFAULT_TIMEOUT_S = 120.0
# Events a reply subscription buffers before nats-py drops them (a slow consumer);
# what is dropped is read again from LLM_REPLIES (broker/_replay.py).
REPLY_BUFFER_MSGS = 65536


class JobOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The sampling and bookkeeping options of a job (``Job`` fields a caller may set)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    traceparent: str | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    provider_options: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # An embeddings job's texts (then no messages: ``build_embed_job``).
    embed: EmbedRequest | None = None


class JobHandle:
    """A submitted job: iterate its events, or collect its text."""

    def __init__(self, client: RelayClient, job: Job, sub: Subscription) -> None:
        self.job = job
        self._client = client
        self._reader = ReplyReader(
            client.nc,
            job.reply_to,
            sub,
            what=f"request {job.id}",
            can_replay=client.tenant is None,  # a tenant may not read LLM_REPLIES
        )
        self.done: Done | None = None
        self.notices: list[Notice] = []
        self.tool_calls: list[ToolCall] = []  # the answer's tool calls, after ``text()``
        self.reasoning = ""  # the reasoning streamed beside the answer, after ``text()``
        self.logprobs: list[TokenLogprob] = []  # of the answer's tokens (``logprobs``)
        self.job_seq: int | None = None  # the job's stream sequence, from its PubAck
        self._fold: Fold | None = None  # of the events handed over so far
        self._verdict: Error | None = None  # the fold's own error, due after its event

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def resumes(self) -> int:
        """How often the handle resumed from ``LLM_REPLIES`` after a gap (``broker/_replay.py``)."""
        return self._reader.resumes

    async def events(self) -> AsyncIterator[Event]:
        """The job's events until its ``done``/``error``, each once; raises
        ``DeadlineExceeded`` past the deadline. Events that do not count
        (``broker/_fold.py``) are left out; lost ones are read from ``LLM_REPLIES``."""
        self._fold, self._verdict = Fold(self.job_seq), None
        try:
            while (event := await self.next_event()) is not None:
                yield event
        finally:
            await self._reader.close()

    @property
    def finished(self) -> bool:
        """Whether the answer ended (its final event was handed over)."""
        return self._fold is not None and self._fold.finished and self._verdict is None

    async def next_event(self, wake_s: float | None = None) -> Event | None:
        """The next event that counts, as ``events()`` hands them over, without an
        iterator to cancel: None once the answer ended (``finished``), or at ``wake_s``
        (wall clock) if none came by then. Raises ``DeadlineExceeded`` past the deadline.
        The caller closes the handle (``close()``) when it is done with it."""
        fold = self._fold = self._fold or Fold(self.job_seq)
        if self._verdict is not None:
            verdict, self._verdict = self._verdict, None
            return verdict
        deadline_s, reader = self.job.deadline_ms / 1000, self._reader
        while not fold.finished:
            event = await reader.next_event(deadline_s, fold.accepts, wake_s, fold.continues_past)
            if event is None:
                return None
            if fold.accepts(event):
                fold.add(event)
                if fold.error is not None and fold.error is not event:
                    self._verdict = fold.error  # the fold's own verdict (a resume it cannot follow)
                return event
        return None

    async def text(self) -> str:
        """The complete answer; raises the matching ``RelayError`` on an error event."""
        answer = Answer(self.job_seq)
        async for event in self.events():
            answer.add(event)
            if isinstance(event, Notice):
                self.notices.append(event)
        if answer.error is not None:
            e = answer.error
            raise error_from_event(e.code, e.message, e.retryable, e.attempts)
        self.done = answer.done
        self.tool_calls = answer.tool_calls
        self.reasoning = answer.reasoning_text
        self.logprobs = answer.logprobs
        return answer.text

    async def cancel(self) -> None:
        """Ask the worker to abort the upstream call (it answers ``cancelled``)."""
        with nats_errors(f"cancel of {self.id}"):
            subject = cancel_subject(self.id, self._client.tenant)
            await self._client.nc.publish(subject, cancel_payload(self.job))

    async def close(self) -> None:
        """Stop listening for this job's events (the job itself goes on). Safe twice."""
        await self._reader.close()

    async def replay(self) -> None:
        """Read the job's events from its first one (``LLM_REPLIES``), not only new ones."""
        await self._reader.resume()


class RelayClient:
    """One NATS connection for submitting jobs. An async context manager."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        config: Config | None = None,
        nc: NATS | None = None,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        tenant: str | None = None,
        reply_buffer_msgs: int = REPLY_BUFFER_MSGS,
    ) -> None:
        if tenant is not None and not is_valid_name(tenant):
            raise ConfigError(f"tenant {tenant!r}: lowercase letters, digits, '_' or '-'")
        self.tenant = tenant
        self.url = url
        self.config = config
        self._nc = nc
        self._owns_nc = nc is None
        self.default_timeout_s = default_timeout_s
        self.reply_buffer_msgs = reply_buffer_msgs
        self._known_targets: set[str] = set()
        self._capacity: int | None = config.streams.queue_capacity if config else None

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RelayError("RelayClient is not connected: use `async with RelayClient(...)`")
        return self._nc

    async def __aenter__(self) -> RelayClient:
        if self._nc is None:
            # The URL's own credentials win; the config adds TLS and its credentials.
            settings = self.config.nats if self.config else NatsSettings()
            self._nc = await connect(settings, url=self.url, name="llmrelay-client")
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
            try:
                with nats_errors("flush before close"):
                    await nc.flush(timeout=2)
            except RelayError:
                pass  # the connection is going away; what was not flushed is lost either way
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
        options: JobOptions | None = None,
    ) -> Job:
        """A job for ``prompt`` on ``route`` (or pinned to ``pool``), due in ``timeout_s``."""
        rid = request_id or new_request_id()
        timeout = timeout_s if timeout_s is not None else self._route_timeout(route)
        created = now_ms()
        o = options or JobOptions()
        return Job(
            id=rid,
            route=route,
            pool=pool,
            messages=_messages(prompt, system),
            reply_to=reply_subject(rid, self.tenant),
            deadline_ms=created + int(timeout * 1000),
            created_ms=created,
            max_tokens=o.max_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            stop=o.stop,
            seed=o.seed,
            metadata=dict(o.metadata),
            traceparent=o.traceparent,
            response_format=o.response_format,
            reasoning_effort=o.reasoning_effort,
            logprobs=o.logprobs,
            top_logprobs=o.top_logprobs,
            provider_options=dict(o.provider_options),
            tools=o.tools,
            tool_choice=o.tool_choice,
            parallel_tool_calls=o.parallel_tool_calls,
            embed=o.embed,
            cancel_key=secrets.token_urlsafe(18),
            final_in_done=True,  # the reply reader takes a done's final chunk
        )

    def build_embed_job(
        self,
        inputs: str | Sequence[str],
        *,
        route: str,
        dimensions: int | None = None,
        pool: str | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        options: JobOptions | None = None,
    ) -> Job:
        """An embeddings job: one vector per text of ``inputs`` (the rest as ``build_job``;
        of ``options`` only ``metadata`` and ``traceparent`` apply)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        o = options or JobOptions()
        embed = EmbedRequest(input=texts, dimensions=dimensions)
        kept = JobOptions(metadata=o.metadata, traceparent=o.traceparent, embed=embed)
        return self.build_job([], route=route, pool=pool, timeout_s=timeout_s,
                              request_id=request_id, options=kept)  # fmt: skip

    async def embed(
        self,
        route: str,
        inputs: str | Sequence[str],
        *,
        dimensions: int | None = None,
        pool: str | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        options: JobOptions | None = None,
    ) -> Embeddings:
        """Embed ``inputs`` (one text, or a batch) on ``route``; the vectors, in order.
        Raises the matching ``RelayError`` when the job fails, as ``JobHandle.text``."""
        job = self.build_embed_job(inputs, route=route, dimensions=dimensions, pool=pool,
                                   timeout_s=timeout_s, request_id=request_id,
                                   options=options)  # fmt: skip
        handle = await self.submit_job(job)
        await handle.text()
        assert handle.done is not None
        return Embeddings.of(handle.done)

    def _route_timeout(self, route: str) -> float:
        if self.config and route in self.config.routes:
            return self.config.routes[route].deadline_s
        return self.default_timeout_s

    async def submit(
        self,
        prompt: str | Sequence[Message],
        *,
        route: str,
        pool: str | None = None,
        system: str | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        options: JobOptions | None = None,
        retry: bool = False,
    ) -> JobHandle:
        """Publish a job; return a handle to its events (arguments as ``build_job``;
        ``retry`` as ``submit_job``)."""
        job = self.build_job(
            prompt,
            route=route,
            pool=pool,
            system=system,
            timeout_s=timeout_s,
            request_id=request_id,
            options=options,
        )
        return await self.submit_job(job, retry=retry)

    async def submit_job(self, job: Job, *, retry: bool = False) -> JobHandle:
        """Publish a ready-made job; never two jobs for one ``job.id``.

        An id the server has already seen (within ``streams.duplicate_window_s``)
        raises ``DuplicateRequest``; with ``retry=True`` (the caller is retrying a
        submit that may have landed) the handle replays that job's events instead.
        """
        await self._check_target(job)
        if self.config is not None:  # the worker checks the same; refuse here, before publishing
            job = validate_job(job, self.config, now_ms())
        with nats_errors(f"subscribe to {job.reply_to}"):
            sub = await self.nc.subscribe(job.reply_to, pending_msgs_limit=self.reply_buffer_msgs)
        handle = JobHandle(self, job, sub)
        try:
            ack = await self._publish(job)
            handle.job_seq = int(ack.seq)
            if ack.duplicate:
                await self._duplicate(handle, retry)
        except BaseException:
            await handle.close()
            raise
        return handle

    async def _duplicate(self, handle: JobHandle, retry: bool) -> None:
        if not retry or self.tenant is not None:  # a tenant may not replay LLM_REPLIES
            raise DuplicateRequest(
                f"request id {handle.id} was already submitted (job #{handle.job_seq}); "
                "use a new id, or submit with retry=True to follow that job"
            )
        await handle.replay()

    async def _publish(self, job: Job) -> PubAck:
        data = encode(job)
        tenant = self.tenant
        subject = pool_subject(job.pool, tenant) if job.pool else route_subject(job.route, tenant)
        ttl_s = max(1, math.ceil(job.deadline_ms / 1000 - time.time()) + 1)
        msg_id = f"{tenant}.{job.id}" if tenant else job.id  # no clash with another tenant's
        headers = {"Nats-Msg-Id": msg_id, "Nats-TTL": f"{ttl_s}s"}
        try:
            with nats_errors(f"publish to {subject}"):
                return await self.nc.jetstream().publish(
                    subject, data, headers=headers, timeout=5.0
                )
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, NoStreamResponseError):  # the stream has no such subject
                raise UnknownRoute(
                    f"nothing takes jobs on {subject}: not a configured route or pool "
                    "(or no worker has created the streams yet)"
                ) from exc.__cause__
            raise
        except QueueFull as exc:
            raise QueueFull(await self._full_message(job)) from exc.__cause__
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(
                f"job {job.id} is {len(data)} bytes: {exc.message}"
            ) from exc.__cause__

    async def _full_message(self, job: Job) -> str:
        where = f"pool {job.pool}" if job.pool else f"route {job.route}"
        capacity = self._capacity
        if capacity is None and self.tenant is None:  # tenants may not read stream state
            try:
                with nats_errors(f"{JOBS_STREAM} stream info"):
                    info = await self.nc.jetstream().stream_info(JOBS_STREAM)
                capacity = self._capacity = info.config.max_msgs_per_subject
            except RelayError:
                capacity = None  # the message only lacks the number
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
        if self.tenant is not None:  # no consumer info for tenants: the publish refuses
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


def cancel_payload(job: Job) -> bytes:
    """What ``llm.cancel.<id>`` carries: the job's cancel key (workers check it)."""
    return (job.cancel_key or "").encode()


def _messages(prompt: str | Sequence[Message], system: str | None) -> list[Message]:
    messages = [Message(role="user", content=prompt)] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages.insert(0, Message(role="system", content=system))
    return messages
