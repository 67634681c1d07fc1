"""One way to write an llmrelay config document: for tests, the demo's tools and the bench.

Tests, the benchmark and the gateway TTFT run all need a config that points at
fake providers on ports picked at run time. ``ConfigDoc`` builds it section by
section and hands it out as the YAML a user would write (``write``), or parsed
by the real parser (``parse``), so generated configs go through the same
validation as hand-written ones and cannot drift from the schema:

    doc = ConfigDoc().pool("a", base_url=f"{mock.url}/v1").route("chat", [("a", "gpt")])
    cfg = doc.parse()  # or doc.write(path) for a worker process

Only what a caller sets is written; everything else keeps the schema's
defaults. Settings beyond the named ones pass through as keyword arguments,
under their names in the schema (``concurrency=4``, ``deadline_s=20``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import yaml

from broker import Config, parse_config

__all__ = ["ConfigDoc", "TargetSpec"]

TargetSpec = tuple[str, str] | Mapping[str, Any]
"""A route target: ``(pool, model)``, or the full mapping (``{"pool", "model", "rank"}``)."""


class ConfigDoc:
    """A config document under construction; each method sets one entry and returns ``self``."""

    def __init__(self) -> None:
        self._nats: dict[str, Any] = {}
        self._streams: dict[str, Any] = {}
        self._pools: dict[str, dict[str, Any]] = {}
        self._routes: dict[str, dict[str, Any]] = {}
        self._gateway: dict[str, Any] = {}
        self._tracing: dict[str, Any] = {}

    def nats(self, url: str, *, user: tuple[str, str] | None = None, **settings: Any) -> Self:
        """Where workers and clients connect; ``user`` is ``(name, password)``."""
        self._nats = {"url": url, **settings}
        if user is not None:
            self._nats |= {"user": user[0], "password": user[1]}
        return self

    def streams(self, **settings: Any) -> Self:
        """Stream settings, e.g. ``queue_capacity=100``; merged with those set before."""
        self._streams |= settings
        return self

    def pool(
        self,
        name: str,
        *,
        base_url: str,
        kind: str = "openai",
        api_key: str | None = None,
        **settings: Any,
    ) -> Self:
        """A provider pool (replaces one of the same name)."""
        key = {"api_key": api_key} if api_key is not None else {}
        self._pools[name] = {"kind": kind, "base_url": base_url, **key, **settings}
        return self

    def route(self, name: str, targets: Iterable[TargetSpec], **settings: Any) -> Self:
        """A route over ``targets`` in rank order (replaces one of the same name)."""
        self._routes[name] = {"targets": [_target(t) for t in targets], **settings}
        return self

    def gateway(self, *, port: int, api_keys: Iterable[str] = (), **settings: Any) -> Self:
        """The HTTP gateway's section."""
        self._gateway = {"port": port, "api_keys": list(api_keys), **settings}
        return self

    def tracing(self, **settings: Any) -> Self:
        """The ``tracing:`` section, e.g. ``exporter="console", file=path`` (README "Tracing")."""
        self._tracing = dict(settings)
        return self

    def as_dict(self) -> dict[str, Any]:
        """The document as plain data; sections nobody set are left out."""
        sections = {
            "nats": self._nats,
            "streams": self._streams,
            "pools": self._pools,
            "routes": self._routes,
            "gateway": self._gateway,
            "tracing": self._tracing,
        }
        return {key: value for key, value in sections.items() if value}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the YAML to ``path`` (for processes started with ``--config``); returns it."""
        target = Path(path)
        target.write_text(self.to_yaml())
        return target

    def parse(self, *, source: str = "<ConfigDoc>", env: dict[str, str] | None = None) -> Config:
        """The validated ``Config``, by the parser files go through (``${VAR}``: from ``env``)."""
        return parse_config(self.to_yaml(), source=source, env=env if env is not None else {})


def _target(spec: TargetSpec) -> dict[str, Any]:
    if isinstance(spec, tuple):
        pool, model = spec
        return {"pool": pool, "model": model}
    return dict(spec)
