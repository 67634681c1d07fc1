"""`llmrelay embed`: embed texts on a route and print their vectors.

stdout carries one JSON array of numbers per text, in order (one line each);
who answered and the usage go to stderr. The exit codes are `llmrelay submit`'s.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import anyio
import typer

from broker._client import RelayClient
from broker._config import Config
from broker._errors import RelayError
from cli._common import ConfigOpt, NatsUrlOpt, open_nats, optional_config
from cli._submit import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exit_code_for


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)


def embed(
    route: Annotated[
        str, typer.Option("--route", "-r", help="An embeddings route.", show_default=False)
    ],
    texts: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="TEXT...", help="The texts; none: one per line of stdin.", show_default=False
        ),
    ] = None,
    dimensions: Annotated[
        int | None,
        typer.Option("--dimensions", min=1, help="Shorter vectors, where the model can."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.001, help="Seconds until the request's deadline."),
    ] = None,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Embed texts on a route: one JSON array of numbers per text on stdout."""
    inputs = list(texts) if texts else [line for line in sys.stdin.read().splitlines() if line]
    if not inputs:
        raise typer.BadParameter("give a TEXT, or lines on stdin", param_hint="TEXT")
    try:
        cfg = optional_config(config)
        code = anyio.run(_embed, route, inputs, dimensions, timeout, cfg, nats_url)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)


async def _embed(
    route: str,
    inputs: list[str],
    dimensions: int | None,
    timeout_s: float | None,
    cfg: Config | None,
    nats_url: str | None,
) -> int:
    try:
        nc = await open_nats(nats_url, cfg, "llmrelay-embed")
    except RelayError as exc:
        return _failed(exc, EXIT_USAGE)
    try:
        async with RelayClient(config=cfg, nc=nc) as relay:
            result = await relay.embed(route, inputs, dimensions=dimensions, timeout_s=timeout_s)
    except RelayError as exc:
        return _failed(exc, exit_code_for(exc.code, EXIT_FAILED))
    finally:
        await nc.close()
    for vector in result.vectors:
        typer.echo(json.dumps(vector))
    size = len(result.vectors[0]) if result.vectors else 0
    typer.secho(f"done: {result.pool}/{result.model}, {len(result.vectors)} vectors of {size}, "
                f"{result.usage.prompt_tokens} prompt tokens", dim=True, err=True)  # fmt: skip
    return EXIT_OK


def _failed(exc: RelayError, code: int) -> int:
    typer.secho(f"error: {exc.code}: {' '.join(exc.message.split())}", fg="red", err=True)
    return code
