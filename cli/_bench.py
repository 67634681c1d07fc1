"""`llmrelay bench`: run a named benchmark scenario (bench/) and print its figures."""

from __future__ import annotations

import shlex
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, cast

import typer


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Scenario (see --list).")] = "smoke",
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="Open-loop arrival rate, req/s (failover: rate during the kills)."
        ),
    ] = None,
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.1, help="Measured seconds of each phase.")
    ] = None,
    requests: Annotated[
        int | None, typer.Option(min=1, help="Jobs in a spike; failover: 503 samples.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Closed loop: clients; spike: publishes in flight.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes of the pool.")
    ] = None,
    slots: Annotated[
        int | None, typer.Option(min=1, help="Slots (concurrency) of each worker.")
    ] = None,
    loadgen_procs: Annotated[
        int | None, typer.Option("--loadgen-procs", min=1, help="Load-generator processes.")
    ] = None,
    tokens: Annotated[int | None, typer.Option(min=1, help="Chunks per answer.")] = None,
    provider_ttft_ms: Annotated[
        float | None, typer.Option(help="Fake provider: delay before the first token.")
    ] = None,
    provider_token_delay_ms: Annotated[
        float | None, typer.Option(help="Fake provider: delay between tokens.")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="Load shape of every phase: open, closed or burst.")
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Failover: SIGKILLs of the primary.")
    ] = None,
    warmup: Annotated[
        float | None, typer.Option("--warmup", help="Seconds sent before measuring.")
    ] = None,
    no_direct: Annotated[
        bool, typer.Option("--no-direct", help="Skip the direct (no broker) side.")
    ] = False,
    cluster: Annotated[
        int,
        typer.Option(
            "--cluster",
            min=1,
            max=5,
            help="nats-server nodes: 3 runs the broker side on a local 3-node cluster "
            "(as `llmrelay up --cluster 3`) with streams.replicas 3.",
        ),
    ] = 1,
    nats_conf: Annotated[
        Path | None,
        typer.Option(
            "--nats-conf",
            help="nats-server config file (default: nats.conf; nats-cluster.conf with "
            "--cluster), e.g. a copy with sync_interval: always.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here.")] = None,
    keep_dir: Annotated[
        Path | None, typer.Option(help="Keep logs, config and store in this directory.")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Profile the workers and gateway with py-spy (llmrelay[bench]) into this dir."
        ),
    ] = None,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets.")] = False,
) -> None:
    """Benchmark the broker against the fake provider, side by side with a direct run."""
    import anyio

    from bench import PRESETS, Overrides, apply_overrides, render_text, run_preset
    from bench._report import to_json

    if list_presets:
        for name, p in PRESETS.items():
            typer.echo(f"{name:14} {p.description}")
        typer.echo(f"{GATEWAY_PRESET:14} {GATEWAY_DESCRIPTION}")
        return
    if preset == GATEWAY_PRESET:
        _gateway(requests, tokens, provider_ttft_ms, json_out)
        return
    if preset not in PRESETS:
        known = ", ".join(PRESETS)
        raise typer.BadParameter(f"unknown preset (known: {known})", param_hint="--preset")
    overrides = Overrides(
        rate=rate,
        duration_s=duration,
        requests=requests,
        concurrency=concurrency,
        workers=workers,
        slots=slots,
        loadgen_procs=loadgen_procs,
        tokens=tokens,
        provider_ttft_ms=provider_ttft_ms,
        provider_token_delay_ms=provider_token_delay_ms,
        mode=_mode(mode),
        trials=trials,
        warmup_s=warmup,
        direct=False if no_direct else None,
    )
    if cluster == 2:
        raise typer.BadParameter("1 (one nats-server) or 3 to 5 nodes", param_hint="--cluster")
    chosen = apply_overrides(PRESETS[preset], overrides)
    command = "llmrelay " + shlex.join(sys.argv[1:])
    run = partial(
        run_preset, chosen, command=command, keep_dir=keep_dir, profile_dir=profile,
        nats_nodes=cluster, nats_conf=nats_conf.resolve() if nats_conf else None,
    )  # fmt: skip
    try:
        report = anyio.run(run)
    except KeyboardInterrupt:
        typer.secho("bench interrupted; every process it started was stopped", err=True)
        raise typer.Exit(130) from None
    data = to_json(report)
    if out is not None:
        out.write_bytes(data + b"\n")
    typer.echo(data.decode() if json_out else render_text(report))


GATEWAY_PRESET = "gateway"
GATEWAY_DESCRIPTION = (
    "time to first token through the OpenAI-compatible gateway (raw HTTP and the openai SDK) "
    "vs RelayClient, one request at a time, same run (bench/gateway_ttft.py)"
)


def _gateway(
    requests: int | None, tokens: int | None, ttft_ms: float | None, as_json: bool
) -> None:
    """The gateway preset: nats-server, fake provider, worker and gateway as processes."""
    from bench import gateway_ttft

    argv = ["--requests", str(requests or 300), "--tokens", str(tokens or 8)]
    argv += ["--ttft-ms", str(ttft_ms or 0.0), *(["--json"] if as_json else [])]
    gateway_ttft.main(argv)


def _mode(value: str | None) -> Literal["open", "closed", "burst"] | None:
    if value is None:
        return None
    if value not in ("open", "closed", "burst"):
        raise typer.BadParameter("open, closed or burst", param_hint="--mode")
    return cast(Literal["open", "closed", "burst"], value)
