"""Images (and audio) in messages, through the `openai` SDK against the gateway: each
upstream gets them in its own shape (the fake provider logs how each image came), and a
target whose provider kind does not take them never gets the request."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from devstack import MockProvider, expected_answer
from tests._harness import StartSdkStack, upstream

PIXEL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
LOOK: list[Any] = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in these pictures?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
        ],
    }
]


@pytest.mark.parametrize(
    ("kind", "seen"),
    [("openai", ["url", "data"]), ("anthropic", ["url", "base64"]),
     ("gemini", ["url", "base64"])],  # Gemini's fileData and inlineData parts
)  # fmt: skip
async def test_images_reach_each_upstream_in_its_own_shape(
    sdk_stack: StartSdkStack, kind: str, seen: list[str]
) -> None:
    mock = MockProvider(name="mock-v", tokens=4)
    async with sdk_stack({"v": upstream(mock, kind)}, {"chat": [("v", "vision")]}) as (s, client):
        reply = await client.chat.completions.create(model="chat", messages=LOOK)
        [call] = s.providers["v"].stats()["log"]
    assert reply.choices[0].message.content == expected_answer("mock-v", 4)
    assert call["options"]["images"] == seen


async def test_images_a_kind_cannot_take_go_to_a_target_that_takes_them(
    sdk_stack: StartSdkStack,
) -> None:
    """Route [Gemini, OpenAI]: an image linked over plain http goes to the OpenAI pool, as
    Gemini fetches https links only; so does a linked image on an Ollama pool, which
    takes images as data only. (A kind that takes no images at all is refused before
    any call the same way: see the audio test below.)"""
    gemini, llama = MockProvider(name="mock-g", tokens=4), MockProvider(name="mock-o", tokens=4)
    gpt = MockProvider(name="mock-a", tokens=4)
    pools = {"g": upstream(gemini, "gemini"), "o": upstream(llama, "ollama"), "a": upstream(gpt)}
    routes = {
        "chat": [("g", "gemini"), ("a", "gpt-4o")],
        "local": [("o", "llava"), ("a", "gpt-4o")],
    }
    http_link = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
    ]}]  # fmt: skip
    async with sdk_stack(pools, routes) as (_, client):
        reply = await client.chat.completions.create(model="chat", messages=http_link)  # type: ignore[arg-type]
        linked = await client.chat.completions.create(model="local", messages=LOOK)
        plain = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.model == "gpt-4o" and linked.model == "gpt-4o" and plain.model == "gemini"
    assert gemini.stats()["requests"] == 1 and llama.stats()["requests"] == 0


async def test_an_ollama_pool_gets_images_as_base64(sdk_stack: StartSdkStack) -> None:
    mock = MockProvider(name="mock-o", tokens=4)
    data_only = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": PIXEL}},
    ]}]  # fmt: skip
    stack = sdk_stack({"o": upstream(mock, "ollama")}, {"chat": [("o", "llava")]})
    async with stack as (_, client):
        reply = await client.chat.completions.create(model="chat", messages=data_only)  # type: ignore[arg-type]
        [call] = mock.stats()["log"]
    assert reply.choices[0].message.content == expected_answer("mock-o", 4)
    assert call["options"]["images"] == ["base64"]


async def test_audio_to_a_kind_that_takes_none_is_refused_by_name(sdk_stack: StartSdkStack) -> None:
    mock = MockProvider(name="mock-b", tokens=4)
    sound = [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]
    stack = sdk_stack({"b": upstream(mock, "anthropic")}, {"chat": [("b", "claude")]})
    async with stack as (_, client):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": sound}],  # type: ignore[list-item]
            )
    assert caught.value.code == "bad_request" and "audio" in caught.value.message
    assert mock.stats()["requests"] == 0


async def test_an_image_that_is_not_a_url_is_refused_naming_the_field(
    sdk_stack: StartSdkStack,
) -> None:
    mock = MockProvider(name="mock-v", tokens=4)
    async with sdk_stack({"v": upstream(mock)}, {"chat": [("v", "vision")]}) as (_, client):
        bad = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
            }
        ]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="chat", messages=bad)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_job"
    assert "image_url.url" in caught.value.message and mock.stats()["requests"] == 0
