"""The list of `llmrelay` command modules.

Each module in ``_MODULES`` (``cli/<name>.py``) defines ``register(app)``, which
adds its commands to the typer app. Add a module by appending its name to the
list; nothing else here changes.
"""

from __future__ import annotations

import importlib

import typer

_MODULES = [
    "_up",
    "_basic",
    "_worker",
    "_mock",
    "_demo",
    "_submit",
    "_gateway",
    "_bench",
    "_status",
    "_tail",
    "_dlq",
    "_monitor",
]


def register(app: typer.Typer) -> None:
    """Import every command module and let it add its commands to ``app``."""
    for name in _MODULES:
        module = importlib.import_module(f"cli.{name}")
        module.register(app)
