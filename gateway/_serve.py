"""Running the gateway: as an ASGI app, as ``llmrelay gateway``, or inside a program.

``create_app`` is the app uvicorn's worker processes build (``--workers N``);
``run_gateway`` is what ``llmrelay gateway`` runs; ``serve_gateway`` runs the
gateway in the caller's event loop on a free port, for benchmarks and tests.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import uvicorn
from starlette.applications import Starlette

from broker._config import Config
from gateway._app import Gateway


def create_app(
    config: Config, *, nats_url: str | None = None, metrics_dir: str | None = None
) -> Starlette:
    """The gateway as an ASGI app that connects to NATS on start-up (for uvicorn)."""
    return Gateway(config, nats_url=nats_url, metrics_dir=metrics_dir).asgi()


async def run_gateway(
    config: Config,
    *,
    nats_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    graceful_s: int = 10,
    log_level: str = "info",
) -> None:
    """Serve in this process until SIGINT/SIGTERM (``llmrelay gateway``).

    NATS is connected before the port opens, so a NATS problem is one clear
    ``ConnectFailed``; on a signal, open requests get ``graceful_s`` to finish.
    """
    async with Gateway(config, nats_url=nats_url) as gateway:
        server = uvicorn.Server(
            uvicorn.Config(
                gateway.asgi(lifespan=False),
                host=host,
                port=port,
                lifespan="off",
                log_level=log_level,
                access_log=False,
                timeout_graceful_shutdown=graceful_s,
            )
        )
        await server.serve()


@asynccontextmanager
async def serve_gateway(
    config: Config,
    *,
    nats_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_s: int = 5,
) -> AsyncIterator[str]:
    """Run the gateway in this event loop; yield its base URL, e.g. ``http://127.0.0.1:PORT/v1``.

    ``port=0`` picks a free port. NATS is connected and the socket is listening
    before the URL is yielded, so the first request can be sent at once. To
    measure the time to first token through it (bench/gateway_ttft.py does)::

        async with serve_gateway(cfg, nats_url=client_url) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(model=route, messages=..., stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft_s = time.perf_counter() - t0
                    break
    """
    sock = socket.create_server((host, port), backlog=1024)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            (gateway := Gateway(config, nats_url=nats_url)).asgi(lifespan=False),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=graceful_s,
        )
    )
    try:
        async with gateway, anyio.create_task_group() as tg:
            # Connections made before uvicorn accepts wait in the listen backlog.
            tg.start_soon(server.serve, [sock])
            try:
                yield f"http://{host}:{bound_port}/v1"
            finally:
                server.should_exit = True
    finally:
        sock.close()
