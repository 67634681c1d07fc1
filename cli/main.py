"""The `llmrelay` command: a thin typer app over broker/ and workers/.

Each group of commands lives in its own module (`cli/_*.py`) and registers
itself here; this module only assembles them and turns RelayError into one
clear line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import sys

import typer

from broker._errors import RelayError
from cli import _commands

app = typer.Typer(
    name="llmrelay",
    help=(
        "Queue-based broker for LLM calls on NATS JetStream.\n\n"
        "Start a server with `llmrelay up`, run a pool with `llmrelay worker --pool NAME`, "
        "send a request with `llmrelay submit 'Hello' --route chat`, watch with `llmrelay status`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keep `llmrelay` a command group even if only one command module is registered."""


_commands.register(app)


def main() -> None:
    try:
        app()
    except RelayError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
