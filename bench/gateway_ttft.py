"""Time to first token through the HTTP gateway vs the NATS client, in one run.

    .venv/bin/python -m bench.gateway_ttft [--requests 300] [--tokens 8] [--ttft-ms 0]

Starts nats-server, one fake provider, one ``llmrelay worker`` and one
``llmrelay gateway`` (each a process of its own, as deployed, in a devstack
``Stack``), then sends
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
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import openai
from openai.types.chat import ChatCompletionMessageParam

from bench._stats import Summary, summarize
from broker import Chunk, Error, RelayClient
from broker._config import load_config
from broker._server import WORKER_USER, free_port
from devstack import ConfigDoc, GatewayProcess, MockSpec, Stack, WorkerProcess

ROUTE = "chat"
PROMPT = "Say hello"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
API_KEY = "sk-bench-gateway"
CONFIG_FILE = "llmrelay.yaml"


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


def write_config(path: Path, provider_url: str, nats_url: str, gateway_port: int) -> Path:
    return (
        ConfigDoc()
        .nats(nats_url, user=WORKER_USER)
        .pool("mock", base_url=f"{provider_url}/v1", api_key="sk-bench")
        .route(ROUTE, [("mock", "gpt-bench")])
        .gateway(port=gateway_port, api_keys=[API_KEY])
        .write(path)
    )


def start(stack: Stack[WorkerProcess], args: argparse.Namespace) -> GatewayProcess:
    """nats-server, the fake provider, one worker and the gateway (not waited for yet)."""
    stack.start_nats()
    mock = stack.start_mock(MockSpec(name="bench", tokens=args.tokens, ttft_ms=args.ttft_ms))
    port = free_port()
    config = write_config(stack.work_dir / CONFIG_FILE, mock.url, stack.server.url, port)
    stack.add_worker(WorkerProcess("mock", config, stack.worker_url, stack.work_dir))
    gateway = GatewayProcess(config, stack.client_url, stack.work_dir, port=port)
    return stack.add_gateway(gateway)


@contextlib.asynccontextmanager
async def clients(
    client_url: str, base_url: str, config_path: Path
) -> AsyncIterator[dict[str, Callable[[], Any]]]:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with (
        RelayClient(client_url, config=load_config(config_path)) as relay,
        httpx.AsyncClient(base_url=base_url + "/", headers=headers, timeout=30) as http,
        openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk,
    ):
        yield {
            "direct": lambda: direct_ttft(relay),
            "gateway": lambda: gateway_ttft(http),
            "gateway+sdk": lambda: sdk_ttft(sdk),
        }


async def measure(args: argparse.Namespace) -> dict[str, Summary]:
    with (
        tempfile.TemporaryDirectory(prefix="llmrelay-gw-ttft-") as tmp,
        contextlib.closing(Stack[WorkerProcess](Path(tmp))) as stack,
    ):
        gateway = await anyio.to_thread.run_sync(start, stack, args)
        await stack.wait_for_workers()
        await gateway.wait_ready()
        config = stack.work_dir / CONFIG_FILE
        async with clients(stack.client_url, f"{gateway.url}/v1", config) as ways:
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
