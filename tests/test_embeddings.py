"""Embeddings end to end: ``POST /v1/embeddings`` through the gateway (the official
``openai`` SDK), and ``RelayClient.embed`` over NATS, against real workers and the
fake provider's embeddings endpoints, whose vectors are known exactly
(``expected_embedding``). An embeddings job is an ordinary job: queued on its route,
failed over, and refused where the target's provider kind cannot embed.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import msgspec
import openai
import pytest
import typer
from typer.testing import CliRunner

from broker import EmbedRequest, Job, RelayError
from broker._protocol import Message, requested_features
from broker._validate import MAX_EMBED_INPUTS, validate_job
from broker._vectors import pack_vector, unpack_vector
from cli import _commands
from devstack import MockProvider, expected_embedding
from tests._builders import make_config
from tests._harness import StartSdkStack, StartStack, upstream
from workers._ratelimit import job_estimate

TEXTS = ["the cat sat", "on the mat", "and purred"]
DIMS = 8  # the fake provider's default


def vectors(response: Any) -> list[list[float]]:
    return [item.embedding for item in sorted(response.data, key=lambda d: d.index)]


def expected(model: str, texts: list[str] = TEXTS, dims: int = DIMS) -> list[list[float]]:
    return [expected_embedding(model, text, dims) for text in texts]


# --- through the gateway, with the openai SDK -----------------------------------------


async def test_a_batch_of_three_comes_back_as_three_exact_vectors(
    sdk_stack: StartSdkStack,
) -> None:
    """The SDK asks for base64 by default and decodes it; ``float`` comes as numbers."""
    pools = {"a": upstream(MockProvider(name="mock-a"))}
    async with sdk_stack(pools, {"embed": [("a", "emb-small")]}) as (s, client):
        default = await client.embeddings.create(model="embed", input=TEXTS)
        floats = await client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
        log = s.providers["a"].stats()["log"]
    assert vectors(default) == expected("emb-small")
    assert vectors(floats) == expected("emb-small")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.model == "emb-small" and floats.object == "list"
    prompt_tokens = sum(len(t) for t in TEXTS) // 4
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == prompt_tokens
    # One upstream call per request, the whole batch in it.
    assert [(c["path"], c["options"]["inputs"]) for c in log] == [("/v1/embeddings", 3)] * 2


async def test_one_string_and_dimensions(sdk_stack: StartSdkStack) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a"))}
    async with sdk_stack(pools, {"embed": [("a", "emb-small")]}) as (_, client):
        response = await client.embeddings.create(model="embed", input="hello", dimensions=3)
    assert vectors(response) == [expected_embedding("emb-small", "hello", 3)]


async def test_an_ollama_pool_embeds_through_api_embed(sdk_stack: StartSdkStack) -> None:
    pools = {"o": upstream(MockProvider(name="mock-o"), "ollama")}
    async with sdk_stack(pools, {"embed": [("o", "nomic-embed-text")]}) as (s, client):
        response = await client.embeddings.create(model="embed", input=TEXTS, dimensions=4)
        [call] = s.providers["o"].stats()["log"]
    assert vectors(response) == expected("nomic-embed-text", dims=4)
    assert call["path"] == "/api/embed" and call["options"] == {"inputs": 3, "dimensions": 4}
    assert response.usage.prompt_tokens == sum(len(t) for t in TEXTS) // 4


async def test_an_azure_pool_embeds_at_its_deployment(sdk_stack: StartSdkStack) -> None:
    pools = {"az": upstream(MockProvider(name="mock-az"), "azure")}
    async with sdk_stack(pools, {"embed": [("az", "emb-prod")]}) as (s, client):
        response = await client.embeddings.create(model="embed", input=TEXTS)
        [call] = s.providers["az"].stats()["log"]
    assert vectors(response) == expected("emb-prod")
    assert call["path"].startswith("/openai/deployments/emb-prod/embeddings?api-version=")


async def test_a_target_that_cannot_embed_passes_the_job_to_one_that_can(
    sdk_stack: StartSdkStack,
) -> None:
    pools = {
        "claude": upstream(MockProvider(name="mock-c"), "anthropic"),
        "oai": upstream(MockProvider(name="mock-o")),
    }
    routes = {"embed": [("claude", "claude-haiku"), ("oai", "emb-small")]}
    async with sdk_stack(pools, routes) as (s, client):
        response = await client.embeddings.create(model="embed", input=TEXTS)
        asked_claude = s.providers["claude"].stats()["requests"]
    assert vectors(response) == expected("emb-small")
    assert asked_claude == 0  # refused before any upstream call


async def test_a_503_on_the_primary_fails_over_to_the_backup(sdk_stack: StartSdkStack) -> None:
    pools = {
        "a": upstream(MockProvider(name="mock-a"), max_retries=0),
        "b": upstream(MockProvider(name="mock-b")),
    }
    routes = {"embed": [("a", "emb-a+status=503"), ("b", "emb-b")]}
    async with sdk_stack(pools, routes) as (s, client):
        raw = await client.embeddings.with_raw_response.create(model="embed", input=TEXTS)
        primary = s.providers["a"].stats()["log"]
    response = raw.parse()
    assert vectors(response) == expected("emb-b")
    assert response.model == "emb-b" and raw.headers["x-llmrelay-pool"] == "b"
    # Tried on the primary (once more at once, as for chat), then the backup's answer.
    assert primary and {c["status"] for c in primary} == {503}


async def test_an_answer_cut_in_the_middle_fails_over(relay_stack: StartStack) -> None:
    pools = {
        "a": upstream(MockProvider(name="mock-a"), max_retries=0),
        "b": upstream(MockProvider(name="mock-b")),
    }
    routes = {"embed": [("a", "emb-a+cut=1"), ("b", "emb-b")]}
    async with relay_stack(pools, routes) as s:
        result = await s.relay.embed("embed", TEXTS)
    assert result.vectors == expected("emb-b") and result.pool == "b"


async def test_vectors_too_large_for_one_answer_are_refused(relay_stack: StartStack) -> None:
    """Three vectors of 65,536 float32 are 1 MiB packed: more than one ``done`` carries."""
    pools = {"a": upstream(MockProvider(name="mock-a"))}
    async with relay_stack(pools, {"embed": [("a", "emb")]}) as s:
        with pytest.raises(RelayError) as caught:
            await s.relay.embed("embed", TEXTS, dimensions=65_536)
        fits = await s.relay.embed("embed", TEXTS[:1], dimensions=65_536)
    assert caught.value.code == "bad_request" and "fewer inputs" in caught.value.message
    assert fits.vectors == [expected_embedding("emb", TEXTS[0], 65_536)]


async def test_a_route_whose_only_target_cannot_embed_is_a_400_naming_embeddings(
    sdk_stack: StartSdkStack,
) -> None:
    pools = {"claude": upstream(MockProvider(name="mock-c"), "anthropic")}
    async with sdk_stack(pools, {"embed": [("claude", "claude-haiku")]}) as (_, client):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="embed", input=TEXTS)
    assert "embeddings" in caught.value.message
    assert caught.value.code == "bad_request"


async def test_token_arrays_and_empty_input_are_refused_clearly(
    sdk_stack: StartSdkStack,
) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a"))}
    async with sdk_stack(pools, {"embed": [("a", "emb")]}) as (s, client):
        with pytest.raises(openai.BadRequestError) as tokens:
            await client.embeddings.create(model="embed", input=[[1, 2, 3]])
        with pytest.raises(openai.BadRequestError) as empty:
            await client.embeddings.create(model="embed", input=[])
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="no-such-route", input="x")
        asked = s.providers["a"].stats()["requests"]
    assert "token" in tokens.value.message and tokens.value.param == "input"
    assert empty.value.param == "input"
    assert asked == 0


# --- over NATS -------------------------------------------------------------------------


async def test_relay_client_embed_over_nats(relay_stack: StartStack) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a"))}
    async with relay_stack(pools, {"embed": [("a", "emb-small")]}) as s:
        result = await s.relay.embed("embed", TEXTS, dimensions=5)
        single = await s.relay.embed("embed", "alone")
    assert result.vectors == expected("emb-small", dims=5)
    assert result.pool == "a" and result.model == "emb-small"
    assert result.usage.prompt_tokens == sum(len(t) for t in TEXTS) // 4
    assert result.usage.completion_tokens == 0
    assert single.vectors == [expected_embedding("emb-small", "alone", DIMS)]


async def test_relay_client_embed_raises_the_refusal(relay_stack: StartStack) -> None:
    pools = {"claude": upstream(MockProvider(name="mock-c"), "anthropic")}
    async with relay_stack(pools, {"embed": [("claude", "claude-haiku")]}) as s:
        with pytest.raises(RelayError) as caught:
            await s.relay.embed("embed", TEXTS)
    assert caught.value.code == "bad_request" and "embeddings" in caught.value.message


async def test_the_embed_command_prints_one_vector_per_line(
    relay_stack: StartStack, client_url: str
) -> None:
    app = typer.Typer()
    _commands.register(app)
    runner = CliRunner(env={"LLMRELAY_CONFIG": None, "LLMRELAY_NATS_URL": None})
    args = ["embed", "-r", "embed", "--dimensions", "4", "--nats-url", client_url, *TEXTS[:2]]
    pools = {"a": upstream(MockProvider(name="mock-a"))}
    async with relay_stack(pools, {"embed": [("a", "emb")]}, relay=None):
        result = await anyio.to_thread.run_sync(lambda: runner.invoke(app, args))
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == expected(
        "emb", TEXTS[:2], 4
    )
    assert "done: a/emb, 2 vectors of 4" in result.stderr


# --- the pieces -------------------------------------------------------------------------


def _job(**fields: Any) -> Job:
    base: dict[str, Any] = {
        "id": "r1",
        "route": "embed",
        "messages": [],
        "reply_to": "llm.reply.r1",
        "deadline_ms": 10**13,
        "embed": EmbedRequest(input=TEXTS),
    }
    return Job(**{**base, **fields})


def test_vectors_travel_as_base64_little_endian_float32() -> None:
    vector = [0.5, -1.0, 0.25, 3.0]
    packed = pack_vector(vector)
    assert packed == "AAAAPwAAgL8AAIA+AABAQA=="
    assert unpack_vector(packed) == vector


def test_an_embeddings_job_asks_for_the_embeddings_feature() -> None:
    assert requested_features(_job()) == {"embeddings"}


def test_an_embeddings_job_needs_no_messages() -> None:
    config = make_config({"a": {"kind": "openai"}}, {"embed": [("a", "emb")]})
    assert validate_job(_job(), config, 0).embed == EmbedRequest(input=TEXTS)


@pytest.mark.parametrize(
    ("field", "job"),
    [
        ("messages", _job(embed=None)),
        ("messages", _job(messages=[Message(role="user", content="hi")])),
        ("embed.input", _job(embed=EmbedRequest(input=[]))),
        ("embed.input", _job(embed=EmbedRequest(input=["x"] * (MAX_EMBED_INPUTS + 1)))),
        ("embed.input[1]", _job(embed=EmbedRequest(input=["a", ""]))),
        ("embed.dimensions", _job(embed=EmbedRequest(input=["a"], dimensions=0))),
    ],
)
def test_embeddings_jobs_are_checked(field: str, job: Job) -> None:
    config = make_config({"a": {"kind": "openai"}}, {"embed": [("a", "emb")]})
    with pytest.raises(RelayError) as caught:
        validate_job(job, config, 0)
    assert caught.value.message.startswith(f"{field}:"), caught.value.message


def test_the_rate_budget_charges_an_embeddings_job_its_inputs_only() -> None:
    chars = sum(len(t) for t in TEXTS)
    assert job_estimate(_job()) == chars // 4  # nothing is written: no completion budget


async def test_the_fake_provider_answers_both_encodings_and_faults() -> None:
    async with MockProvider(name="m") as mock, httpx.AsyncClient(base_url=mock.url) as http:
        body = {"model": "e", "input": ["a", "b"], "encoding_format": "base64"}
        b64 = (await http.post("/v1/embeddings", json=body)).json()
        floats = await http.post("/v1/embeddings", json={**body, "encoding_format": "float"})
        ollama = (await http.post("/api/embed", json={"model": "e", "input": "a"})).json()
        limited = await http.post("/v1/embeddings", json={**body, "model": "e+status=429"})
        bad = await http.post("/v1/embeddings", json={"model": "e", "input": [[1, 2]]})
    assert [unpack_vector(d["embedding"]) for d in b64["data"]] == expected("e", ["a", "b"])
    assert [d["embedding"] for d in floats.json()["data"]] == expected("e", ["a", "b"])
    assert ollama["embeddings"] == [expected_embedding("e", "a", DIMS)]
    assert ollama["prompt_eval_count"] == 1
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "requests"
    assert bad.status_code == 400


def test_expected_embedding_is_deterministic_and_float32_exact() -> None:
    vector = expected_embedding("m", "text", 16)
    assert vector == expected_embedding("m", "text", 16) != expected_embedding("n", "text", 16)
    assert len(vector) == 16 and all(-1.0 <= x < 1.0 for x in vector)
    assert unpack_vector(pack_vector(vector)) == vector
    assert msgspec.json.decode(msgspec.json.encode(vector)) == vector
