"""`llmrelay dlq list | show | replay | purge`: the dead-letter queue.

Thin over ``broker._dlq``. Entries are named by their DLQ sequence number
(``12`` or ``#12``) or by request id. These commands need the operator's NATS
user (the config's, or ``--nats-url nats://worker:...``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

import anyio
import msgspec
import typer
from nats.aio.client import Client as NATS

from broker._config import Config
from broker._dlq import (
    DeadLetterEntry,
    dlq_counts,
    find_dead_letter,
    iter_dead_letters,
    purge,
    replay,
)
from broker._errors import RelayError
from cli._common import ConfigOpt, NatsUrlOpt, open_nats, optional_config

dlq_app = typer.Typer(
    help="Dead letters: jobs no pool could serve, with every attempt's error.",
    no_args_is_help=True,
)

RouteOpt = Annotated[
    str | None, typer.Option("--route", "-r", help="Only this route.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")


# --- list ---------------------------------------------------------------------------


@dlq_app.command("list")
def list_(
    route: RouteOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N.")] = 50,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Dead letters, oldest first: number, age, route, error code, request id, reason."""
    cfg = optional_config(config)
    entries, total = anyio.run(_list, cfg, nats_url, route, limit)
    if json_out:
        for e in entries:
            typer.echo(msgspec.json.encode(e).decode())
        return
    if not entries:
        typer.echo(f"no dead letters{f' for route {route}' if route else ''}")
        return
    typer.echo("\n".join(_list_lines(entries)))
    more = f" (showing the oldest {len(entries)}; --limit)" if total > len(entries) else ""
    typer.echo(f"{total} dead letter(s){more}")


async def _list(
    cfg: Config | None, nats_url: str | None, route: str | None, limit: int
) -> tuple[list[DeadLetterEntry], int]:
    async with _connection(cfg, nats_url) as nc:
        counts = await dlq_counts(nc)
        total = counts.get(route, 0) if route else sum(counts.values())
        entries: list[DeadLetterEntry] = []
        async for entry in iter_dead_letters(nc, route):
            entries.append(entry)
            if len(entries) >= limit:
                break
        return entries, total


def _list_lines(entries: list[DeadLetterEntry]) -> list[str]:
    """Two lines per entry: where and what, then why (fits any terminal width)."""
    now_ms = time.time() * 1000
    width = max(len(e.route) for e in entries)
    lines: list[str] = []
    for e in entries:
        letter = e.letter
        code = letter.code if letter else "?"
        reason = letter.message if letter else "not a DeadLetter (see `llmrelay dlq show`)"
        age = _age((now_ms - e.at_ms) / 1000)
        lines.append(f"#{e.seq:<5} {age:>4} ago  {e.route:<{width}}  {code}  {e.request_id or '-'}")
        lines.append(f"       {_one_line(reason, 150)}")
    return lines


# --- show ---------------------------------------------------------------------------


@dlq_app.command("show")
def show(
    ident: Annotated[str, typer.Argument(metavar="ID", help="DLQ number (#12) or request id.")],
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """One dead letter: why it died, every attempt, and the job (prompt included)."""
    cfg = optional_config(config)
    entry = anyio.run(_find, cfg, nats_url, ident)
    if json_out:
        typer.echo(msgspec.json.format(msgspec.json.encode(entry)).decode())
        return
    typer.echo("\n".join(_describe(entry)))


async def _find(cfg: Config | None, nats_url: str | None, ident: str) -> DeadLetterEntry:
    async with _connection(cfg, nats_url) as nc:
        return await find_dead_letter(nc, ident)


def _describe(e: DeadLetterEntry) -> list[str]:
    when = datetime.fromtimestamp(e.at_ms / 1000).isoformat(sep=" ", timespec="seconds")
    lines = [f"dead letter #{e.seq}  route {e.route}  at {when}"]
    if e.letter is None:
        return [*lines, "not a DeadLetter; raw message:", e.undecodable or ""]
    letter, job = e.letter, e.letter.job
    lines.append(f"  code:     {letter.code}")
    lines.append(f"  reason:   {letter.message}")
    if job is None:
        size = f"{letter.raw_bytes} bytes" if letter.raw_bytes else "size unknown"
        head = f"  job:      undecodable ({size}); escaped preview of its start:"
        return [*lines, head, f"    {letter.raw or ''}"]
    pinned = f" (pinned to pool {job.pool})" if job.pool else ""
    lines.append(f"  request:  {job.id}{pinned}")
    for i, a in enumerate(job.attempts, 1):
        status = f" HTTP {a.status}" if a.status else ""
        lines.append(
            f"  attempt {i}: {a.pool}/{a.model} {a.code}{status}: {_one_line(a.message, 90)}"
        )
    for m in job.messages:
        lines.append(f"  {m.role + ':':<9} {_one_line(m.content, 200)}")
    lines.append(f"replay it with: llmrelay dlq replay {e.seq}")
    return lines


# --- replay -------------------------------------------------------------------------


@dlq_app.command("replay")
def replay_(
    ident: Annotated[
        str | None,
        typer.Argument(metavar="ID", help="DLQ number (#12) or request id.", show_default=False),
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter (of --route, if given).")
    ] = False,
    route: RouteOpt = None,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Put dead jobs back on their queue with a fresh deadline (same request id).

    The job goes to llm.jobs.<route> (llm.pool.<pool> if it was pinned), its
    attempts cleared; the dead letter is deleted once the queue has it. Undecodable
    jobs and jobs for routes that no longer exist stay in the DLQ.
    """
    if (ident is None) == (not all_):
        raise typer.BadParameter("give one ID, or --all", param_hint="ID")
    cfg = optional_config(config)
    failed = anyio.run(_replay, cfg, nats_url, ident, route)
    raise typer.Exit(1 if failed else 0)


async def _replay(
    cfg: Config | None, nats_url: str | None, ident: str | None, route: str | None
) -> int:
    async with _connection(cfg, nats_url) as nc:
        if ident is not None:
            entries = [await find_dead_letter(nc, ident)]
        else:
            entries = [e async for e in iter_dead_letters(nc, route)]
        failed = 0
        for entry in entries:
            try:
                done = await replay(nc, entry, cfg)
            except RelayError as exc:
                failed += 1
                typer.secho(f"#{entry.seq}: not replayed: {exc}", fg="red", err=True)
                continue
            typer.echo(f"#{done.seq}: request {done.request_id} -> {done.subject}")
        if ident is None:
            typer.echo(f"replayed {len(entries) - failed} of {len(entries)} dead letter(s)")
        return failed


# --- purge --------------------------------------------------------------------------


@dlq_app.command("purge")
def purge_(
    route: RouteOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Delete every dead letter (of --route, if given). Asks first unless --yes."""
    what = f"every dead letter of route {route}" if route else "every dead letter"
    if not yes and not typer.confirm(f"Delete {what}?"):
        raise typer.Exit(1)
    cfg = optional_config(config)
    purged = anyio.run(_purge, cfg, nats_url, route)
    typer.echo(f"purged {purged} dead letter(s)")


async def _purge(cfg: Config | None, nats_url: str | None, route: str | None) -> int:
    async with _connection(cfg, nats_url) as nc:
        return await purge(nc, route)


# --- helpers ------------------------------------------------------------------------


@asynccontextmanager
async def _connection(cfg: Config | None, nats_url: str | None) -> AsyncIterator[NATS]:
    nc = await open_nats(nats_url, cfg, "llmrelay-dlq")
    try:
        yield nc
    finally:
        await nc.close()


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
