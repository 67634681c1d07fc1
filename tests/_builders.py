"""Small builders for test configs (YAML through the real parser)."""

from __future__ import annotations

from typing import Any

import yaml

from broker import Config, parse_config


def make_config(
    pools: dict[str, dict[str, Any]],
    routes: dict[str, list[tuple[str, str]] | dict[str, Any]],
    *,
    streams: dict[str, Any] | None = None,
    nats_url: str = "nats://127.0.0.1:4222",
) -> Config:
    """pools: name -> pool settings; routes: name -> [(pool, model), ...] or full settings."""
    doc: dict[str, Any] = {
        "nats": {"url": nats_url},
        "streams": streams or {},
        "pools": {
            name: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", **settings}
            for name, settings in pools.items()
        },
        "routes": {
            name: (
                {"targets": [{"pool": p, "model": m} for p, m in spec]}
                if isinstance(spec, list)
                else spec
            )
            for name, spec in routes.items()
        },
    }
    return parse_config(yaml.safe_dump(doc), source="test", env={})
