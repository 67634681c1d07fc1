"""`llmrelay tail`: follow one request's events, or every request's lifecycle.

``tail ID`` replays the request's reply subject from ``LLM_REPLIES`` (kept for
``streams.replies_max_age_s``) with an ordered consumer, from its first event,
then follows it live until ``done`` or ``error``: started after the request
ended it prints the whole answer at once. The answer goes to stdout and the
rest to stderr, as with ``submit``, and the exit code is ``submit``'s. Only
events that count are shown (``broker/_fold.py``): those of the current
attempt of the run being followed, never a superseded attempt's late text or
``done``, nor another job's events on the same subject.

``tail`` without an ID prints one line per lifecycle event (``llm.events.*``:
retry, failover, done, failed, dead) of every request, optionally filtered.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated

import anyio
import msgspec
import typer
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy

from broker._config import Config
from broker._errors import DeadlineExceeded, RelayError, RequestFailed
from broker._fold import Fold
from broker._protocol import Done, Error, LifecycleEvent, decode_events, decode_lifecycle
from broker._status import stream_info
from broker._subjects import EVENTS_PREFIX, EVENTS_STREAM, REPLIES_STREAM, reply_subject
from cli._common import ConfigOpt, NatsUrlOpt, open_nats, optional_config
from cli._submit import EXIT_FAILED, EXIT_OK, EXIT_USAGE, JsonView, TextView, View, exit_code_for

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(app: typer.Typer) -> None:
    app.command("tail")(tail)


def tail(
    request_id: Annotated[
        str | None,
        typer.Argument(
            metavar="REQUEST_ID",
            help="A request id (printed by `submit`); without it, follow every request.",
            show_default=False,
        ),
    ] = None,
    route: Annotated[
        str | None, typer.Option("--route", "-r", help="Only this route.", show_default=False)
    ] = None,
    pool: Annotated[
        str | None, typer.Option("--pool", "-p", help="Only this pool.", show_default=False)
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Without an ID: first replay events this old, e.g. 30s, 5m, 1h.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.001, help="With an ID: give up after this many seconds."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print every event as one JSON line.")
    ] = False,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Replay and follow one request's events, or follow all requests' lifecycle events.

    With REQUEST_ID: the answer is printed from its first token, also when the
    request finished before (while LLM_REPLIES keeps it), and followed until it
    ends; exit codes as for `submit`. Without: one line per retry, failover,
    done, failed and dead event of any request, until Ctrl-C.
    """
    cfg = optional_config(config)
    start_s = time.time() - _parse_duration(since) if since else None
    try:
        if request_id is not None:
            code = anyio.run(_tail_request, cfg, nats_url, request_id, timeout, json_out)
        else:
            code = anyio.run(_tail_all, cfg, nats_url, route, pool, start_s, json_out)
    except KeyboardInterrupt:
        code = EXIT_OK
    raise typer.Exit(code)


def _parse_duration(text: str) -> float:
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise typer.BadParameter(
            f"{text!r} is not a duration like 30s, 5m, 1h", param_hint="--since"
        )
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]


# --- one request ---------------------------------------------------------------------


async def _tail_request(
    cfg: Config | None, nats_url: str | None, request_id: str, timeout: float | None, as_json: bool
) -> int:
    view: View = JsonView() if as_json else TextView(stream=True)
    view.request_id = request_id
    try:
        nc = await open_nats(nats_url, cfg, "llmrelay-tail")
    except RelayError as exc:
        return view.failed(exc, EXIT_USAGE)
    try:
        await _say_where(nc, request_id, as_json)
        return await _follow_replies(nc, request_id, view, timeout)
    except RelayError as exc:
        return view.failed(exc, exit_code_for(exc.code, EXIT_USAGE))
    finally:
        await nc.close()


async def _say_where(nc: NATS, request_id: str, as_json: bool) -> None:
    """One stderr line: is there anything to replay?"""
    info = await stream_info(nc, REPLIES_STREAM, subjects_filter=reply_subject(request_id))
    stored = int((info["state"].get("subjects") or {}).get(reply_subject(request_id), 0))
    if as_json:
        return
    if stored:
        line = f"request {request_id}: replaying {stored} stored message(s)"
        typer.secho(line, dim=True, err=True)
        return
    kept_s = int(info["config"].get("max_age", 0)) / 1e9
    typer.secho(
        f"request {request_id}: no events yet; waiting (still queued, or unknown, or "
        f"older than the {kept_s:g}s replies are kept)",
        dim=True,
        err=True,
    )


async def _follow_replies(nc: NATS, request_id: str, view: View, timeout: float | None) -> int:
    sub = await nc.jetstream().subscribe(
        reply_subject(request_id),
        stream=REPLIES_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    deadline = time.monotonic() + timeout if timeout else None
    fold = Fold()  # the run being followed: the job of its first event
    try:
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                msg = await sub.next_msg(timeout=left)
            except NatsTimeout as exc:
                raise DeadlineExceeded(
                    f"request {request_id} did not end within {timeout:g}s"
                ) from exc
            for event in decode_events(msg.data):  # a done may carry its final chunk
                if not fold.accepts(event):
                    continue  # a superseded attempt's, or another job's
                fold.add(event)
                if isinstance(event, Done | Error) and msg.metadata.num_pending > 0:
                    view.superseded(event)  # a run that ended; `dlq replay` ran it again
                    fold = Fold()
                    continue
                view.event(event)
                if isinstance(event, Done):
                    return EXIT_OK
                if isinstance(event, Error):
                    err = RequestFailed(event.code, event.message)
                    return view.failed(err, exit_code_for(event.code, EXIT_FAILED), printed=True)
    finally:
        await sub.unsubscribe()


# --- every request -------------------------------------------------------------------


async def _tail_all(
    cfg: Config | None,
    nats_url: str | None,
    route: str | None,
    pool: str | None,
    start_s: float | None,
    as_json: bool,
) -> int:
    nc = await open_nats(nats_url, cfg, "llmrelay-tail")
    try:
        sub = await nc.jetstream().subscribe(
            f"{EVENTS_PREFIX}.>",
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            config=_start_at(start_s),
        )
        typer.secho("following lifecycle events (Ctrl-C to stop)", dim=True, err=True)
        while True:
            msg = await sub.next_msg(timeout=None)
            try:
                event = decode_lifecycle(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            if (route and event.route != route) or (pool and event.pool != pool):
                continue
            typer.echo(msgspec.json.encode(event).decode() if as_json else lifecycle_line(event))
    finally:
        await nc.close()


def _start_at(start_s: float | None) -> ConsumerConfig:
    if start_s is None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    when = datetime.fromtimestamp(start_s, UTC)
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=when)


def lifecycle_line(e: LifecycleEvent) -> str:
    """``07:31:02.123 done     <request id> route=chat pool=mock-a  <detail>``."""
    at = datetime.fromtimestamp(e.at_ms / 1000) if e.at_ms else datetime.now()
    stamp = at.strftime("%H:%M:%S.") + f"{at.microsecond // 1000:03d}"
    where = f"route={e.route or '-'} pool={e.pool or '-'}"
    return f"{stamp} {e.kind:<8} {e.request_id or '-':<32} {where}  {e.detail}"
