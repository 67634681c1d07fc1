"""CPU per streamed chat completion of the worker's provider HTTP client, and of others.

    /tmp/http-venv/bin/python -m bench.http_clients [REQUESTS] [ROUNDS] [CONCURRENCY]

(defaults 3,000, 3 and 16; a venv with ``aiohttp`` and ``pyreqwest`` installed
beside llmrelay: ``pip install -e . pyreqwest aiohttp``; a client whose package
is missing is left out and said so). Issue 16 asks for the provider client to
be chosen by measurement; this measures the CPU one worker-like process spends
per request with each client:

- ``lean``: the worker's own ``LeanClient.post_stream`` on a ``LeanTransport``
  (``workers/_transport.py``), built as ``workers/_http.py`` builds it;
- ``httpx``: ``httpx.AsyncClient`` on its default transport (httpcore), for reference;
- ``aiohttp``: ``aiohttp.ClientSession`` on a ``TCPConnector`` (C parser);
- ``pyreqwest``: pyreqwest's async ``Client``, streamed response (Rust, its own
  tokio thread: its CPU is this process's too, and is counted).

Each sends ``POST /v1/chat/completions`` with ``stream: true`` to the fake
provider (``llmrelay mock-provider``, a child process on a core of its own, so
its CPU is not counted) in the bench's "ceiling" shape: OpenAI format, zero
latency, 8 tokens per answer; and reads the whole SSE body (chunked) to its
end, checking it held ``data: [DONE]``. ``CONCURRENCY`` requests are in flight
at once (a worker's slots), each client keeps at most that many keep-alive
connections. A round runs every client once, in a rotated order, on a fresh
client: a warm-up, then ``REQUESTS`` measured requests; CPU is this process's
(``time.process_time``: all its threads; the event-loop thread's own share,
``time.thread_time``, is shown beside it: a Rust client works partly on threads
of its own, off the GIL). Connections opened are read from the
provider's ``/stats`` (warm-up included). The table gives the median over rounds
of CPU µs per request, its ratio to ``lean``, and requests/s.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec

from bench._procstat import MachineWatch, cpu_seconds
from devstack.fake_provider._process import MockProviderProcess

CLIENTS = ("lean", "httpx", "aiohttp", "pyreqwest")
WARMUP = 200
PATH = "/v1/chat/completions"
DONE = b"data: [DONE]"
HEADERS = {
    "accept": "text/event-stream",
    "authorization": "Bearer sk-bench",
    "content-type": "application/json",
}
BODY = msgspec.json.encode(
    {"model": "gpt", "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
)

One = Callable[[], Awaitable[bool]]  # one request, read to its end; True if [DONE] came


def _done(tail: bytes, chunk: Any) -> bytes:
    """The last bytes seen (enough to hold ``data: [DONE]`` across a chunk boundary)."""
    joined: bytes = tail + chunk
    return joined[-32:]


@asynccontextmanager
async def lean_client(url: str, concurrency: int) -> AsyncIterator[One]:
    """The worker's client, as ``workers/_http.py`` builds it; ``post_stream`` as
    ``workers/providers/_http.py`` ``open_stream`` calls it."""
    from workers._http import KEEPALIVE_EXPIRY_S
    from workers._transport import LeanClient, LeanTransport

    lean = LeanTransport(
        max_connections=concurrency,
        ssl_context=ssl.create_default_context(),
        keepalive_expiry_s=KEEPALIVE_EXPIRY_S,
    )
    timeout = httpx.Timeout(connect=5.0, read=None, write=5.0, pool=None)
    client = LeanClient(lean, 5.0, timeout=timeout)

    async def one() -> bool:
        response = await client.post_stream(url, HEADERS, BODY)
        tail = b""
        try:
            async for chunk in response.aiter_bytes():
                tail = _done(tail, chunk)
        finally:
            await response.aclose()
        return response.status_code == 200 and DONE in tail

    try:
        yield one
    finally:
        await client.aclose()


@asynccontextmanager
async def httpx_client(url: str, concurrency: int) -> AsyncIterator[One]:
    """httpx's own pool (httpcore), as the worker's injected-transport path uses it."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(connect=5.0, read=None, write=5.0, pool=None)
    client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def one() -> bool:
        request = client.build_request("POST", url, headers=HEADERS, content=BODY)
        response = await client.send(request, stream=True)
        tail = b""
        try:
            async for chunk in response.aiter_bytes():
                tail = _done(tail, chunk)
        finally:
            await response.aclose()
        return response.status_code == 200 and DONE in tail

    try:
        yield one
    finally:
        await client.aclose()


@asynccontextmanager
async def aiohttp_client(url: str, concurrency: int) -> AsyncIterator[One]:
    aiohttp: Any = importlib.import_module("aiohttp")
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    session = aiohttp.ClientSession(connector=connector)

    async def one() -> bool:
        async with session.post(url, data=BODY, headers=HEADERS) as response:
            tail = b""
            async for chunk in response.content.iter_any():
                tail = _done(tail, chunk)
            return bool(response.status == 200 and DONE in tail)

    try:
        yield one
    finally:
        await session.close()


@asynccontextmanager
async def pyreqwest_client(url: str, concurrency: int) -> AsyncIterator[One]:
    module: Any = importlib.import_module("pyreqwest.client")
    client = module.ClientBuilder().max_connections(concurrency).build()

    async def one() -> bool:
        request = client.post(url).headers(HEADERS).body_bytes(BODY).build_streamed()
        async with request as response:
            reader = response.body_reader
            tail = b""
            while (chunk := await reader.read_chunk()) is not None:
                tail = _done(tail, chunk)
            return bool(response.status == 200 and DONE in tail)

    try:
        yield one
    finally:
        await client.close()


FACTORIES = {
    "lean": lean_client,
    "httpx": httpx_client,
    "aiohttp": aiohttp_client,
    "pyreqwest": pyreqwest_client,
}


def available() -> list[str]:
    """The clients whose packages are installed (a missing one is said so, on stderr)."""
    found = []
    for name in CLIENTS:
        module = {"aiohttp": "aiohttp", "pyreqwest": "pyreqwest.client"}.get(name)
        try:
            if module:
                importlib.import_module(module)
        except ImportError as exc:
            print(f"# {name}: not measured ({exc})", file=sys.stderr)
            continue
        found.append(name)
    return found


async def drive(one: One, requests: int, concurrency: int) -> tuple[float, float, float, int]:
    """``requests`` requests, ``concurrency`` at a time: (CPU s of the process, of its
    event-loop thread alone, wall s, failures)."""
    left, failures = requests, 0

    async def loop() -> None:
        nonlocal left, failures
        while left > 0:
            left -= 1
            if not await one():
                failures += 1

    gc.collect()
    cpu0, thread0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    cpu, thread = time.process_time() - cpu0, time.thread_time() - thread0
    return cpu, thread, time.perf_counter() - t0, failures


async def measure(
    name: str, provider: MockProviderProcess, requests: int, concurrency: int
) -> dict[str, Any]:
    """One client, fresh: a warm-up, then ``requests`` measured; its figures."""
    before = await asyncio.to_thread(provider.stats)
    assert provider.process is not None
    pid, machine = provider.process.pid, MachineWatch()
    async with FACTORIES[name](provider.url + PATH, concurrency) as one:
        await drive(one, WARMUP, concurrency)
        provider_cpu0 = cpu_seconds(pid)
        machine.begin()
        cpu, thread, wall, failures = await drive(one, requests, concurrency)
        busy, _ = machine.end()
        provider_cpu = cpu_seconds(pid) - provider_cpu0
    after = await asyncio.to_thread(provider.stats)
    return {
        "client": name,
        "us_per_request": 1e6 * cpu / requests,
        "loop_us_per_request": 1e6 * thread / requests,  # the Python thread's share
        "rps": requests / wall,
        "failures": failures,
        # The after-/stats call is one more connection of its own.
        "connections": after["connections"] - before["connections"] - 1,
        "served": after["requests"] - before["requests"],
        "provider_cpu_pct": 100 * provider_cpu / wall,
        "machine_busy_pct": busy,
    }


def _line(run: dict[str, Any]) -> str:
    return (
        f"{run['client']:<10} {run['us_per_request']:7.1f} µs/req "
        f"(loop thread {run['loop_us_per_request']:7.1f}) {run['rps']:7.0f} req/s "
        f"conns {run['connections']:3d} failures {run['failures']} "
        f"provider {run['provider_cpu_pct']:5.1f}% machine {run['machine_busy_pct']:5.1f}%"
    )


FIGURES = ("us_per_request", "loop_us_per_request", "rps", "connections", "provider_cpu_pct")


def table(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Medians over rounds, one row per client, ratio to ``lean``."""
    med = {
        name: {
            key: statistics.median(r[key] for r in runs if r["client"] == name) for key in FIGURES
        }
        for name in names
    }
    spread = {
        name: [round(r["us_per_request"]) for r in runs if r["client"] == name] for name in names
    }
    base = med["lean"]["us_per_request"] if "lean" in med else float("nan")
    rows = [
        "| client | CPU µs/request (median) | per round | vs lean | of it, the loop thread "
        "| req/s | connections | provider CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        m = med[name]
        rows.append(
            f"| {name} | {m['us_per_request']:.0f} | {', '.join(map(str, spread[name]))} "
            f"| {m['us_per_request'] / base:.2f} | {m['loop_us_per_request']:.0f} "
            f"| {m['rps']:.0f} | {m['connections']:.0f} "
            f"| {m['provider_cpu_pct']:.0f} |"
        )
    return "\n".join(rows)


async def main_async(requests: int, rounds: int, concurrency: int) -> None:
    names = available()
    runs: list[dict[str, Any]] = []
    async with MockProviderProcess(name="mock", tokens=8) as provider:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                run = await measure(name, provider, requests, concurrency)
                run["round"] = r + 1
                runs.append(run)
                print(f"round {r + 1} {_line(run)}", flush=True)
    print()
    print(table(runs, names))


def main(argv: list[str] | None = None) -> None:
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    requests, rounds, concurrency = (args + [3000, 3, 16][len(args) :])[:3]
    asyncio.run(main_async(requests, rounds, concurrency))


if __name__ == "__main__":
    main()
