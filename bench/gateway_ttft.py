"""Time to first token through the HTTP gateway vs the NATS client, in one run.

    .venv/bin/python -m bench.gateway_ttft [--requests 300] [--tokens 8] [--ttft-ms 0]

Starts nats-server, one fake provider, one ``llmrelay worker`` and one
``llmrelay gateway`` (each a process of its own, as deployed), then sends
requests one at a time, rotating between three clients so that drift hits
each equally:

- ``direct``: ``RelayClient.submit`` -> first ``Chunk`` event (the NATS client path);
- ``gateway``: HTTP POST ``/v1/chat/completions`` (``stream: true``) with httpx
  -> first SSE event carrying text (what the gateway adds, without SDK costs);
- ``gateway+sdk``: the same through the official ``openai`` SDK -> first chunk
  with content (what an application using the SDK sees).

The gateway's overhead is ``gateway - direct`` at each percentile. The fake
provider answers at once (``--ttft-ms 0``), so the figures are llmrelay's own
cost, not a provider's.

The two measuring functions below are reusable (``llmrelay bench`` may call
them): each takes a ready client and returns one TTFT in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import openai
import yaml
from openai.types.chat import ChatCompletionMessageParam

from bench._stats import Summary, summarize
from broker import Chunk, Error, RelayClient
from broker._config import load_config
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, free_port, llmrelay_command
from workers.mock_provider import MockProviderProcess

ROUTE = "chat"
PROMPT = "Say hello"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
_CLI = llmrelay_command()


async def direct_ttft(relay: RelayClient, route: str = ROUTE) -> float:
    """Seconds from ``submit`` to the first text chunk (the answer is then drained)."""
    started = time.perf_counter()
    handle = await relay.submit(PROMPT, route=route)
    first: float | None = None
    async for event in handle.events():
        if first is None and isinstance(event, Chunk) and event.delta:
            first = time.perf_counter() - started
        if isinstance(event, Error):
            raise RuntimeError(f"direct request failed: {event.code}: {event.message}")
    assert first is not None, "the answer had no text"
    return first


async def gateway_ttft(http: httpx.AsyncClient, route: str = ROUTE) -> float:
    """Seconds from sending a streamed request to the first SSE event with text.

    ``http`` has the gateway's base URL (``.../v1``) and key; the stream is read to its end.
    """
    body = {"model": route, "messages": MESSAGES, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    async with http.stream("POST", "chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and _has_text(line):
                first = time.perf_counter() - started
    assert first is not None, "the answer had no text"
    return first


async def sdk_ttft(client: openai.AsyncOpenAI, route: str = ROUTE) -> float:
    """Seconds from ``chat.completions.create(stream=True)`` to the first chunk with content."""
    started = time.perf_counter()
    first: float | None = None
    stream = await client.chat.completions.create(model=route, messages=MESSAGES, stream=True)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    assert first is not None, "the answer had no text"
    return first


def _has_text(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    chunk = msgspec.json.decode(line[6:])
    choices = chunk.get("choices") or []
    return bool(choices and choices[0].get("delta", {}).get("content"))


# --- the run -------------------------------------------------------------------------


def write_config(directory: Path, provider_url: str, nats_url: str, gateway_port: int) -> Path:
    doc = {
        "nats": {"url": nats_url, "user": WORKER_USER[0], "password": WORKER_USER[1]},
        "pools": {
            "mock": {"kind": "openai", "base_url": f"{provider_url}/v1", "api_key": "sk-bench"}
        },
        "routes": {ROUTE: {"targets": [{"pool": "mock", "model": "gpt-bench"}]}},
        "gateway": {"port": gateway_port, "api_keys": ["sk-bench-gateway"]},
    }
    path = directory / "llmrelay.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@contextlib.contextmanager
def child(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_CLI, *args], stdout=out, stderr=out, start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    """Poll a process's readiness probe (it has no event to await)."""
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(timeout_s):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(url)).status_code == 200:
                        return
                await anyio.sleep(0.05)


@contextlib.asynccontextmanager
async def clients(
    client_url: str, base_url: str, config_path: Path
) -> AsyncIterator[dict[str, Callable[[], Any]]]:
    headers = {"authorization": "Bearer sk-bench-gateway"}
    async with (
        RelayClient(client_url, config=load_config(config_path)) as relay,
        httpx.AsyncClient(base_url=base_url + "/", headers=headers, timeout=30) as http,
        openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench-gateway", max_retries=0) as sdk,
    ):
        yield {
            "direct": lambda: direct_ttft(relay),
            "gateway": lambda: gateway_ttft(http),
            "gateway+sdk": lambda: sdk_ttft(sdk),
        }


async def measure(args: argparse.Namespace) -> dict[str, Summary]:
    with tempfile.TemporaryDirectory(prefix="llmrelay-gw-ttft-") as tmp:
        work = Path(tmp)
        with (
            NatsServer(store_dir=work / "nats") as nats_server,
            MockProviderProcess(name="bench", tokens=args.tokens, ttft_ms=args.ttft_ms) as mock,
        ):
            port = free_port()
            config = write_config(work, mock.url, nats_server.url, port)
            client_url = nats_server.url_for(CLIENT_USER)
            worker = ["worker", "--pool", "mock", "--config", str(config)]
            gateway = ["gateway", "--config", str(config), "--nats-url", client_url]
            gateway += ["--log-level", "warning"]
            with child(worker, work / "worker.log"), child(gateway, work / "gateway.log"):
                await wait_ready(f"http://127.0.0.1:{port}/readyz")
                async with clients(client_url, f"http://127.0.0.1:{port}/v1", config) as ways:
                    return await _rounds(ways, args.requests, args.warmup)


async def _rounds(
    ways: dict[str, Callable[[], Any]], requests: int, warmup: int
) -> dict[str, Summary]:
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(warmup + requests):
        for name, ttft in ways.items():
            seconds = await ttft()
            if i >= warmup:
                samples[name].append(seconds * 1000)
    return {name: summarize(values) for name, values in samples.items()}


def render(results: dict[str, Summary], args: argparse.Namespace) -> str:
    direct = results["direct"]
    lines = [
        f"time to first token, ms ({args.requests} requests each, one at a time, "
        f"provider ttft {args.ttft_ms:g} ms, {args.tokens} tokens per answer)",
        f"{'path':<13}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}{'max':>8}",
    ]
    for name, s in results.items():
        lines.append(
            f"{name:<13}{s.p50:>8.2f}{s.p90:>8.2f}{s.p99:>8.2f}{s.mean:>8.2f}{s.max:>8.2f}"
        )
    for name in ("gateway", "gateway+sdk"):
        s = results[name]
        lines.append(
            f"{name} overhead vs direct: p50 +{s.p50 - direct.p50:.2f} ms, "
            f"p99 +{s.p99 - direct.p99:.2f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per path")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="the provider's own TTFT")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = anyio.run(measure, args)
    if args.json:
        print(msgspec.json.encode(results).decode())
    else:
        print(render(results, args))


if __name__ == "__main__":
    main()
