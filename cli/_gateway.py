"""`llmrelay gateway`: the OpenAI-compatible HTTP front door (the `gateway` package).

With ``--workers 1`` (the default) uvicorn serves the app in this process. With
``--workers N`` uvicorn starts N processes that share the port; each imports
``app_from_env`` below, which reads the config path and NATS URL that this
command put in the environment, and opens its own NATS connection. Their
metrics go to a shared temporary directory (prometheus_client's multiprocess
mode), so /metrics answers for the whole gateway whichever process serves it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import TYPE_CHECKING, Annotated

import typer

from broker._config import CONFIG_ENV, Config
from cli._common import (
    ConfigOpt,
    JsonLogsOpt,
    LogLevelOpt,
    NatsUrlOpt,
    config_from,
    run,
    setup_logging,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette

NATS_URL_ENV = "LLMRELAY_NATS_URL"
# prometheus_client's multiprocess mode: read when a worker process imports it.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)


def gateway(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: gateway.host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default: gateway.port, 8080).")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=1, help="uvicorn worker processes.")
    ] = 1,
    drain_s: Annotated[
        int, typer.Option("--drain-s", help="On SIGTERM, seconds open requests get to finish.")
    ] = 10,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
    json_logs: JsonLogsOpt = False,
    log_level: LogLevelOpt = "info",
) -> None:
    """Serve the OpenAI API (POST /v1/chat/completions, GET /v1/models) over llmrelay.

    Point an OpenAI client at http://HOST:PORT/v1; `model` names a route.
    Also serves /healthz, /readyz and /metrics.
    """
    # Imported here: every other command starts without the web stack.
    from gateway import run_gateway
    from gateway._serve import run_gateway_processes

    setup_logging(json_logs, log_level)
    cfg = config_from(config)
    bind_host = host or cfg.gateway.host
    bind_port = cfg.gateway.port if port is None else port
    typer.echo(
        f"llmrelay gateway: http://{bind_host}:{bind_port}/v1 "
        f"(routes: {', '.join(cfg.routes) or 'none'}; "
        f"API keys: {len(cfg.gateway.api_keys) or 'none required'})",
        err=True,
    )
    if workers == 1:
        run(
            functools.partial(
                run_gateway,
                cfg,
                nats_url=nats_url,
                host=bind_host,
                port=bind_port,
                graceful_s=drain_s,
                log_level=log_level.lower(),
            )
        )
        return
    # Fail with one clear line if NATS is not there, before starting N processes.
    run(_check_nats, cfg, nats_url)
    # Each worker process rebuilds the app from the environment (app_from_env),
    # and writes its metrics where /metrics of any process can sum them.
    if config:
        os.environ[CONFIG_ENV] = os.path.abspath(config)
    if nats_url:
        os.environ[NATS_URL_ENV] = nats_url
    with tempfile.TemporaryDirectory(prefix="llmrelay-gateway-metrics-") as metrics_dir:
        os.environ[METRICS_DIR_ENV] = metrics_dir
        run_gateway_processes(
            cfg,
            "cli._gateway:app_from_env",
            workers=workers,
            host=bind_host,
            port=bind_port,
            log_level=log_level.lower(),
            graceful_s=drain_s,
        )


async def _check_nats(cfg: Config, nats_url: str | None) -> None:
    from gateway import Gateway

    async with Gateway(cfg, nats_url=nats_url):
        pass


def app_from_env() -> Starlette:
    """The app of one uvicorn worker process (``--workers N``)."""
    from gateway import create_app

    return create_app(
        config_from(None),
        nats_url=os.environ.get(NATS_URL_ENV),
        metrics_dir=os.environ.get(METRICS_DIR_ENV),
    )
