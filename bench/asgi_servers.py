"""Server CPU per streamed SSE answer: uvicorn (as llmrelay runs it, h11, httptools), granian.

    /tmp/http-venv/bin/python -m bench.asgi_servers [SECONDS] [ROUNDS] [CONCURRENCY] [SETUPS] [RATE]

(defaults 2, 3, 32, the nine setups of ``SETUPS`` and 0; ``SETUPS`` is a comma
list of ``app@server``, e.g. ``route@llmrelay,raw@granian``; ``RATE`` > 0 paces
the clients to at most that many requests/s in all, so that every server is
measured at the same load, not each at its own closed-loop rate). Run it in a venv with
``granian`` and ``httptools`` beside llmrelay (``pip install -e . granian
httptools``); a server whose package is missing is left out and said so.

Issue 16 asks whether a leaner ASGI path than Starlette's streaming response,
or a faster server, would cut the gateway's CPU per request. Each setup serves
``POST /v1/chat/completions`` in a child process of its own; this process is the
load: ``CONCURRENCY`` closed-loop clients on the worker's lean keep-alive
transport (``workers/_transport.py``), each reading the answer to its end. The
answer is the bench's "ceiling" shape: 8 SSE events of ~110 bytes (``data:
{...}``) and ``data: [DONE]``, produced at once.

Apps (the request body is read first in each):

- ``streaming``: Starlette, a ``Route`` answering with a ``StreamingResponse`` over an
  async generator (Starlette runs a task group and a disconnect listener per answer);
- ``route``: Starlette, a ``Route`` answering with a ``Response`` subclass that sends
  its events itself, the last one with ``more_body: False``, as the gateway's
  ``EventStreamResponse`` does (``gateway/_exchange.py``);
- ``raw``: no Starlette: an ASGI callable sending the same messages as ``route``.

Servers: ``llmrelay`` (uvicorn, h11, with ``LimitedH11Protocol`` and its
``CorkedTransport``, from ``gateway._serve.server_config``: how the gateway
runs), ``h11`` and ``httptools`` (plain uvicorn), ``httptools-cork`` (uvicorn's
httptools protocol behind ``CorkedTransport``, no limits), ``granian`` (ASGI interface, 1
worker, asyncio loop, HTTP/1). A round runs every setup once, in turn; in each,
after a warm-up, the CPU of the server's process tree (from /proc, all threads
and worker processes) over ``SECONDS`` is divided by the answers completed then.
The table gives the median over rounds of server CPU µs per request, its ratio
to ``route@llmrelay`` (the gateway's own path today), and requests/s.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bench._procstat import MachineWatch, cpu_seconds
from workers._transport import LeanTransport, Target

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
WARMUP_S = 0.8
_CHUNK = {
    "id": "chatcmpl-bench",
    "object": "chat.completion.chunk",
    "model": "gpt",
    "choices": [{"index": 0, "delta": {"content": " token"}}],
}
EVENT = b"data: " + msgspec.json.encode(_CHUNK) + b"\n\n"  # ~110 bytes
EVENTS = [EVENT] * 8 + [b"data: [DONE]\n\n"]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
BODY = msgspec.json.encode(
    {"model": "gpt", "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
)
SETUPS = (
    ("streaming", "llmrelay"),
    ("route", "llmrelay"),
    ("raw", "llmrelay"),
    ("streaming", "h11"),
    ("streaming", "httptools"),
    ("route", "httptools"),
    ("streaming", "granian"),
    ("route", "granian"),
    ("raw", "granian"),
)
BASELINE = ("route", "llmrelay")


# --- the apps (module attributes: granian imports them by name)


async def _streaming(request: Request) -> Response:
    await request.body()

    async def events() -> Any:
        for event in EVENTS:
            yield event

    return StreamingResponse(events(), media_type="text/event-stream")


class _EventsResponse(Response):
    """Sends its events itself, as the gateway's ``EventStreamResponse`` does."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_events(send)


async def _send_events(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    for event in EVENTS[:-1]:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": EVENTS[-1], "more_body": False})


async def _route(request: Request) -> Response:
    await request.body()
    return _EventsResponse()


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The same answer as ``route``, without Starlette (and its lifespan, for granian)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[1]  # startup / shutdown
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await _send_events(send)


streaming_app = Starlette(routes=[Route(PATH, _streaming, methods=["POST"])])
route_app = Starlette(routes=[Route(PATH, _route, methods=["POST"])])
APPS = {"streaming": "streaming_app", "route": "route_app", "raw": "raw_app"}


# --- the servers (each in a child process)


def serve(server: str, app_name: str, port: int) -> None:
    """Run one uvicorn setup in this process (the child ``server_command`` starts)."""
    import uvicorn

    app = globals()[APPS[app_name]]
    common: dict[str, Any] = {"host": HOST, "port": port, "lifespan": "off", "loop": "asyncio"}
    config: uvicorn.Config
    if server == "llmrelay":
        from broker._config import GatewaySettings
        from gateway._serve import server_config

        config = server_config(app, GatewaySettings(), log_level="warning", **common)
    else:
        http = _corked_httptools() if server == "httptools-cork" else server
        config = uvicorn.Config(
            app, http=http, ws="none", access_log=False, log_level="warning", **common
        )
    uvicorn.Server(config).run()


def _corked_httptools() -> Any:
    """uvicorn's httptools protocol behind llmrelay's ``CorkedTransport`` (gateway/_cork.py),
    without ``LimitedH11Protocol``'s limits: what a port of it to httptools would start from."""
    from gateway._cork import CorkedTransport

    module: Any = importlib.import_module("uvicorn.protocols.http.httptools_impl")

    class CorkedHttpToolsProtocol(module.HttpToolsProtocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(CorkedTransport(transport, self.loop))

    return CorkedHttpToolsProtocol


def server_command(server: str, app_name: str, port: int) -> list[str]:
    if server == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", "asgi", "--workers", "1"),
            *("--loop", "asyncio", "--http", "1", "--no-ws", "--log-level", "warning"),
            *("--host", HOST, "--port", str(port), f"bench.asgi_servers:{APPS[app_name]}"),
        ]
    return [sys.executable, "-m", "bench.asgi_servers", "serve", server, app_name, str(port)]


def available() -> list[str]:
    """The servers whose packages are installed (a missing one is said so, on stderr)."""
    found = []
    for server, module in (("llmrelay", "h11"), ("h11", "h11"), ("httptools", "httptools"),
                           ("httptools-cork", "httptools"), ("granian", "granian")):  # fmt: skip
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"# {server}: not measured ({exc})", file=sys.stderr)
            continue
        found.append(server)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (granian's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.returncode}")
        try:
            response = httpx.post(f"http://{HOST}:{port}{PATH}", content=BODY, timeout=2.0)
            if response.status_code == 200 and b"[DONE]" in response.content:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server on port {port} did not answer in {timeout_s:g}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the load (this process)


class Load:
    """Closed-loop clients on one keep-alive pool; counts answers read to ``[DONE]``.
    With ``rate`` > 0 they start requests no faster than that, all together (paced)."""

    def __init__(self, port: int, concurrency: int, rate: float = 0.0) -> None:
        self.transport = LeanTransport(
            max_connections=concurrency,
            ssl_context=ssl.create_default_context(),
            on_connect=self._connected,
        )
        self.target = Target.of(f"http://{HOST}:{port}{PATH}")
        self.headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
        self.concurrency = concurrency
        self.done = self.failed = self.connections = 0
        self.running = True
        self.interval = 1 / rate if rate > 0 else 0.0
        self.next_at = 0.0

    def _connected(self) -> None:
        self.connections += 1

    async def one(self) -> bool:
        response = await self.transport.post(self.target, self.headers, BODY, 5.0)
        tail = b""
        try:
            async for chunk in response.aiter_bytes():
                tail = (tail + chunk)[-32:]
        finally:
            await response.aclose()
        return response.status_code == 200 and b"data: [DONE]" in tail

    async def client(self) -> None:
        while self.running:
            if self.interval:
                now = time.perf_counter()
                self.next_at = max(self.next_at + self.interval, now)
                await asyncio.sleep(self.next_at - now)
            try:
                ok = await self.one()
            except httpx.HTTPError:
                ok = False
            if ok:
                self.done += 1
            else:
                self.failed += 1


async def measure(
    root: int, port: int, window_s: float, concurrency: int, rate: float
) -> dict[str, Any]:
    """Warm up, then the server tree's CPU and the answers completed over ``window_s``."""
    load = Load(port, concurrency, rate)
    clients = [asyncio.create_task(load.client()) for _ in range(concurrency)]
    await asyncio.sleep(WARMUP_S)
    pids, machine = process_tree(root), MachineWatch()
    cpu0, done0, failed0 = sum(map(cpu_seconds, pids)), load.done, load.failed
    t0, client0 = time.perf_counter(), time.process_time()
    machine.begin()
    await asyncio.sleep(window_s)
    cpu, wall = sum(map(cpu_seconds, pids)) - cpu0, time.perf_counter() - t0
    done, client_cpu = load.done - done0, time.process_time() - client0
    busy, _ = machine.end()
    failed = load.failed - failed0
    load.running = False
    await asyncio.gather(*clients)
    await load.transport.aclose()
    return {
        "us_per_request": 1e6 * cpu / max(1, done),
        "rps": done / wall,
        "server_cpu_pct": 100 * cpu / wall,
        "client_cpu_pct": 100 * client_cpu / wall,
        "machine_busy_pct": busy,
        "failed": failed,
        "connections": load.connections,
        "processes": len(pids),
    }


def run_setup(
    app_name: str, server: str, window_s: float, concurrency: int, rate: float = 0.0
) -> dict[str, Any]:
    port = free_port()
    command = server_command(server, app_name, port)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        wait_ready(port, process)
        run = asyncio.run(measure(process.pid, port, window_s, concurrency, rate))
    finally:
        stop(process)
    return {"app": app_name, "server": server, **run}


def _line(run: dict[str, Any]) -> str:
    return (
        f"{run['app'] + '@' + run['server']:<20} {run['us_per_request']:7.1f} µs/req "
        f"{run['rps']:6.0f} req/s server {run['server_cpu_pct']:5.1f}% "
        f"client {run['client_cpu_pct']:5.1f}% machine {run['machine_busy_pct']:5.1f}% "
        f"conns {run['connections']} procs {run['processes']} failed {run['failed']}"
    )


def table(runs: list[dict[str, Any]]) -> str:
    """Medians over rounds, one row per setup, ratio to the baseline."""
    setups = list(dict.fromkeys((r["app"], r["server"]) for r in runs))

    def med(setup: tuple[str, str], key: str) -> float:
        values: list[float] = [r[key] for r in runs if (r["app"], r["server"]) == setup]
        return statistics.median(values)

    base = med(BASELINE, "us_per_request") if BASELINE in setups else float("nan")
    rows = [
        "| app | server | server CPU µs/request (median) | per round | vs route@llmrelay "
        "| req/s | server CPU % |",
        "|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        per_round = [round(r["us_per_request"]) for r in runs if (r["app"], r["server"]) == setup]
        us = med(setup, "us_per_request")
        rows.append(
            f"| {setup[0]} | {setup[1]} | {us:.0f} | {', '.join(map(str, per_round))} "
            f"| {us / base:.2f} | {med(setup, 'rps'):.0f} | {med(setup, 'server_cpu_pct'):.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        serve(args[1], args[2], int(args[3]))
        return
    numbers = [float(a) for a in args[:3]] + [2.0, 3, 32][len(args[:3]) :]
    window_s, rounds, concurrency = numbers[0], int(numbers[1]), int(numbers[2])
    chosen = [tuple(s.split("@", 1)) for s in args[3].split(",")] if len(args) > 3 else SETUPS
    rate = float(args[4]) if len(args) > 4 else 0.0
    servers = available()
    setups = [(app, server) for app, server in chosen if server in servers]
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for app_name, server in setups:
            run = run_setup(app_name, server, window_s, concurrency, rate)
            runs.append(run)
            print(f"round {r + 1} {_line(run)}", flush=True)
    print()
    print(table(runs))


if __name__ == "__main__":
    main()
