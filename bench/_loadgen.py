"""The load generator: one process, started by the orchestrator, many requests in flight.

    python -c "from bench._loadgen import main; main()"   (stdin: a LoadSpec line, then "go")

It reads its ``LoadSpec``, connects, prints ``ready``, waits for ``go`` (so
that several generators start together), sends, then prints one ``LoadResult``
JSON line. Two targets take exactly the same load:

- ``broker``: ``RelayClient.submit`` through NATS, like any client; time to
  first token is submit -> first ``Chunk``, total is submit -> ``Done``.
- ``direct``: the worker's own provider adapter (httpx, same connection limits)
  straight to the fake provider; first ``TextDelta`` and ``Finish``.
- ``gateway``: streamed ``POST /v1/chat/completions`` to the HTTP gateway
  (``bench._httpload``); first SSE chunk with content, and ``[DONE]``.

Three shapes of load:

- ``open``: a fixed arrival rate, whatever the answers do (no coordinated
  omission: a slow answer never delays the next send). How late each send was
  against its schedule is recorded, so a generator that could not keep up shows.
- ``closed``: ``concurrency`` clients, each sending its next request as soon as
  its last one ends: the maximum throughput.
- ``burst``: ``requests`` jobs submitted as fast as ``concurrency`` publishes in
  flight allow, then every answer awaited (a spike into the queue).

Every request sent in the measured window ends as exactly one record: completed
(``code == ""``) or an error code (``unfinished`` if it had no answer when the
drain time ran out), so ``completed + errors == sent`` by construction.

A record's ``chunks`` and ``chars`` (the answer's length) follow the client's
fold (``broker/_fold.py``): a ``Notice`` with ``resume=True`` keeps the text so
far (its first ``offset`` characters), and the continuing attempt's chunks add
to it; ``reset=True``, or a chunk of a newer attempt with no resume before it,
starts the count over. ``max_gap_ms`` is the longest wait between two
consecutive chunks the caller got, whatever attempt sent them: the stall of a
failover in the middle of an answer.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio
import msgspec
from anyio.abc import TaskGroup

from bench._httpload import GatewaySender
from broker._client import RelayClient
from broker._config import PoolConfig, Secret
from broker._errors import RelayError
from broker._protocol import Chunk, Done, Error, Job, Message, Notice, now_ms
from broker._subjects import reply_subject
from workers._http import HttpShards
from workers.providers import Finish, Provider, ProviderError, TextDelta

Target = Literal["broker", "direct", "gateway"]
Mode = Literal["open", "closed", "burst"]
DEFAULT_PROMPT = "Say hello and then a few words, please."


class LoadSpec(msgspec.Struct, kw_only=True):
    target: Target
    mode: Mode
    rate: float = 0.0  # open: requests/s of this process
    concurrency: int = 1  # closed: clients; burst: publishes in flight
    requests: int = 0  # burst: how many jobs; closed: stop after this many measured (0 = by time)
    duration_s: float = 5.0  # open/closed: measured seconds (after warmup)
    warmup_s: float = 0.0
    drain_s: float = 30.0  # after the last send: how long to wait for answers
    nats_url: str = ""
    route: str = "chat"
    deadline_s: float = 120.0
    provider_url: str = ""
    model: str = "gpt"
    connections: int = 64  # direct: httpx pool size; gateway: HTTP connections
    gateway_url: str = ""  # gateway: its OpenAI base URL (.../v1)
    api_key: str = ""  # gateway: the bearer key
    prompt: str = DEFAULT_PROMPT
    index: int = 0


class Rec(msgspec.Struct, array_like=True):
    """One measured request. Times in ms; ``sent`` is wall-clock seconds."""

    sent: float
    ttft_ms: float  # -1: no chunk arrived
    total_ms: float
    code: str  # "" = completed
    pool: str
    chunks: int
    lag_ms: float  # open loop: how late the send was against its schedule
    failed_at_ms: int  # wall-clock ms of the first failed attempt (Done.attempts), 0 if none
    queued_ms: float  # broker: Done.timings.queued_ms (submit -> a worker starts the job)
    worker_ttft_ms: float  # broker: Done.timings.ttft_ms (job start -> first upstream token)
    chars: int = 0  # characters of the answer the caller holds at the end (resume rule)
    max_gap_ms: float = 0.0  # longest wait between two consecutive chunks (0: fewer than two)
    failed_attempts: int = 0  # len(Done.attempts): failed tries before the one that answered


class LoadResult(msgspec.Struct, kw_only=True):
    target: Target
    mode: Mode
    index: int
    warmup_sent: int
    started: float  # wall clock of the first measured send
    ended: float  # wall clock when the last answer came (or the drain ran out)
    last_sent: float
    cpu_s: float  # this process's CPU time from "go" to the end
    peak_rss_kb: int  # this process's peak RSS (it exits before the orchestrator can look)
    records: list[Rec]


class _Request:
    """The figures one request gathers while it runs."""

    __slots__ = (
        "attempt",
        "chars",
        "chunks",
        "code",
        "failed_at_ms",
        "failed_attempts",
        "first",
        "last",
        "max_gap",
        "on_submitted",
        "pool",
        "queued_ms",
        "t0",
        "worker_ttft_ms",
    )

    def __init__(self, on_submitted: Callable[[], None] | None = None) -> None:
        self.t0 = time.perf_counter()
        self.first = -1.0
        self.last = 0.0
        self.max_gap = 0.0
        self.chunks = 0
        self.chars = 0
        self.failed_attempts = 0
        self.code = "unfinished"
        self.pool = ""
        self.failed_at_ms = 0
        self.queued_ms = -1.0
        self.worker_ttft_ms = -1.0
        self.attempt = 0
        self.on_submitted = on_submitted

    def submitted(self) -> None:
        if self.on_submitted is not None:
            self.on_submitted()
            self.on_submitted = None

    def chunk(self, attempt: int = 0, chars: int = 0) -> None:
        now = time.perf_counter()
        if self.first < 0:
            self.first = now
        elif now - self.last > self.max_gap:
            self.max_gap = now - self.last
        self.last = now
        if attempt != self.attempt:  # a newer attempt with no resume restarts the answer
            self.attempt, self.chunks, self.chars = attempt, 0, 0
        self.chunks += 1
        self.chars += chars

    def notice(self, event: Notice) -> None:
        """The fold's rule for a notice: ``resume`` keeps the text, ``reset`` voids it."""
        if event.resume:
            # The first ``offset`` characters stand; the continuing attempt's chunks add to them.
            if event.offset is not None and event.offset < self.chars:
                self.chars = event.offset
            self.attempt = max(self.attempt, event.attempt)
        elif event.reset or event.attempt > self.attempt:
            self.attempt, self.chunks, self.chars = max(self.attempt, event.attempt), 0, 0

    def done(self, event: Done) -> None:
        self.code, self.pool = "", event.pool
        self.failed_at_ms = event.attempts[0].at_ms if event.attempts else 0
        self.failed_attempts = len(event.attempts)
        self.queued_ms = event.timings.queued_ms
        self.worker_ttft_ms = event.timings.ttft_ms if event.timings.ttft_ms is not None else -1

    def record(self, sent: float, lag_ms: float, done_at: float) -> Rec:
        ttft = (self.first - self.t0) * 1000 if self.first >= 0 else -1.0
        total = (done_at - self.t0) * 1000
        return Rec(
            sent,
            ttft,
            total,
            self.code,
            self.pool,
            self.chunks,
            lag_ms,
            self.failed_at_ms,
            self.queued_ms,
            self.worker_ttft_ms,
            self.chars,
            self.max_gap * 1000,
            self.failed_attempts,
        )


Sender = Callable[[_Request, int], Awaitable[float]]


class _BrokerSender:
    def __init__(self, client: RelayClient, spec: LoadSpec) -> None:
        self.client = client
        self.spec = spec
        self.prefix = f"b{spec.index}{uuid.uuid4().hex[:8]}"

    async def __call__(self, req: _Request, n: int) -> float:
        """Run one request; return perf_counter() when its answer was complete."""
        try:
            handle = await self.client.submit(
                self.spec.prompt,
                route=self.spec.route,
                timeout_s=self.spec.deadline_s,
                request_id=f"{self.prefix}{n:08d}",
            )
            req.submitted()
            async for event in handle.events():
                if isinstance(event, Chunk):
                    req.chunk(event.attempt, len(event.delta))
                elif isinstance(event, Done):
                    req.done(event)
                elif isinstance(event, Notice):
                    req.notice(event)
                elif isinstance(event, Error):
                    req.code = event.code
        except RelayError as exc:
            req.code = exc.code
        return time.perf_counter()


class _DirectSender:
    """The worker's own provider connections (``workers._http.HttpShards``, the lean
    transport, ``connections`` slots) straight to the fake provider; a request waits
    for a free connection here, as a job waits in the queue for a free slot."""

    def __init__(self, spec: LoadSpec) -> None:
        pool = PoolConfig(
            kind="openai",
            base_url=f"{spec.provider_url}/v1",
            api_key=Secret("sk-bench"),
            concurrency=spec.connections,
        )
        self.shards = HttpShards(pool, spec.connections)
        self.free = anyio.Semaphore(spec.connections)
        self.spec = spec
        self.messages = [Message(role="user", content=spec.prompt)]

    async def __call__(self, req: _Request, n: int) -> float:
        job = Job(
            id=f"d{n}",
            route=self.spec.route,
            messages=self.messages,
            reply_to=reply_subject(f"d{n}"),
            deadline_ms=now_ms() + int(self.spec.deadline_s * 1000),
        )
        req.submitted()
        async with self.free:
            shard, provider = self.shards.acquire()
            try:
                return await self._stream(provider, job, req)
            finally:
                self.shards.release(shard)

    async def _stream(self, provider: Provider, job: Job, req: _Request) -> float:
        finished = 0.0
        try:
            # Read to the end (as the worker does after Finish) so the connection is reused.
            async for item in provider.stream(job, self.spec.model):
                if isinstance(item, TextDelta) and item.text:
                    req.chunk(0, len(item.text))
                elif isinstance(item, Finish):
                    finished = time.perf_counter()
                    req.code, req.pool = "", "direct"
        except ProviderError as exc:
            req.code = exc.code
        return finished or time.perf_counter()


class LoadGen:
    """Runs one ``LoadSpec`` with one sender; collects the records."""

    def __init__(self, spec: LoadSpec, send: Sender) -> None:
        self.spec = spec
        self.send = send
        self.records: list[Rec] = []
        self.warmup_sent = 0
        self.measured_sent = 0
        self.started = 0.0
        self.last_sent = 0.0
        self._n = 0
        self._in_flight = 0
        self._stopped = False

    async def run(self) -> LoadResult:
        spec = self.spec
        cpu0 = time.process_time()
        shape = {"open": self._open, "closed": self._closed, "burst": self._burst}[spec.mode]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_on_signal)
            await shape(tg)
            with anyio.move_on_after(spec.drain_s):
                while self._in_flight:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        return LoadResult(
            target=spec.target,
            mode=spec.mode,
            index=spec.index,
            warmup_sent=self.warmup_sent,
            started=self.started,
            ended=time.time(),
            last_sent=self.last_sent,
            cpu_s=time.process_time() - cpu0,
            peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            records=self.records,
        )

    async def _stop_on_signal(self) -> None:
        """SIGUSR1 from the orchestrator: send no more (answers are still awaited)."""
        with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                self._stopped = True
                return

    def _spawn(
        self,
        tg: TaskGroup,
        measured: bool,
        lag_ms: float,
        on_submitted: Callable[[], None] | None = None,
    ) -> None:
        # Counted before the task starts, so the drain never misses a request not yet begun.
        self._in_flight += 1
        tg.start_soon(self._one, measured, lag_ms, on_submitted)

    async def _one(
        self, measured: bool, lag_ms: float, on_submitted: Callable[[], None] | None = None
    ) -> None:
        """One request; the caller has counted it in ``_in_flight``."""
        n, sent = self._n, time.time()
        self._n += 1
        if measured:
            self.measured_sent += 1
            self.last_sent = sent
            self.started = self.started or sent
        else:
            self.warmup_sent += 1
        req = _Request(on_submitted)
        done_at = 0.0
        try:
            done_at = await self.send(req, n)
        finally:
            self._in_flight -= 1
            req.submitted()
            if measured:
                self.records.append(req.record(sent, lag_ms, done_at or time.perf_counter()))

    async def _open(self, tg: TaskGroup) -> None:
        spec = self.spec
        interval = 1.0 / spec.rate
        t0 = time.perf_counter()
        warm_end = t0 + spec.warmup_s
        end = warm_end + spec.duration_s
        i = 0
        while (due := t0 + i * interval) < end and not self._stopped:
            delay = due - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            lag_ms = max(0.0, (time.perf_counter() - due) * 1000)
            self._spawn(tg, due >= warm_end, lag_ms)
            i += 1

    async def _closed(self, tg: TaskGroup) -> None:
        spec = self.spec
        warm_end = time.perf_counter() + spec.warmup_s
        end = warm_end + spec.duration_s

        async def client() -> None:
            while (now := time.perf_counter()) < end and self._more():
                self._in_flight += 1
                await self._one(now >= warm_end, 0.0)

        async with anyio.create_task_group() as clients:
            for _ in range(spec.concurrency):
                clients.start_soon(client)

    def _more(self) -> bool:
        limit = self.spec.requests
        return not self._stopped and (not limit or self.measured_sent < limit)

    async def _burst(self, tg: TaskGroup) -> None:
        # The limiter bounds publishes in flight, not answers awaited.
        limiter = anyio.Semaphore(max(1, self.spec.concurrency))
        for _ in range(self.spec.requests):
            await limiter.acquire()
            if self._stopped:
                limiter.release()
                return
            self._spawn(tg, True, 0.0, limiter.release)


async def _read_line() -> str:
    line: str = await anyio.to_thread.run_sync(sys.stdin.readline)
    return line.strip()


async def _run_broker(spec: LoadSpec) -> LoadResult:
    async with RelayClient(spec.nats_url) as client:
        sender = _BrokerSender(client, spec)
        return await _ready_then_run(spec, sender)


async def _run_direct(spec: LoadSpec) -> LoadResult:
    sender = _DirectSender(spec)
    try:
        return await _ready_then_run(spec, sender)
    finally:
        await sender.shards.aclose()


async def _run_gateway(spec: LoadSpec) -> LoadResult:
    sender = GatewaySender(
        spec.gateway_url, spec.api_key, spec.route, spec.prompt, spec.connections
    )
    try:
        return await _ready_then_run(spec, sender)
    finally:
        await sender.aclose()


async def _ready_then_run(spec: LoadSpec, sender: Sender) -> LoadResult:
    print("ready", flush=True)
    if await _read_line() != "go":
        raise SystemExit("load generator: expected 'go'")
    return await LoadGen(spec, sender).run()


async def _main() -> None:
    spec = msgspec.json.decode(await _read_line(), type=LoadSpec)
    runner = {"broker": _run_broker, "direct": _run_direct, "gateway": _run_gateway}[spec.target]
    result = await runner(spec)
    sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
    sys.stdout.flush()


def main() -> None:
    anyio.run(_main)


if __name__ == "__main__":
    main()
