"""Options and helpers shared by the command modules."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import typer
from nats.aio.client import Client as NATS

from broker._config import CONFIG_ENV, Config, NatsSettings, load_config
from broker._nats import connect

T = TypeVar("T")

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        envvar="LLMRELAY_CONFIG",
        help="Config file (default ./llmrelay.yaml).",
        show_default=False,
    ),
]
NatsUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        envvar="LLMRELAY_NATS_URL",
        help="NATS URL, e.g. nats://client:client-secret@127.0.0.1:4222 "
        "(default: nats.url from the config).",
        show_default=False,
    ),
]
JsonLogsOpt = Annotated[
    bool, typer.Option("--json-logs", envvar="LLMRELAY_JSON_LOGS", help="Log JSON lines to stderr.")
]
LogLevelOpt = Annotated[
    str,
    typer.Option("--log-level", envvar="LLMRELAY_LOG_LEVEL", help="debug, info, warning, error."),
]


def config_from(path: str | None) -> Config:
    return load_config(path)


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an async entry point on asyncio (nats-py needs asyncio)."""
    return anyio.run(fn, *args)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields (request_id, route, pool, attempt) included."""

    _FIELDS = ("request_id", "route", "pool", "attempt", "worker_id")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in self._FIELDS:
            if hasattr(record, field):
                out[field] = getattr(record, field)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(json_logs: bool, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llmrelay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def optional_config(path: str | None) -> Config | None:
    """The config from --config/$LLMRELAY_CONFIG (must exist), else ./llmrelay.yaml if present."""
    if path or os.environ.get(CONFIG_ENV):
        return load_config(path)
    return load_config() if os.path.exists("llmrelay.yaml") else None


async def open_nats(nats_url: str | None, cfg: Config | None, name: str) -> NATS:
    """Connect with --nats-url (its own credentials), else the config's URL and credentials."""
    return await connect(cfg.nats if cfg else NatsSettings(), url=nats_url, name=name)
