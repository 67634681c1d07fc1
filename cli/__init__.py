"""The `llmrelay` command line: a thin typer app (``cli.main``) over the other packages.

Nothing is exported: the entry point is ``cli.main:main`` (pyproject.toml).
"""

__all__: list[str] = []
