"""Config loading: interpolation, validation errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import ConfigError, Secret, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
pools:
  a: {kind: openai, base_url: "http://127.0.0.1:1/v1", api_key: "${KEY_A:-sk-default}"}
routes:
  chat: {targets: [{pool: a, model: m}]}
"""


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "llmrelay.example.yaml")
    assert [t.pool for t in cfg.routes["chat"].targets] == ["mock-a", "mock-b"]


def test_interpolation_uses_environment_then_default() -> None:
    assert parse_config(MINIMAL, env={"KEY_A": "sk-real"}).pools["a"].api_key == Secret("sk-real")
    assert parse_config(MINIMAL, env={}).pools["a"].api_key == Secret("sk-default")


def test_missing_variable_without_default_names_the_key() -> None:
    text = MINIMAL.replace("${KEY_A:-sk-default}", "${KEY_A}")
    with pytest.raises(ConfigError, match=r"pools\.a\.api_key: environment variable KEY_A"):
        parse_config(text, env={})


def test_secrets_never_appear_in_repr() -> None:
    cfg = parse_config(MINIMAL, env={"KEY_A": "sk-very-secret"})
    assert "sk-very-secret" not in repr(cfg)
    assert cfg.pools["a"].api_key is not None
    assert cfg.pools["a"].api_key.reveal() == "sk-very-secret"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "pools: {a: {kind: openai, base_url: 'http://x', concurrency: 0}}",
            r"pools\.a\.concurrency",
        ),
        ("pools: {a: {kind: nope, base_url: 'http://x'}}", r"pools\.a\.kind"),
        (
            "pools: {a: {kind: openai, base_url: 'http://x', concurency: 3}}",
            r"pools\.a.*concurency",
        ),
        (
            "pools: {a: {kind: openai, base_url: 'http://x', timeouts: {ttft_s: -1}}}",
            r"timeouts\.ttft_s",
        ),
        ("routes: {r: {targets: [{pool: zz, model: m}]}}", r"routes\.r\.targets\[0\]\.pool.*'zz'"),
        ("routes: {r: {targets: []}}", r"routes\.r\.targets"),
        ("streams: {queue_capacity: many}", r"streams\.queue_capacity"),
        ("pools: {A!: {kind: openai, base_url: 'http://x'}}", r"\[a-z0-9_-\]"),
        ("pools: [1, 2]", r"pools: Expected a mapping"),
        ("nats: {url: [", r"not valid YAML \(line 1"),
    ],
)
def test_bad_config_names_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, source="bad.yaml")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
