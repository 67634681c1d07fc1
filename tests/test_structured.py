"""Structured output, reasoning effort and provider options, relayed to targets that map
them and refused by those that do not: through the OpenAI SDK against the gateway, and
through ``RelayClient``, with real workers and fake providers over HTTP.

The fake provider answers JSON that follows the request's schema when it is given
one (``devstack/fake_provider/_structured.py``), and logs which of these options
each request carried, so a test sees what reached the upstream.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from broker import Job, JobOptions, Message, RequestFailed
from broker._protocol import FunctionDef, JsonSchemaFormat, ResponseFormat, Tool
from devstack import MockProvider
from tests._harness import BEDROCK_KEYS, StartSdkStack, StartStack, upstream
from workers.providers.anthropic import request_body as anthropic_body
from workers.providers.ollama import request_body as ollama_body
from workers.providers.openai import request_body as openai_body

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer"},
        "coastal": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "string"}},
        "kind": {"enum": ["capital", "town"]},
    },
    "required": ["city", "population", "coastal", "districts", "kind"],
    "additionalProperties": False,
}
AWS = BEDROCK_KEYS
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
}


async def test_a_json_schema_response_format_gives_json_that_validates(
    sdk_stack: StartSdkStack,
) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a", tokens=6))}
    async with sdk_stack(pools, {"chat": [("a", "gpt-4o")]}) as (s, client):
        whole = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "a city, as JSON"}],
            response_format=JSON_SCHEMA,  # type: ignore[arg-type]
            reasoning_effort="high",
        )
        stream = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "a city, as JSON"}],
            response_format=JSON_SCHEMA,  # type: ignore[arg-type]
            stream=True,
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        seen = [entry.get("options") for entry in s.providers["a"].stats()["log"]]
    for text in (whole.choices[0].message.content, streamed):
        assert text is not None
        jsonschema.validate(json.loads(text), SCHEMA)  # the SDK user's JSON validates
    assert seen[0] == {"response_format": "json_schema", "reasoning_effort": "high"}
    assert seen[1] == {"response_format": "json_schema"}


async def test_a_target_that_cannot_serve_a_feature_refuses_it_by_name(
    sdk_stack: StartSdkStack,
) -> None:
    """A Bedrock pool does not map structured output: 400, never a text answer."""
    mock = MockProvider(name="mock-b", tokens=6)
    stack = sdk_stack({"b": upstream(mock, "bedrock", **AWS)}, {"chat": [("b", "claude")]})
    async with stack as (_, client):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "hi"}],
                response_format={"type": "json_object"},
            )
        calls = mock.stats()["requests"]
    assert caught.value.code == "bad_request"
    assert "response_format" in caught.value.message and "bedrock" in caught.value.message
    assert calls == 0  # never sent without it


async def test_provider_options_reach_their_provider_and_cannot_override_llmrelay(
    relay_stack: StartStack,
) -> None:
    mock = MockProvider(name="mock-a", tokens=4)
    async with relay_stack({"a": upstream(mock)}, {"chat": [("a", "gpt")]}) as s:
        extra = JobOptions(provider_options={"openai": {"logit_bias": {"50256": -100}}})
        await (await s.relay.submit("hi", route="chat", options=extra)).text()
        forged = JobOptions(provider_options={"openai": {"model": "gpt-expensive"}})
        with pytest.raises(RequestFailed) as caught:
            await (await s.relay.submit("hi", route="chat", options=forged)).text()
        log = mock.stats()["log"]
    assert log[0]["options"] == {"logit_bias": True}
    assert caught.value.code == "bad_request"
    assert "provider_options.openai.model" in caught.value.message
    assert len(log) == 1  # the forged one never went upstream


def make_job(**fields: Any) -> Job:
    messages = [Message(role="user", content="a city")]
    return Job(
        id="j1", route="chat", messages=messages, reply_to="llm.reply.j1", deadline_ms=0, **fields
    )


def test_ollama_gets_the_schema_as_its_format_and_openai_the_format_itself() -> None:
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="c", schema=SCHEMA))
    job = make_job(response_format=fmt)
    assert json.loads(ollama_body(job, "llama3"))["format"] == SCHEMA
    plain = json.loads(
        ollama_body(make_job(response_format=ResponseFormat(type="json_object")), "m")
    )
    assert plain["format"] == "json"
    sent = json.loads(openai_body(job, "gpt"))
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA


async def test_a_job_a_target_cannot_serve_goes_to_one_that_can(
    relay_stack: StartStack,
) -> None:
    """Route [Bedrock, OpenAI]: structured output goes to the OpenAI pool at once; the
    Bedrock provider is never called; text jobs stay on the primary."""
    claude, gpt = MockProvider(name="mock-b", tokens=4), MockProvider(name="mock-a", tokens=4)
    pools = {"b": upstream(claude, "bedrock", **AWS), "a": upstream(gpt)}
    async with relay_stack(pools, {"chat": [("b", "claude"), ("a", "gpt")]}) as s:
        fmt = ResponseFormat(type="json_object")
        handle = await s.relay.submit("hi", route="chat", options=JobOptions(response_format=fmt))
        text = await handle.text()
        plain = await s.relay.submit("hi", route="chat")
        await plain.text()
    assert json.loads(text) == {"answer": "Hello from mock-a. kilo romeo yankee"}
    assert handle.done is not None and handle.done.pool == "a"
    [refused] = handle.done.attempts
    assert (refused.pool, refused.code) == ("b", "bad_request")
    assert "response_format" in refused.message
    assert claude.stats()["requests"] == 1  # only the text job
    assert plain.done is not None and plain.done.pool == "b"


async def test_gemini_gets_structured_output_as_its_response_json_schema(
    relay_stack: StartStack,
) -> None:
    mock = MockProvider(name="mock-g", tokens=6)
    async with relay_stack({"g": upstream(mock, "gemini")}, {"chat": [("g", "gemini")]}) as s:
        fmt = ResponseFormat(
            type="json_schema", json_schema=JsonSchemaFormat(name="c", schema=SCHEMA)
        )
        handle = await s.relay.submit(
            "a city", route="chat", options=JobOptions(response_format=fmt)
        )
        text = await handle.text()
        [call] = mock.stats()["log"]
    jsonschema.validate(json.loads(text), SCHEMA)
    assert call["options"] == {
        "response_mime_type": "application/json",
        "response_json_schema": True,
    }


async def test_cached_and_reasoning_tokens_reach_the_sdk(
    sdk_stack: StartSdkStack,
) -> None:
    """Usage details the upstream reports (cached prompt tokens, reasoning tokens) reach
    the OpenAI SDK, whole and streamed; an upstream that reports none gets none."""
    mock = MockProvider(name="mock-a", tokens=6)
    routes = {"chat": [("a", "o3+cached=3+reasoning=2")], "plain": [("a", "gpt")]}
    async with sdk_stack({"a": upstream(mock)}, routes) as (_, client):
        ask: Any = [{"role": "user", "content": "think"}]
        whole = await client.chat.completions.create(model="chat", messages=ask)
        stream = await client.chat.completions.create(
            model="chat", messages=ask, stream=True, stream_options={"include_usage": True}
        )
        last = [chunk async for chunk in stream][-1]
        plain = await client.chat.completions.create(model="plain", messages=ask)
    for usage in (whole.usage, last.usage):
        assert usage is not None and usage.completion_tokens == 6
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 3
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 2
    assert plain.usage is not None and plain.usage.prompt_tokens_details is None


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_answers_a_json_schema_through_a_forced_tool(
    sdk_stack: StartSdkStack, stream: bool
) -> None:
    """The schema goes to Anthropic as the input schema of a tool it must call; the call's
    input comes back as the answer's text (never as a tool call) and validates."""
    mock = MockProvider(name="mock-b", tokens=6)
    pools = {"b": upstream(mock, "anthropic")}
    async with sdk_stack(pools, {"chat": [("b", "claude")]}) as (s, client):
        asked: dict[str, Any] = {
            "model": "chat",
            "messages": [{"role": "user", "content": "a city, as JSON"}],
            "response_format": JSON_SCHEMA,
        }
        if stream:
            chunks = [c async for c in await client.chat.completions.create(**asked, stream=True)]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        else:
            whole = await client.chat.completions.create(**asked)
            text = whole.choices[0].message.content or ""
            finish, calls = (
                whole.choices[0].finish_reason,
                whole.choices[0].message.tool_calls or [],
            )
        [call] = s.providers["b"].stats()["log"]
    jsonschema.validate(json.loads(text), SCHEMA)
    assert (finish, calls) == ("stop", [])
    assert call["options"]["tools"] == 1
    assert call["options"]["tool_choice"] == {"type": "tool", "name": "json_answer"}


def test_anthropic_json_beside_the_caller_s_tools_lets_the_model_call_either() -> None:
    tool = Tool(function=FunctionDef(name="lookup", parameters={"type": "object"}))
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="c", schema=SCHEMA))
    body = json.loads(anthropic_body(make_job(response_format=fmt, tools=[tool]), "claude"))
    assert [t["name"] for t in body["tools"]] == ["lookup", "json_answer"]
    assert body["tools"][1]["input_schema"] == SCHEMA
    assert body["tool_choice"] == {"type": "any"}
    named = make_job(response_format=fmt, tools=[tool], tool_choice="none")
    assert json.loads(anthropic_body(named, "claude"))["tools"][0]["name"] == "json_answer"
