"""`llmrelay schema` and `llmrelay config check`."""

from __future__ import annotations

import json

import typer

from broker._cost import Price
from broker._errors import ERROR_CODES
from broker._nats import redact
from broker._schema import json_schema
from broker._tracing import TracingSettings
from cli._common import ConfigOpt, config_from

config_app = typer.Typer(help="Inspect and validate the config file.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
    app.add_typer(config_app, name="config")


def schema(
    codes: bool = typer.Option(False, "--codes", help="Print the error-code table instead."),
) -> None:
    """Print the JSON Schema of jobs and reply events (for clients in other languages)."""
    if codes:
        for code, (desc, retryable, status) in ERROR_CODES.items():
            typer.echo(f"{code:<26} {status}  {'retryable' if retryable else 'final    '}  {desc}")
        return
    typer.echo(json.dumps(json_schema(), indent=2))


@config_app.command("check")
def check(config: ConfigOpt = None) -> None:
    """Validate a config file; print a summary of pools and routes."""
    cfg = config_from(config)
    nats_url = redact(cfg.nats.url)
    typer.echo(f"ok: {len(cfg.pools)} pools, {len(cfg.routes)} routes, nats {nats_url}")
    for name, pool in cfg.pools.items():
        limits = f"rpm={pool.rpm or '-'} tpm={pool.tpm or '-'}"
        where = redact(pool.base_url)
        typer.echo(f"  pool {name}: {pool.kind} {where} slots={pool.concurrency} {limits}")
    for name, route in cfg.routes.items():
        ranked = sorted(route.ranks(), key=lambda rt: rt[0])
        chain = " -> ".join(f"{t.pool}/{t.model}{_price(t.price)}" for _, t in ranked)
        order = ", order=price" if route.order == "price" else ""
        typer.echo(
            f"  route {name}: {chain} (spill={route.spill}{order}, deadline {route.deadline_s:g}s)"
        )
    if cfg.tracing.enabled:
        typer.echo(f"  tracing: {_tracing(cfg.tracing)}")


def _tracing(t: TracingSettings) -> str:
    """Where spans go, e.g. ``otlp to http://collector:4318/v1/traces, sample_ratio=1``."""
    if t.exporter == "console":
        where = t.file or "stdout"
    else:
        where = redact(t.endpoint) if t.endpoint else "the OTEL_EXPORTER_OTLP_* endpoint"
    content = ", record_content" if t.record_content else ""
    return f"{t.exporter} to {where}, sample_ratio={t.sample_ratio:g}{content}"


def _price(price: Price | None) -> str:
    """`` [$in/$out/$cached per Mtok]``, or `` [price unknown]``."""
    if price is None:
        return " [price unknown]"
    cached = "" if price.cached_input_per_mtok is None else f"/${price.cached_input_per_mtok:g}"
    return f" [${price.input_per_mtok:g}/${price.output_per_mtok:g}{cached} per Mtok]"
