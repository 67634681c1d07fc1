"""TLS and decentralised credentials to NATS, against real nats-servers.

A CA, a server certificate (for 127.0.0.1) and a client certificate are made
at test time with the ``openssl`` CLI; an operator, an account and a user with
their JWTs are made with ``nkeys``. Each test starts its own nats-server
(``NatsServer``) with a config of its own, and connects the way every llmrelay
process does (``broker._nats.connect``). What is asserted is what an operator
sees: the server's ``/connz`` reports the connection as TLS, and a client that
must use TLS never puts its password on the wire in clear text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nkeys
import pytest
from nats.aio.client import Client as NATS

from broker._config import NatsSettings, Secret, TlsSettings, parse_config
from broker._errors import ConfigError, ConnectFailed
from broker._nats import connect
from broker._server import NatsServer

PASSWORD = "tls-test-secret"
USER = "relay"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


# --- a PKI made at test time ------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed neither certificate


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
        f"authorityKeyIdentifier=keyid\n{extensions}\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(
        d,
        "server",
        "ca",
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
    )
    _make_leaf(d, "client", "ca", "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth")
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


# --- servers --------------------------------------------------------------------------


@contextmanager
def nats_server(tmp_path: Path, body: str) -> Iterator[NatsServer]:
    """A nats-server whose config is ``body`` (plus JetStream, which the readiness check needs)."""
    conf = tmp_path / "nats.conf"
    conf.write_text(f"{body}\njetstream {{}}\n")
    with NatsServer(store_dir=tmp_path / "store", config_file=conf) as server:
        yield server


def tls_block(pki: Pki, **extra: str) -> str:
    lines = [
        f'cert_file: "{pki.server_cert}"',
        f'key_file: "{pki.server_key}"',
        f'ca_file: "{pki.ca}"',
        "timeout: 2",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return "tls {\n  " + "\n  ".join(lines) + "\n}"


PASSWORD_AUTH = f'authorization {{ user: {USER}, password: "{PASSWORD}" }}'


def connz(server: NatsServer) -> list[dict[str, Any]]:
    """The server's view of its client connections (``/connz?auth=1``)."""
    url = f"http://{server.host}:{server.monitor_port}/connz?auth=1"
    with urllib.request.urlopen(url, timeout=5) as resp:
        conns: list[dict[str, Any]] = json.load(resp)["connections"]
    return conns


def authorized(server: NatsServer) -> list[str]:
    """Users the server authenticated (a connection that sent no CONNECT has none)."""
    return [c["authorized_user"] for c in connz(server) if c.get("authorized_user")]


async def round_trip(nc: NATS) -> bytes:
    sub = await nc.subscribe("tls.test")
    await nc.publish("tls.test", b"ping")
    msg = await sub.next_msg(timeout=5)
    return bytes(msg.data)


def settings(url: str, **fields: Any) -> NatsSettings:
    base: dict[str, Any] = {"user": USER, "password": Secret(PASSWORD), "connect_timeout_s": 2.0}
    return NatsSettings(url=url, **{**base, **fields})


def tls_url(server: NatsServer) -> str:
    return f"tls://{server.host}:{server.port}"


# --- (a) server TLS, verified with our CA ------------------------------------------------


async def test_tls_url_with_the_ca_connects_encrypted(tmp_path: Path, pki: Pki) -> None:
    with nats_server(tmp_path, f"{tls_block(pki)}\n{PASSWORD_AUTH}") as server:
        nc = await connect(settings(tls_url(server), tls=TlsSettings(ca_file=str(pki.ca))))
        try:
            assert await round_trip(nc) == b"ping"
            [conn] = connz(server)
            assert conn["tls_version"].startswith("1.")
            assert conn["authorized_user"] == USER
        finally:
            await nc.close()


async def test_a_server_certificate_from_another_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    with nats_server(tmp_path, f"{tls_block(pki)}\n{PASSWORD_AUTH}") as server:
        tls = TlsSettings(ca_file=str(pki.other_ca))
        with pytest.raises(ConnectFailed, match=r"TLS.*certificate verify failed") as info:
            await connect(settings(tls_url(server), tls=tls))
    assert PASSWORD not in str(info.value)


# --- (b) TLS required: never CONNECT in clear text -------------------------------------


@dataclass
class PlainListener:
    """A fake NATS server without TLS: it sends INFO and records every byte it is sent."""

    port: int
    received: bytearray


@asynccontextmanager
async def plain_listener() -> AsyncIterator[PlainListener]:
    info = {
        "server_id": "FAKE",
        "version": "2.15.1",
        "proto": 1,
        "headers": True,
        "auth_required": True,
        "max_payload": 1048576,
    }
    received = bytearray()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(b"INFO " + json.dumps(info).encode() + b"\r\n")
            try:
                while True:
                    received.extend(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield PlainListener(port=port, received=received)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("scheme", "tls"),
    [("tls", None), ("nats", TlsSettings()), ("nats", TlsSettings(handshake_first=False))],
    ids=["tls-url", "tls-settings", "tls-settings-explicit"],
)
async def test_required_tls_against_a_plain_server_sends_no_credentials(
    scheme: str, tls: TlsSettings | None
) -> None:
    async with plain_listener() as fake:
        url = f"{scheme}://127.0.0.1:{fake.port}"
        with pytest.raises(ConnectFailed, match=r"TLS is required.*does not offer TLS"):
            await connect(settings(url, tls=tls))
    assert b"CONNECT" not in fake.received
    assert PASSWORD.encode() not in fake.received


async def test_tls_url_against_the_plain_test_server_fails_clearly(tmp_path: Path) -> None:
    with nats_server(tmp_path, PASSWORD_AUTH) as server:
        with pytest.raises(ConnectFailed, match=r"TLS is required.*does not offer TLS"):
            await connect(settings(tls_url(server)))
        assert not authorized(server)


# --- (c) mutual TLS ----------------------------------------------------------------------


async def test_mutual_tls_with_the_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with nats_server(tmp_path, f"{tls_block(pki, verify='true')}\n{PASSWORD_AUTH}") as server:
        tls = TlsSettings(
            ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
        )
        nc = await connect(settings(tls_url(server), tls=tls))
        try:
            assert await round_trip(nc) == b"ping"
            [conn] = connz(server)
            assert conn["tls_version"].startswith("1.")
            assert "CN=client" in json.dumps(conn.get("tls_peer_certs", []))
        finally:
            await nc.close()


async def test_mutual_tls_without_a_client_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    with nats_server(tmp_path, f"{tls_block(pki, verify='true')}\n{PASSWORD_AUTH}") as server:
        started = time.monotonic()
        with pytest.raises(ConnectFailed, match=r"TLS") as info:
            await connect(settings(tls_url(server), tls=TlsSettings(ca_file=str(pki.ca))))
        assert time.monotonic() - started < 10
        assert not authorized(server)
    assert "client certificate" in str(info.value)


# --- (d) handshake_first ----------------------------------------------------------------


async def test_handshake_first(tmp_path: Path, pki: Pki) -> None:
    body = f"{tls_block(pki, handshake_first='true')}\n{PASSWORD_AUTH}"
    with nats_server(tmp_path, body) as server:
        tls = TlsSettings(ca_file=str(pki.ca), handshake_first=True)
        nc = await connect(settings(tls_url(server), tls=tls))
        try:
            assert await round_trip(nc) == b"ping"
            assert connz(server)[0]["tls_version"].startswith("1.")
            assert connz(server)[0].get("tls_first") is True
        finally:
            await nc.close()


async def test_handshake_first_server_refuses_a_late_tls_client(tmp_path: Path, pki: Pki) -> None:
    body = f"{tls_block(pki, handshake_first='true')}\n{PASSWORD_AUTH}"
    with (
        nats_server(tmp_path, body) as server,
        pytest.raises(ConnectFailed, match=r"nats\.tls\.handshake_first"),
    ):
        await connect(settings(tls_url(server), tls=TlsSettings(ca_file=str(pki.ca))))


# --- files and config ---------------------------------------------------------------------


async def test_an_unreadable_tls_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"nats\.tls\.ca_file: cannot read .*nope\.pem"):
        await connect(settings("tls://127.0.0.1:1", tls=TlsSettings(ca_file=missing)))
    with pytest.raises(ConfigError, match=r"nats\.tls\.cert_file: cannot read"):
        await connect(
            settings("tls://127.0.0.1:1", tls=TlsSettings(cert_file=missing, key_file=missing))
        )


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("{cert_file: c.pem}", r"nats\.tls.*cert_file and key_file"),
        ("{key_file: k.pem}", r"nats\.tls.*cert_file and key_file"),
        ("{ca: x}", r"nats\.tls.*ca"),
        ("{handshake_first: maybe}", r"nats\.tls\.handshake_first"),
    ],
)
def test_tls_settings_are_validated_at_load(tls: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(f"nats: {{tls: {tls}}}")


def test_tls_settings_load_from_yaml() -> None:
    cfg = parse_config(
        "nats:\n  url: tls://nats.example:4222\n  tls:\n"
        "    ca_file: /etc/ca.pem\n    cert_file: c.pem\n    key_file: k.pem\n"
        "    handshake_first: true\n"
    )
    assert cfg.nats.tls == TlsSettings(
        ca_file="/etc/ca.pem", cert_file="c.pem", key_file="k.pem", handshake_first=True
    )
    assert parse_config("nats: {url: 'nats://h:4222'}").nats.tls is None


# --- decentralised auth: a creds file (user JWT + nkey seed) ------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Identity:
    seed: bytes
    public: str

    @classmethod
    def new(cls, prefix: int) -> Identity:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed=seed, public=nkeys.from_seed(bytearray(seed)).public_key.decode())


def issue_jwt(issuer: Identity, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2), signed the way nsc signs one (ed25519-nkey)."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {"version": 2, **nats},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(issuer.seed)).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


NO_LIMITS = {"subs": -1, "data": -1, "payload": -1}


def creds_file(path: Path, user_jwt: str, user: Identity) -> Path:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return path


@dataclass(frozen=True)
class Operator:
    conf: str
    good_creds: Path
    foreign_creds: Path  # a user signed by an account the server does not know


def operator_mode(tmp_path: Path) -> Operator:
    operator = Identity.new(nkeys.PREFIX_BYTE_OPERATOR)
    account = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
    system = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
    stranger = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
    user = Identity.new(nkeys.PREFIX_BYTE_USER)
    limits = {**NO_LIMITS, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}
    op_jwt = issue_jwt(operator, operator.public, "op", {"type": "operator"})
    acc_jwt = issue_jwt(operator, account.public, "llm", {"type": "account", "limits": limits})
    sys_jwt = issue_jwt(operator, system.public, "sys", {"type": "account", "limits": limits})
    user_nats = {"type": "user", "pub": {}, "sub": {}, **NO_LIMITS}
    good = issue_jwt(account, user.public, "relay", user_nats)
    foreign = issue_jwt(stranger, user.public, "relay", user_nats)
    conf = (
        f"operator: {op_jwt}\nsystem_account: {system.public}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n  {account.public}: {acc_jwt}\n  {system.public}: {sys_jwt}\n}}"
    )
    return Operator(
        conf=conf,
        good_creds=creds_file(tmp_path / "good.creds", good, user),
        foreign_creds=creds_file(tmp_path / "foreign.creds", foreign, user),
    )


async def test_creds_file_authenticates_with_a_user_jwt(tmp_path: Path) -> None:
    op = operator_mode(tmp_path)
    with nats_server(tmp_path, op.conf) as server:
        nc = await connect(NatsSettings(url=server.url, creds_file=str(op.good_creds)))
        try:
            assert await round_trip(nc) == b"ping"
            [conn] = connz(server)
            assert conn.get("name") == "llmrelay"
        finally:
            await nc.close()
        # The server answers -ERR 'Authorization Violation' and closes at once: the
        # client reads either, so only the refusal itself is asserted.
        with pytest.raises(ConnectFailed):
            await connect(NatsSettings(url=server.url, creds_file=str(op.foreign_creds)))


async def test_a_missing_creds_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.creds"
    with pytest.raises(ConfigError, match=r"nats\.creds_file: cannot read .*none\.creds"):
        await connect(NatsSettings(url="nats://127.0.0.1:1", creds_file=str(missing)))


def test_tls_settings_repr_is_plain() -> None:
    # Paths, not secrets: they may be shown (config check prints them).
    text = repr(msgspec.convert({"ca_file": "/ca.pem"}, TlsSettings))
    assert "/ca.pem" in text
