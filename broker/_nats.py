"""The NATS boundary: connecting, choosing credentials, and translating nats errors.

Every llmrelay process connects through ``connect`` (or ``connect_nats`` with
explicit credentials), and every ``nats.errors.Error`` that the code above this
module could see is turned into a ``RelayError`` here, with ``raise ... from``:

    with nats_errors("publish to llm.jobs.chat"):
        await js.publish(...)

so the gateway and the CLI catch ``RelayError`` only. Credentials are chosen in
one place (``credentials``): credentials in the URL win; else the caller's own
user (the gateway's ``client`` user); else ``nats.user``/``password``/``token``/
``creds_file`` from the config.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError, NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from broker._config import NatsSettings, Secret
from broker._errors import (
    BrokerUnavailable,
    ConnectFailed,
    PayloadTooLarge,
    QueueFull,
    RelayError,
)
from broker._subjects import CLIENT_INBOX_PREFIX, JOBS_STREAM

# JetStream error codes (server/errors.json).
ERR_MAX_MSGS_PER_SUBJECT = 10077
ERR_MSG_SIZE = 10054

Reconnected = Callable[[], Awaitable[None]]


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """What one connection authenticates with; ``repr`` shows no secret."""

    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    creds_file: str | None = None


def url_has_credentials(url: str) -> bool:
    return "@" in urlsplit(url.split(",", 1)[0].strip()).netloc


def credentials(
    url: str,
    settings: NatsSettings,
    *,
    user: str | None = None,
    password: Secret | None = None,
) -> Credentials:
    """The one rule: URL credentials, else the caller's ``user``, else the config's."""
    if url_has_credentials(url):
        return Credentials()
    if user is not None:
        return Credentials(user=user, password=password)
    return Credentials(
        user=settings.user,
        password=settings.password,
        token=settings.token,
        creds_file=settings.creds_file,
    )


async def connect(
    settings: NatsSettings,
    *,
    url: str | None = None,
    name: str = "llmrelay",
    user: str | None = None,
    password: Secret | None = None,
    inbox_prefix: str = CLIENT_INBOX_PREFIX,
    reconnected: Reconnected | None = None,
) -> NATS:
    """Connect to ``url`` (default ``settings.url``) with the credentials the rule picks."""
    url = url or settings.url
    creds = credentials(url, settings, user=user, password=password)
    return await connect_nats(
        url,
        name=name,
        timeout_s=settings.connect_timeout_s,
        user=creds.user,
        password=creds.password.reveal() if creds.password else None,
        token=creds.token.reveal() if creds.token else None,
        creds_file=creds.creds_file,
        inbox_prefix=inbox_prefix,
        reconnected=reconnected,
    )


async def connect_nats(
    url: str,
    *,
    name: str = "llmrelay",
    timeout_s: float = 2.0,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds_file: str | None = None,
    inbox_prefix: str = CLIENT_INBOX_PREFIX,
    reconnected: Reconnected | None = None,
) -> NATS:
    """Connect to NATS or raise ``ConnectFailed`` with one clear line.

    Workers pass a private ``inbox_prefix``: jobs are pulled into inboxes, and
    clients may subscribe to ``_INBOX.>`` (nats.conf), so a worker's inboxes
    must live elsewhere or any client could read other users' prompts.
    Later reconnects are retried forever (``reconnected`` is called after each).
    """
    first = _FirstConnect(servers=url.count(",") + 1)

    async def quiet(exc: Exception) -> None:
        first.failed(exc)

    async def _connect() -> NATS:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=timeout_s,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=quiet,
            user=user,
            password=password,
            token=token,
            user_credentials=creds_file,
            inbox_prefix=inbox_prefix,
            reconnected_cb=reconnected,
        )

    try:
        return await first.run(_connect(), timeout_s=timeout_s * first.servers + 0.5)
    except (NoServersError, OSError, NatsTimeout) as exc:
        cause = first.error or exc
        if isinstance(cause, nats.errors.Error) and not isinstance(cause, NatsTimeout):
            raise ConnectFailed(f"cannot connect to {redact(url)}: {cause}") from exc
        why = str(cause) or f"timed out after {timeout_s:g}s"
        raise ConnectFailed(f"no NATS server answered at {redact(url)} ({why})") from exc
    except nats.errors.Error as exc:
        raise ConnectFailed(f"cannot connect to {redact(url)}: {exc}") from exc


class _FirstConnect:
    """Give every server one try: nats-py retries a first connect forever when
    ``max_reconnect_attempts=-1`` (which we want for later reconnects)."""

    def __init__(self, servers: int) -> None:
        self.servers = servers
        self.error: Exception | None = None
        self._failures = 0
        self._gave_up = asyncio.Event()

    def failed(self, exc: Exception) -> None:
        self.error = exc
        self._failures += 1
        if self._failures >= self.servers:
            self._gave_up.set()

    async def run(self, connect: Awaitable[NATS], *, timeout_s: float) -> NATS:
        task = asyncio.ensure_future(connect)
        gave_up = asyncio.ensure_future(self._gave_up.wait())
        try:
            await asyncio.wait(
                {task, gave_up}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gave_up.cancel()
        if task.done():
            return task.result()
        task.cancel()
        # nats-py's connect task ends in whatever its last try raised; that error
        # is already in ``self.error`` and reported by the caller.
        with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError):
            await task
        raise NoServersError()


def redact(urls: str) -> str:
    """Hide credentials in a URL or comma-separated URLs.

    ``nats://user:pass@host`` -> ``nats://user:***@host``; a lone user part is a
    token (``nats://token@host``), so it is hidden whole: ``nats://***@host``.
    """
    return ",".join(_redact_one(url) for url in urls.split(","))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    creds, host = authority.rsplit("@", 1)
    user, has_password, _ = creds.partition(":")
    shown = f"{user}:***" if has_password else "***"
    return f"{scheme}://{shown}@{host}{slash}{path}"


def translate(exc: nats.errors.Error, what: str) -> RelayError:
    """The ``RelayError`` for a nats error met while doing ``what``."""
    if isinstance(exc, ServiceUnavailableError) and exc.err_code == ERR_MAX_MSGS_PER_SUBJECT:
        return QueueFull(f"{what}: the queue is full; retry later")
    if isinstance(exc, MaxPayloadError) or (
        isinstance(exc, APIError) and exc.err_code == ERR_MSG_SIZE
    ):
        return PayloadTooLarge(f"{what}: {_describe(exc)}")
    if isinstance(exc, NoStreamResponseError):
        return BrokerUnavailable(
            f"{what}: no {JOBS_STREAM} stream answered: start the broker "
            "(`llmrelay up`) or a worker, which create the streams"
        )
    if isinstance(exc, APIError):
        return BrokerUnavailable(f"{what} refused: {_describe(exc)}")
    return BrokerUnavailable(f"{what}: {_describe(exc)}")


def _describe(exc: nats.errors.Error) -> str:
    if isinstance(exc, APIError) and exc.description:
        return str(exc.description)
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def nats_errors(what: str) -> Iterator[None]:
    """Translate any nats error raised inside the block (see ``translate``)."""
    try:
        yield
    except nats.errors.Error as exc:
        raise translate(exc, what) from exc
