"""``make_config``: the tests' short way to a ``Config``, built by devstack's ``ConfigDoc``.

Tests name only what they are about (pools' limits, route targets); every pool
gets an unreachable default upstream, and the document goes through the real
parser as a user's YAML would.
"""

from __future__ import annotations

from typing import Any

from broker import Config
from devstack import ConfigDoc

UNREACHABLE = "http://127.0.0.1:9/v1"


def make_config(
    pools: dict[str, dict[str, Any]],
    routes: dict[str, list[tuple[str, str]] | dict[str, Any]],
    *,
    streams: dict[str, Any] | None = None,
    nats_url: str = "nats://127.0.0.1:4222",
) -> Config:
    """pools: name -> pool settings; routes: name -> [(pool, model), ...] or full settings."""
    doc = ConfigDoc().nats(nats_url).streams(**(streams or {}))
    for name, settings in pools.items():
        doc.pool(name, **{"base_url": UNREACHABLE, **settings})
    for name, spec in routes.items():
        if isinstance(spec, list):
            doc.route(name, spec)
        else:
            doc.route(name, **spec)
    return doc.parse(source="test")
