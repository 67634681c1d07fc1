"""The list of `llmrelay` command modules.

Each module (``cli/_<name>.py``) defines ``register(app)``, which adds its
commands to the typer app. Add a module by importing it here and appending it
to ``MODULES``; nothing else changes.
"""

from __future__ import annotations

from types import ModuleType

import typer

from cli import (
    _basic,
    _bench,
    _demo,
    _dlq,
    _embed,
    _gateway,
    _mock,
    _monitor,
    _status,
    _submit,
    _tail,
    _up,
    _worker,
)

# In the order `llmrelay --help` lists them.
MODULES: tuple[ModuleType, ...] = (
    _up,
    _basic,
    _worker,
    _mock,
    _demo,
    _submit,
    _embed,
    _gateway,
    _bench,
    _status,
    _tail,
    _dlq,
    _monitor,
)


def register(app: typer.Typer) -> None:
    """Let every command module add its commands to ``app``."""
    for module in MODULES:
        module.register(app)
