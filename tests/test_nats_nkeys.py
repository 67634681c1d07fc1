"""NATS nkey authentication (``nats.nkey_seed_file``), against a real nats-server.

A user nkey is made at test time with ``nkeys``; the server's config names its
public key (``authorization { users: [{nkey: U...}] }``), and the client signs
the server's nonce with the seed, through ``broker._nats.connect``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nkeys
import pytest

from broker._config import NatsSettings, parse_config
from broker._errors import ConfigError, ConnectFailed
from broker._nats import connect, credentials
from tests.test_nats_tls import authorized, nats_server, round_trip


def user_seed(path: Path) -> str:
    """Write a new user nkey seed to ``path``; return its public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return public.decode()


def nkey_conf(public: str) -> str:
    return f"authorization {{\n  users: [\n    {{nkey: {public}}}\n  ]\n}}"


async def test_a_user_nkey_seed_authenticates(tmp_path: Path) -> None:
    public = user_seed(tmp_path / "user.nk")
    user_seed(tmp_path / "other.nk")  # a user the server does not know
    with nats_server(tmp_path, nkey_conf(public)) as server:
        good = NatsSettings(url=server.url, nkey_seed_file=str(tmp_path / "user.nk"))
        nc = await connect(good)
        try:
            assert await round_trip(nc) == b"ping"
            info = await nc.jetstream().account_info()
            assert authorized(server) == [public]
        finally:
            await nc.close()
        other = NatsSettings(
            url=server.url, nkey_seed_file=str(tmp_path / "other.nk"), connect_timeout_s=1.0
        )
        with pytest.raises(ConnectFailed, match=r"cannot connect|no NATS server answered"):
            await connect(other)
        with pytest.raises(ConnectFailed):  # and without a seed at all
            await connect(NatsSettings(url=server.url, connect_timeout_s=1.0))
    assert info.limits is not None


async def test_a_missing_nkey_seed_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.nk"
    with pytest.raises(ConfigError, match=r"nats\.nkey_seed_file: cannot read .*none\.nk"):
        await connect(NatsSettings(url="nats://127.0.0.1:1", nkey_seed_file=str(missing)))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"not a seed\n", "holds no nkey seed"),
        (nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT), "is not a user nkey seed"),
    ],
    ids=["garbage", "account-seed"],
)
async def test_a_file_that_is_no_user_seed_is_a_config_error(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "bad.nk"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"nats\.nkey_seed_file: .*bad\.nk {why}"):
        await connect(NatsSettings(url="nats://127.0.0.1:1", nkey_seed_file=str(path)))


def test_nkey_seed_file_is_a_config_key_and_url_credentials_win() -> None:
    settings = parse_config("nats: {url: 'nats://h:4222', nkey_seed_file: /etc/u.nk}").nats
    assert settings.nkey_seed_file == "/etc/u.nk"
    assert credentials(settings.url, settings).nkey_seed_file == "/etc/u.nk"
    assert credentials("nats://u:p@h:4222", settings).nkey_seed_file is None
