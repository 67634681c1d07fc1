"""`llmrelay submit`: send one request and stream its answer to the terminal.

stdout carries only the answer (or, with ``--json``, one JSON object per
event); everything else (request id, retries, failovers, the summary, errors)
goes to stderr, so ``llmrelay submit ... > answer.txt`` keeps a clean answer.
The exit code says how the request ended (``EXIT_CODES``).
"""

from __future__ import annotations

import sys
from typing import Annotated

import anyio
import msgspec
import typer

from broker._client import JobHandle, JobOptions, RelayClient
from broker._config import Config
from broker._errors import DeadlineExceeded, QueueFull, RelayError, RequestFailed, UnknownRoute
from broker._fold import Answer
from broker._protocol import Chunk, Done, Error, Event, Notice, encode
from cli._common import ConfigOpt, NatsUrlOpt, open_nats, optional_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_QUEUE_FULL = 3
EXIT_UNKNOWN_ROUTE = 4
EXIT_DEADLINE = 5
EXIT_INTERRUPTED = 130

# Exit code by error code; any other error code of a request is EXIT_FAILED,
# any other error raised before the request was queued is EXIT_USAGE.
_EXIT_BY_CODE = {
    QueueFull.code: EXIT_QUEUE_FULL,
    UnknownRoute.code: EXIT_UNKNOWN_ROUTE,
    DeadlineExceeded.code: EXIT_DEADLINE,
}

EXIT_CODES = [
    (EXIT_OK, "the answer is complete"),
    (EXIT_FAILED, "the request failed: an error event such as all_providers_failed, bad_request"),
    (EXIT_USAGE, "usage, config or connection error (nothing was sent)"),
    (EXIT_QUEUE_FULL, "queue_full: the route's queue is at capacity; retry later"),
    (EXIT_UNKNOWN_ROUTE, "unknown_route: no such route or pool on this broker"),
    (EXIT_DEADLINE, "deadline_exceeded: no complete answer before the deadline (--timeout)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C): the request was cancelled"),
]


def exit_code_for(error_code: str, default: int) -> int:
    """The exit code for an error code (``default`` for codes without their own)."""
    return _EXIT_BY_CODE.get(error_code, default)


# Rich help joins single newlines: one paragraph per line.
_EPILOG = "\n\n".join(["Exit codes:", *(f"{code:<4} {text}" for code, text in EXIT_CODES)])


def register(app: typer.Typer) -> None:
    app.command("submit", epilog=_EPILOG)(submit)


class SubmitOptions(msgspec.Struct, kw_only=True):
    prompt: str
    route: str
    pool: str | None
    system: str | None
    max_tokens: int | None
    temperature: float | None
    timeout_s: float | None
    stream: bool
    json: bool


def submit(
    route: Annotated[
        str,
        typer.Option(
            "--route", "-r", help="Route to ask (a key of `routes:`).", show_default=False
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Argument(
            metavar="PROMPT",
            help="The prompt; `-` (or nothing, with piped input) reads it from stdin.",
            show_default=False,
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option("--pool", "-p", help="Pin to one pool (no failover).", show_default=False),
    ] = None,
    system: Annotated[
        str | None, typer.Option("--system", "-s", help="System prompt.", show_default=False)
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Completion limit.", show_default=False),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", min=0.0, help="Sampling temperature.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.001,
            help="Seconds until the request's deadline (default: the route's deadline_s, or 120).",
            show_default=False,
        ),
    ] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the answer once complete, not as it arrives.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print every event as one JSON line on stdout.")
    ] = False,
    config: ConfigOpt = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Send one request to a route and stream the answer to stdout as it arrives.

    The request id, retries, failovers and a summary go to stderr. If a pool
    fails mid-answer and another one restarts it, the streamed text is marked
    void on stderr; --no-stream prints only the final, clean answer.
    """
    text = _read_prompt(prompt)
    options = SubmitOptions(
        prompt=text,
        route=route,
        pool=pool,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        timeout_s=timeout,
        stream=not no_stream,
        json=json_out,
    )
    try:
        cfg = optional_config(config)
        code = anyio.run(_submit, options, cfg, nats_url)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)


def _read_prompt(prompt: str | None) -> str:
    if prompt is None and sys.stdin.isatty():
        raise typer.BadParameter("give a PROMPT, or `-` to read it from stdin", param_hint="PROMPT")
    text = sys.stdin.read() if prompt in (None, "-") else str(prompt)
    if not text.strip():
        raise typer.BadParameter("the prompt is empty", param_hint="PROMPT")
    return text


async def _submit(options: SubmitOptions, cfg: Config | None, nats_url: str | None) -> int:
    view: View = JsonView() if options.json else TextView(stream=options.stream)
    try:
        nc = await open_nats(nats_url, cfg, "llmrelay-submit")
    except RelayError as exc:
        return view.failed(exc, EXIT_USAGE)
    try:
        async with RelayClient(config=cfg, nc=nc) as relay:
            return await _ask(relay, options, view)
    finally:
        await nc.close()


async def _ask(relay: RelayClient, options: SubmitOptions, view: View) -> int:
    try:
        handle = await relay.submit(
            options.prompt,
            route=options.route,
            pool=options.pool,
            system=options.system,
            timeout_s=options.timeout_s,
            options=JobOptions(max_tokens=options.max_tokens, temperature=options.temperature),
        )
    except RelayError as exc:
        return view.failed(exc, exit_code_for(exc.code, EXIT_USAGE))
    view.started(handle)
    try:
        return await _follow(handle, view)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await handle.cancel()
            await relay.nc.flush()
        view.interrupted()
        typer.echo(f"cancelled: request {handle.id}", err=True)
        raise


async def _follow(handle: JobHandle, view: View) -> int:
    try:
        async for event in handle.events():
            view.event(event)
    except RelayError as exc:
        return view.failed(exc, exit_code_for(exc.code, EXIT_FAILED))
    if view.answer.error is not None:
        e = view.answer.error
        err = RequestFailed(e.code, e.message)
        return view.failed(err, exit_code_for(e.code, EXIT_FAILED), printed=True)
    return EXIT_OK


# --- views --------------------------------------------------------------------------


class View:
    """How events reach the terminal."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.request_id = ""

    def started(self, handle: JobHandle) -> None:
        self.request_id = handle.id

    def event(self, event: Event) -> None:
        raise NotImplementedError

    def interrupted(self) -> None:
        """Ctrl-C: end a half-printed line."""

    def superseded(self, end: Done | Error) -> None:
        """An earlier run of the request ended here, and a later one follows (replay)."""
        how = "done" if isinstance(end, Done) else f"error {end.code}"
        _note(f"[an earlier run ended ({how}); the request was run again]")
        self.answer = Answer()

    def failed(self, exc: RelayError, code: int, *, printed: bool = False) -> int:
        """Print the one error line on stderr; return ``code``."""
        known = not self.request_id or self.request_id in exc.message
        where = "" if known else f" (request {self.request_id})"
        message = " ".join(exc.message.split())
        typer.secho(f"error: {exc.code}: {message}{where}", fg="red", err=True)
        return code


class TextView(View):
    """The answer on stdout; request id, notices and the summary on stderr."""

    def __init__(self, *, stream: bool) -> None:
        super().__init__()
        self.stream = stream
        self.printed = ""  # text of the current attempt already on stdout
        self.last_notice = ""
        # Notes about a continued answer, said after it: the text on stdout goes on.
        self.deferred: list[str] = []

    def started(self, handle: JobHandle) -> None:
        super().started(handle)
        job = handle.job
        where = f"pool {job.pool}" if job.pool else f"route {job.route}"
        _note(f"request {handle.id} on {where}")

    def event(self, event: Event) -> None:
        before = self.answer.attempt
        self.answer.add(event)
        if isinstance(event, Chunk):
            self._chunk(event, restarted=self.answer.attempt != before)
        elif isinstance(event, Notice):
            self._notice(event)
        elif isinstance(event, Done):
            self._done(event)

    def _chunk(self, chunk: Chunk, *, restarted: bool) -> None:
        if not self.stream:
            return
        if restarted and self.printed:
            self._void("a newer attempt restarted the answer")
        typer.echo(chunk.delta, nl=False)
        self.printed += chunk.delta

    def _notice(self, n: Notice) -> None:
        if n.resume and self.printed and self.stream:
            self.deferred.append(_describe(n))  # mid-line: said once the answer is out
            self.last_notice = n.kind
            return
        void = bool(n.reset and self.printed and self.stream)
        if void:
            typer.echo("")  # end the half-printed line before talking about it
        # A retry is always followed by its redelivery: one line says it all.
        if not (n.kind == "redelivered" and self.last_notice == "retry"):
            _note(_describe(n))
        self.last_notice = n.kind
        if void:
            self._void("the answer restarts", line_ended=True)

    def interrupted(self) -> None:
        if self.printed and not self.printed.endswith("\n"):
            typer.echo("")
        self._say_deferred()

    def failed(self, exc: RelayError, code: int, *, printed: bool = False) -> int:
        self.interrupted()
        self.printed = ""
        return super().failed(exc, code, printed=printed)

    def _say_deferred(self) -> None:
        for line in self.deferred:
            _note(line)
        self.deferred.clear()

    def superseded(self, end: Done | Error) -> None:
        if self.printed:
            typer.echo("")
        self.printed = ""
        super().superseded(end)

    def _void(self, why: str, *, line_ended: bool = False) -> None:
        if not line_ended:
            typer.echo("")
        _note(f"[{why}: the text above is void]")
        self.printed = ""

    def _done(self, done: Done) -> None:
        text = self.answer.text
        if not self.stream:
            typer.echo(text, nl=not text.endswith("\n"))
        elif self.printed and not self.printed.endswith("\n"):
            typer.echo("")
        self._say_deferred()
        _note(_summary(done, self.request_id))


class JsonView(View):
    """One JSON object per line on stdout: ``submitted``, then every event."""

    def started(self, handle: JobHandle) -> None:
        super().started(handle)
        job = handle.job
        line = {
            "type": "submitted",
            "request_id": job.id,
            "route": job.route,
            "pool": job.pool,
            "deadline_ms": job.deadline_ms,
        }
        typer.echo(msgspec.json.encode(line).decode())

    def event(self, event: Event) -> None:
        self.answer.add(event)
        typer.echo(encode(event).decode())

    def superseded(self, end: Done | Error) -> None:
        typer.echo(encode(end).decode())
        self.answer = Answer()

    def failed(self, exc: RelayError, code: int, *, printed: bool = False) -> int:
        if not printed:  # a client-side failure ends the JSON stream with an error too
            typer.echo(encode(Error(code=exc.code, message=exc.message)).decode())
        return super().failed(exc, code)


def _note(text: str) -> None:
    typer.secho(text, dim=True, err=True)


def _describe(n: Notice) -> str:
    why = f": {n.message}" if n.message else ""
    if n.kind == "retry":
        delay = f" in {n.delay_ms / 1000:g}s" if n.delay_ms is not None else ""
        return f"retry on {n.from_pool}{delay} (attempt {n.attempt}){why}"
    if n.kind == "failover":
        return f"failover {n.from_pool} -> {n.to_pool} (attempt {n.attempt}){why}"
    return f"{n.kind} (attempt {n.attempt}){why}"


def _summary(done: Done, request_id: str) -> str:
    u, t = done.usage, done.timings
    parts = [
        f"done: {done.pool}/{done.model} ({done.finish_reason})",
        f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens",
    ]
    if t.ttft_ms is not None:
        parts.append(f"first token {t.ttft_ms:.0f} ms")
    parts.append(f"total {t.total_ms:.0f} ms, queued {t.queued_ms:.0f} ms")
    if done.attempts:
        parts.append(f"after {len(done.attempts)} failed attempt(s)")
    if done.degraded:
        parts.append("DEGRADED: undecodable upstream events were skipped")
    return ", ".join(parts) + f"; request {request_id}"
