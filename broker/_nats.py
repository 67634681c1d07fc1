"""The NATS boundary: connecting, choosing credentials, and translating nats errors.

Every llmrelay process connects through ``connect`` (or ``connect_nats`` with
explicit credentials), and every ``nats.errors.Error`` that the code above this
module could see is turned into a ``RelayError`` here, with ``raise ... from``:

    with nats_errors("publish to llm.jobs.chat"):
        await js.publish(...)

so the gateway and the CLI catch ``RelayError`` only. Credentials are chosen in
one place (``credentials``): credentials in the URL win; else the caller's own
user (the gateway's ``client`` user); else ``nats.user``/``password``/``token``/
``creds_file``/``nkey_seed_file`` from the config.

TLS is required when ``nats.tls`` is set or any URL is ``tls://``. nats-py
itself upgrades only when the server asks for TLS, and would otherwise send
CONNECT (password included) in clear text; ``_TlsClient`` refuses to send
CONNECT over a connection that is not encrypted.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import anyio
import msgspec
import nats
import nkeys  # type: ignore[import-untyped]
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError, NoServersError, UnexpectedEOF
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from broker._config import NatsSettings, Secret, TlsSettings
from broker._errors import (
    BrokerUnavailable,
    ConfigError,
    ConnectFailed,
    PayloadTooLarge,
    QueueFull,
    RelayError,
)
from broker._subjects import JOBS_STREAM, inbox_prefix

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
    nkey_seed_file: str | None = None


def url_has_credentials(url: str) -> bool:
    return "@" in urlsplit(url.split(",", 1)[0].strip()).netloc


def url_user(urls: str) -> str | None:
    """The user named in the first URL (``nats://user:pass@host``); None for none or a
    lone token (``nats://token@host``), which must never end up in a subject."""
    authority = urlsplit(urls.split(",", 1)[0].strip()).netloc
    creds, at, _ = authority.rpartition("@")
    user, colon, _ = creds.partition(":")
    return user if at and colon and user else None


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
        nkey_seed_file=settings.nkey_seed_file,
    )


async def connect(
    settings: NatsSettings,
    *,
    url: str | None = None,
    name: str = "llmrelay",
    user: str | None = None,
    password: Secret | None = None,
    inbox: str | None = None,
    reconnected: Reconnected | None = None,
) -> NATS:
    """Connect to ``url`` (default ``settings.url``) with the credentials the rule picks."""
    url = url or settings.url
    creds = credentials(url, settings, user=user, password=password)
    if creds.creds_file is not None:
        _check_readable(creds.creds_file, "nats.creds_file")
    if creds.nkey_seed_file is not None:
        _check_seed(creds.nkey_seed_file, "nats.nkey_seed_file")
    return await connect_nats(
        url,
        name=name,
        timeout_s=settings.connect_timeout_s,
        user=creds.user,
        password=creds.password.reveal() if creds.password else None,
        token=creds.token.reveal() if creds.token else None,
        creds_file=creds.creds_file,
        nkey_seed_file=creds.nkey_seed_file,
        inbox=inbox,
        reconnected=reconnected,
        tls=settings.tls,
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
    nkey_seed_file: str | None = None,
    inbox: str | None = None,
    reconnected: Reconnected | None = None,
    tls: TlsSettings | None = None,
) -> NATS:
    """Connect to NATS or raise ``ConnectFailed`` with one clear line.

    ``inbox``: the inbox prefix; by default the user's own, ``_INBOX_<user>``
    (``broker/_subjects.inbox_prefix``), the only inboxes nats.conf lets that
    user read. Workers pass a private prefix besides (jobs are pulled into inboxes).
    Later reconnects are retried forever (``reconnected`` is called after each).
    ``url`` may name several servers, comma-separated (every node of a cluster):
    the connection goes to one and moves to another when it is lost, also to
    nodes the cluster announces that ``url`` does not name (``hoist_credentials``).
    With ``tls`` (or a ``tls://`` URL) the connection is encrypted or not made.
    """
    servers = server_list(url)
    if user is None and password is None and token is None and not (creds_file or nkey_seed_file):
        servers, user, password, token = hoist_credentials(servers)
    first = _FirstConnect(servers=len(servers))
    required = tls_required(url, tls)
    context = tls_context(tls) if required else None

    async def quiet(exc: Exception) -> None:
        first.failed(exc)

    async def _connect() -> NATS:
        nc = _TlsClient(tls_required=required)
        await nc.connect(
            servers,
            tls=context,
            tls_handshake_first=tls is not None and tls.handshake_first,
            name=name,
            # Annotated int in nats-py, used as an asyncio timeout: a float works.
            connect_timeout=timeout_s,  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=quiet,
            user=user,
            password=password,
            token=token,
            user_credentials=creds_file,
            nkeys_seed=nkey_seed_file,
            inbox_prefix=inbox or inbox_prefix(user or url_user(url)),
            reconnected_cb=reconnected,
        )
        return nc

    try:
        return await first.run(_connect(), timeout_s=timeout_s * first.servers + 0.5)
    except (NoServersError, OSError, NatsTimeout) as exc:
        late_tls = required and not (tls is not None and tls.handshake_first)
        raise _connect_failed(
            first.error or exc, redact(url), timeout_s, tls=required, late_tls=late_tls
        ) from exc
    except nats.errors.Error as exc:
        raise ConnectFailed(f"cannot connect to {redact(url)}: {exc}") from exc


def _connect_failed(
    cause: BaseException, url: str, timeout_s: float, *, tls: bool, late_tls: bool
) -> ConnectFailed:
    """The one line that says why the first connect failed.

    ``late_tls``: TLS is required and starts after the server's INFO, so a server
    that waits for the client's TLS first (handshake_first) sends nothing.
    """
    if isinstance(cause, ssl.SSLError):
        return ConnectFailed(f"TLS with {url} failed: {_tls_problem(cause)}")
    if tls and isinstance(cause, BrokenPipeError | ConnectionResetError | UnexpectedEOF):
        return ConnectFailed(
            f"TLS with {url} failed: the server closed the connection after the handshake "
            f"({cause or type(cause).__name__}); a server that verifies clients needs a "
            "client certificate it trusts (nats.tls.cert_file/key_file)"
        )
    if late_tls and isinstance(cause, nats.errors.Error) and "expecting INFO" in str(cause):
        return ConnectFailed(f"TLS with {url} failed: the server sent no INFO; {_FIRST_HINT}")
    if isinstance(cause, nats.errors.Error) and not isinstance(cause, NatsTimeout):
        return ConnectFailed(f"cannot connect to {url}: {cause}")
    why = str(cause) or f"timed out after {timeout_s:g}s"
    timed_out = isinstance(cause, NatsTimeout | TimeoutError)
    hint = f"; {_FIRST_HINT}" if late_tls and timed_out else ""
    return ConnectFailed(f"no NATS server answered at {url} ({why}){hint}")


_FIRST_HINT = (
    "a server with tls { handshake_first: true } waits for the client's TLS "
    "first: set nats.tls.handshake_first: true"
)


# --- TLS ------------------------------------------------------------------------------


def tls_required(url: str, tls: TlsSettings | None) -> bool:
    """TLS is required with ``nats.tls`` set (even empty) or any ``tls://`` URL."""
    return tls is not None or any(u.strip().startswith("tls://") for u in url.split(","))


def tls_context(tls: TlsSettings | None) -> ssl.SSLContext:
    """The client side of TLS: the server's certificate is verified, by ``ca_file`` if given.

    A file that cannot be used is a ``ConfigError`` naming its key.
    """
    tls = tls or TlsSettings()
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca_file is not None:
        _check_readable(tls.ca_file, "nats.tls.ca_file")
        with _tls_file_errors("nats.tls.ca_file", "a PEM CA certificate"):
            ctx.load_verify_locations(cafile=tls.ca_file)
    if tls.cert_file is not None and tls.key_file is not None:
        _check_readable(tls.cert_file, "nats.tls.cert_file")
        _check_readable(tls.key_file, "nats.tls.key_file")
        with _tls_file_errors("nats.tls.cert_file", "a PEM certificate matching key_file"):
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def _check_readable(path: str, key: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc


def _check_seed(path: str, key: str) -> None:
    """A readable file holding a user nkey seed (``SU...``), else a ``ConfigError``."""
    _check_readable(path, key)
    with open(path, "rb") as f:
        seed = bytearray(f.read().strip())
    try:
        prefix, raw = nkeys.decode_seed(seed)
        del raw
    except (nkeys.NkeysError, ValueError) as exc:
        raise ConfigError(f"{key}: {path} holds no nkey seed ({exc})") from exc
    finally:
        seed[:] = bytes(len(seed))
    if prefix != nkeys.PREFIX_BYTE_USER:
        raise ConfigError(f"{key}: {path} is not a user nkey seed (SU...)")


@contextlib.contextmanager
def _tls_file_errors(key: str, wanted: str) -> Iterator[None]:
    try:
        yield
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}: not {wanted} ({exc.reason or exc})") from exc


def _tls_problem(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"certificate verify failed: {exc.verify_message} "
            "(is nats.tls.ca_file the CA that signed the server's certificate?)"
        )
    reason = exc.reason or str(exc)
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return f"{reason}: the server asks for a client certificate (nats.tls.cert_file/key_file)"
    if "WRONG_VERSION_NUMBER" in reason:
        return f"{reason}: the server does not start with TLS (nats.tls.handshake_first?)"
    return reason


class _TlsClient(NATS):
    """nats-py's client, which never sends CONNECT in clear text when TLS is required.

    nats-py upgrades to TLS only when the server's INFO says ``tls_required``;
    against any other server it would send CONNECT, password included, as is.
    """

    def __init__(self, *, tls_required: bool) -> None:
        super().__init__()
        self._llmrelay_tls_required = tls_required

    def _connect_command(self) -> bytes:
        if self._llmrelay_tls_required and not _encrypted(self._transport):
            raise nats.errors.Error(
                "TLS is required (a tls:// URL or nats.tls) but the server does not offer "
                "TLS; nothing was sent (no CONNECT, no credentials)"
            )
        command: bytes = super()._connect_command()
        return command


def _encrypted(transport: object) -> bool:
    writer = getattr(transport, "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


def server_list(urls: str) -> list[str]:
    """``"nats://a:4222, nats://b:4223"`` -> one URL per server."""
    servers = [u.strip() for u in urls.split(",") if u.strip()]
    if not servers:
        raise ConfigError("nats.url: no server given")
    return servers


def hoist_credentials(
    servers: list[str],
) -> tuple[list[str], str | None, str | None, str | None]:
    """The URLs without their credentials, and those credentials (user, password, token).

    nats-py sends a URL's credentials only to that URL's server; the other nodes a
    cluster announces (and a client reconnects to) come without any, and would
    refuse it. Credentials passed as options go to every server. URLs naming
    different credentials are left as they are.
    """
    found = {urlsplit(u).netloc.rpartition("@")[0] for u in servers} - {""}
    if len(found) != 1:
        return servers, None, None, None
    user, colon, password = found.pop().partition(":")
    bare = [_without_credentials(u) for u in servers]
    # As nats-py reads a URL: no percent-decoding.
    return (bare, user, password, None) if colon else (bare, None, None, user)


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}"


class _FirstConnect:
    """Give every server one try: nats-py retries a first connect forever when
    ``max_reconnect_attempts=-1`` (which we want for later reconnects).

    ``run`` races the connect against "every server has failed once" and a
    timeout, in one task group: whichever ends first cancels the rest.
    """

    def __init__(self, servers: int) -> None:
        self.servers = servers
        self.error: Exception | None = None
        self._failures = 0
        self._gave_up = anyio.Event()

    def failed(self, exc: Exception) -> None:
        self.error = exc
        self._failures += 1
        if self._failures >= self.servers:
            self._gave_up.set()

    async def run(self, connect: Awaitable[NATS], *, timeout_s: float) -> NATS:
        connected: list[NATS] = []
        raised: list[Exception] = []

        async def attempt(scope: anyio.CancelScope) -> None:
            try:
                connected.append(await connect)
            except (nats.errors.Error, OSError) as exc:  # reported by connect_nats
                raised.append(exc)
            scope.cancel()

        async def give_up(scope: anyio.CancelScope) -> None:
            await self._gave_up.wait()
            scope.cancel()

        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(attempt, tg.cancel_scope)
                tg.start_soon(give_up, tg.cancel_scope)
        if connected:
            return connected[0]
        if raised:
            raise raised[0]
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
