"""`llmrelay mock-provider`: run the fake LLM provider as its own process.

The benchmark and manual experiments want the fake upstream on its own core;
tests usually run ``devstack.MockProvider`` in-process instead.
With ``--port 0`` the bound URL is printed on one stdout line so that a parent
process can read it.
"""

from __future__ import annotations

import asyncio

import typer

from devstack import DEFAULT_TOKENS, MockProvider, parse_fault, serve


def register(app: typer.Typer) -> None:
    app.command("mock-provider")(mock_provider)


def mock_provider(
    port: int = typer.Option(0, "--port", help="TCP port; 0 picks a free one (printed)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    name: str = typer.Option("mock", "--name", help="Name put into every answer."),
    ttft_ms: float = typer.Option(0.0, "--ttft-ms", help="Delay before the first token."),
    token_delay_ms: float = typer.Option(0.0, "--token-delay-ms", help="Delay between tokens."),
    tokens: int = typer.Option(DEFAULT_TOKENS, "--tokens", help="Tokens per answer."),
    fault: str = typer.Option(
        "", "--fault", help="Default fault, e.g. 'status=503+retry_after=2' or a JSON object."
    ),
) -> None:
    """Serve a fake OpenAI/Anthropic/Ollama provider with injectable faults."""
    try:
        parsed = parse_fault(fault or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fault") from exc
    mock = MockProvider(
        name=name,
        host=host,
        port=port,
        tokens=tokens,
        ttft_ms=ttft_ms,
        token_delay_ms=token_delay_ms,
        fault=parsed,
    )
    asyncio.run(serve(mock))
