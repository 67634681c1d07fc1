"""Secrets never leave config (issue 11, defect 12), each attack as a user would try it.

- an API key read from a secret file keeps its trailing newline;
- a header value that h11 refuses echoes the whole value in its error text;
- `config check` prints URLs with their credentials;
- `repr(PoolConfig)` shows the pool's extra headers (Azure's `api-key`);
- URL redaction leaked a token given as the URL's user part.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from broker import ConfigError, Job, Message, PoolConfig, Secret, parse_config
from broker._nats import redact
from cli.main import app
from devstack import MockProvider
from workers.providers import ProviderError, make_provider

KEY = "sk-live-0123456789abcdef"


def _config(api_key: str, **pool: object) -> str:
    doc = {
        "nats": {"url": "nats://worker:nats-pass-123@127.0.0.1:4222"},
        "pools": {
            "a": {
                "kind": "openai",
                "base_url": "https://user:base-pass-456@api.example.com/v1",
                "api_key": api_key,
                **pool,
            }
        },
        "routes": {"chat": {"targets": [{"pool": "a", "model": "m"}]}},
    }
    return yaml.safe_dump(doc)


def test_a_key_from_a_secret_file_loses_its_trailing_newline() -> None:
    cfg = parse_config(_config(KEY + "\n"), env={})
    assert cfg.pools["a"].api_key == Secret(KEY)


def test_a_key_with_a_control_character_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config("sk-live\r\nX-Injected: 1"), env={})
    assert "pools.a.api_key" in str(caught.value)
    assert "sk-live" not in str(caught.value)


def test_pool_headers_are_secrets_hidden_from_repr() -> None:
    cfg = parse_config(_config(KEY, headers={"api-key": "azure-secret-789"}), env={})
    assert "azure-secret-789" not in repr(cfg.pools["a"])
    assert cfg.pools["a"].headers["api-key"].reveal() == "azure-secret-789"


def test_config_check_redacts_every_url(tmp_path: Path) -> None:
    path = tmp_path / "llmrelay.yaml"
    path.write_text(_config(KEY))
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "nats-pass-123" not in result.output and "base-pass-456" not in result.output
    assert "api.example.com" in result.output and "127.0.0.1:4222" in result.output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://s3cr3t-token@host:4222", "nats://***@host:4222"),
        ("nats://user:pw@host:4222", "nats://user:***@host:4222"),
        ("nats://a:pw@h1:4222,nats://tok@h2:4222", "nats://a:***@h1:4222,nats://***@h2:4222"),
        ("nats://host:4222", "nats://host:4222"),
    ],
)
def test_redaction_hides_tokens_and_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown


async def test_a_header_value_refused_by_h11_never_reaches_the_attempt_message() -> None:
    """A pool built around config validation (as a library user could) still leaks nothing."""
    async with MockProvider(name="mock-a") as mock, httpx.AsyncClient() as client:
        pool = PoolConfig(kind="openai", base_url=f"{mock.url}/v1", api_key=Secret(KEY + "\n"))
        provider = make_provider(pool, client)
        job = Job(
            id="j1",
            route="chat",
            messages=[Message(role="user", content="hi")],
            reply_to="llm.reply.j1",
            deadline_ms=2**40,
        )
        with pytest.raises(ProviderError) as caught:
            async for _ in provider.stream(job, "m"):
                pass
    err = caught.value
    assert KEY not in err.message
    # The request was never sent: the caller's (or config's) fault, not the provider's.
    assert err.code == "bad_request" and not err.retryable and not err.health
    assert mock.stats()["requests"] == 0
