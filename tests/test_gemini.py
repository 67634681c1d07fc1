"""Google Gemini pools (``kind: gemini``): ``streamGenerateContent`` with ``x-goog-api-key``.

Real workers against the fake provider, which answers Gemini's paths as Google
does (403 ``PERMISSION_DENIED`` without a key); then the adapter alone on canned
chunks, for what the fake never sends (thought parts, other finish reasons).
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from broker import JobOptions, RequestFailed
from broker._config import PoolConfig, Secret
from broker._protocol import Job, Message, Usage
from devstack import MockProvider, expected_answer
from tests._harness import StartStack, upstream
from workers.providers import (
    AuthFailed,
    ContentFiltered,
    Finish,
    GeminiProvider,
    Malformed,
    RateLimited,
    ReasoningDelta,
    StreamInterrupted,
    StreamItem,
    TextDelta,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.providers._errors_map import error_for_payload, error_for_status

TOKENS = 6
MODEL = "gemini-2.0-flash"
FAST: dict[str, Any] = {"max_retries": 0, "backoff_base_s": 0.05}
STREAM_PATH = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"


async def test_a_gemini_model_answers_with_usage_and_finish_reason(
    relay_stack: StartStack,
) -> None:
    pools = {"g": upstream(MockProvider(name="gemini", tokens=TOKENS), "gemini")}
    async with relay_stack(pools, {"chat": [("g", MODEL)]}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
        [call] = s.providers["g"].stats()["log"]
    assert text == expected_answer("gemini", TOKENS)
    done = handle.done
    assert done is not None and (done.model, done.finish_reason) == (MODEL, "stop")
    assert done.usage.completion_tokens == TOKENS and done.usage.prompt_tokens >= 1
    assert (call["path"], call["status"]) == (STREAM_PATH, 200)


async def test_max_tokens_reaches_gemini_as_max_output_tokens(relay_stack: StartStack) -> None:
    pools = {"g": upstream(MockProvider(name="gemini", tokens=TOKENS), "gemini")}
    async with relay_stack(pools, {"chat": [("g", MODEL)]}) as s:
        handle = await s.relay.submit("hi", route="chat", options=JobOptions(max_tokens=3))
        text = await handle.text()
    assert text == expected_answer("gemini", 3)
    assert handle.done is not None and handle.done.finish_reason == "length"


async def test_a_cut_openai_answer_is_finished_by_a_gemini_backup(
    relay_stack: StartStack,
) -> None:
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), **FAST),
        "g": upstream(MockProvider(name="gemini", tokens=TOKENS), "gemini", **FAST),
    }
    targets = [{"pool": "a", "model": "gpt+cut=3"}, {"pool": "g", "model": MODEL}]
    async with relay_stack(pools, {"chat": {"targets": targets}}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
        prefills = s.providers["g"].stats()["prefills"]
    assert text == expected_answer("mock-a", TOKENS)  # nothing lost or repeated
    assert prefills == 1  # continued from a trailing model turn, not restarted
    assert [n.kind for n in handle.notices] == ["failover", "resumed"]
    assert handle.done is not None and handle.done.pool == "g"


async def test_a_429_is_rate_limited_and_the_job_fails_over(relay_stack: StartStack) -> None:
    pools = {
        "g": upstream(MockProvider(name="gemini", tokens=TOKENS), "gemini", **FAST),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), **FAST),
    }
    targets = [
        {"pool": "g", "model": f"{MODEL}+status=429+retry_after=0.1"},
        {"pool": "b", "model": "mb"},
    ]
    async with relay_stack(pools, {"chat": {"targets": targets}}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
    assert text == expected_answer("mock-b", TOKENS)
    assert handle.done is not None
    assert [a.code for a in handle.done.attempts] == ["rate_limited"]


async def test_a_blocked_prompt_is_content_filtered(relay_stack: StartStack) -> None:
    pools = {"g": upstream(MockProvider(name="gemini", tokens=TOKENS), "gemini", **FAST)}
    model = f"{MODEL}+error_after=0+error=content_filter"  # promptFeedback.blockReason
    async with relay_stack(pools, {"chat": [("g", model)]}) as s:
        with pytest.raises(RequestFailed) as caught:
            await (await s.relay.submit("something bad", route="chat")).text()
    assert caught.value.code == "content_filtered"
    assert "SAFETY" in caught.value.message


async def test_a_gemini_pool_without_a_key_is_refused_as_auth_failed(
    relay_stack: StartStack,
) -> None:
    mock = MockProvider(name="gemini", tokens=TOKENS)
    pools = {"g": upstream(mock, "gemini", api_key=None, **FAST)}
    async with relay_stack(pools, {"chat": [("g", MODEL)]}) as s:
        with pytest.raises(RequestFailed) as caught:
            await (await s.relay.submit("hi", route="chat")).text()
    assert [a.code for a in caught.value.attempts] == ["auth_failed"]
    assert "unregistered callers" in caught.value.attempts[0].message  # the fake's 403


# --- the adapter alone, on canned chunks -------------------------------------------


def _job(**fields: Any) -> Job:
    messages = [
        Message(role="system", content="Be terse."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello."),
        Message(role="user", content="More"),
    ]
    return Job(id="j1", route="chat", messages=messages, reply_to="r", deadline_ms=0, **fields)


def _sse(*chunks: Any) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(c) + b"\r\n\r\n" for c in chunks)


def _chunk(text: str | None = None, finish: str | None = None, **more: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}] if text else []}}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], **more}


USAGE = {"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 2}}


async def _stream(
    body: bytes, job: Job | None = None, model: str = MODEL, prefill: str | None = None
) -> tuple[list[StreamItem], httpx.Request]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(body))

    pool = PoolConfig(kind="gemini", base_url="http://g/", api_key=Secret("g-key"))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        provider = GeminiProvider(pool, http)
        items = [i async for i in provider.stream(job or _job(), model, prefill=prefill)]
    return items, seen[0]


async def test_the_request_is_geminis_shape() -> None:
    job = _job(max_tokens=50, temperature=0.2, top_p=0.9, stop=["END"], seed=7)
    _, request = await _stream(_sse(_chunk("ok", "STOP", **USAGE)), job, "m+cut=3", "Sure")
    assert str(request.url) == "http://g/v1beta/models/m%2Bcut%3D3:streamGenerateContent?alt=sse"
    assert request.headers["x-goog-api-key"] == "g-key"
    assert "authorization" not in request.headers
    body = msgspec.json.decode(request.content)
    assert body["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    turns = [(c["role"], c["parts"][0]["text"]) for c in body["contents"]]
    assert turns == [("user", "Hi"), ("model", "Hello."), ("user", "More"), ("model", "Sure")]
    assert body["generationConfig"] == {
        "maxOutputTokens": 50, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"], "seed": 7,
    }  # fmt: skip


async def test_text_and_the_last_chunks_reason_and_usage() -> None:
    """(The events of one read come as one text delta, marked ``last`` before the finish
    of that read: ``answer_items``.)"""
    body = _sse(_chunk("Hel"), _chunk("lo", "STOP", **USAGE))
    items, _ = await _stream(body)
    usage = Usage(prompt_tokens=7, completion_tokens=2)
    assert items == [TextDelta("Hello", tokens=2, last=True), Finish("stop", usage)]


@pytest.mark.parametrize(
    ("reason", "word"),
    [("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
     ("SPII", "content_filter"), ("OTHER", "other")],
)  # fmt: skip
async def test_finish_reasons_in_openais_words(reason: str, word: str) -> None:
    items, _ = await _stream(_sse(_chunk("a", reason)))  # no usage: final at the end
    assert items == [TextDelta("a"), Finish(word, None)]


async def test_thought_parts_are_reasoning_not_the_answer_and_their_tokens_count() -> None:
    parts = [{"text": "thinking...", "thought": True}, {"text": "Answer"}]
    usage = {"promptTokenCount": 3, "candidatesTokenCount": 1, "thoughtsTokenCount": 5}
    chunk = {"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}
    items, _ = await _stream(_sse({**chunk, "usageMetadata": usage}))
    assert items == [
        ReasoningDelta("thinking..."),
        TextDelta("Answer", last=True),
        Finish("stop", Usage(prompt_tokens=3, completion_tokens=6, reasoning_tokens=5)),
    ]


async def test_usage_before_the_finish_reason_does_not_end_the_answer() -> None:
    body = _sse(_chunk("a", **USAGE), _chunk("b", **USAGE), _chunk(finish="STOP", **USAGE))
    items, _ = await _stream(body)
    assert items[:-1] == [TextDelta("ab", tokens=2, last=True)] and isinstance(items[-1], Finish)


async def test_a_blocked_prompt_raises_content_filtered() -> None:
    with pytest.raises(ContentFiltered, match="PROHIBITED_CONTENT"):
        await _stream(_sse({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}))


async def test_an_error_chunk_raises_the_mapped_error() -> None:
    error = {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}
    with pytest.raises(UpstreamUnavailable, match="overloaded"):
        await _stream(_sse(_chunk("a"), {"error": error}))


async def test_an_undecodable_chunk_is_malformed_and_a_stream_without_reason_is_cut() -> None:
    body = _sse(_chunk("a")) + b"data: {not json\r\n\r\n" + _sse(_chunk("b", "STOP"))
    items, _ = await _stream(body)
    assert isinstance(items[1], Malformed) and items[-1] == Finish("stop", None)
    with pytest.raises(StreamInterrupted):
        await _stream(_sse(_chunk("a"), _chunk("b", **USAGE)))


def _google_error(code: int, status: str, message: str = "m") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [(429, "RESOURCE_EXHAUSTED", RateLimited), (503, "UNAVAILABLE", UpstreamUnavailable),
     (400, "INVALID_ARGUMENT", UpstreamRejected), (403, "PERMISSION_DENIED", AuthFailed)],
)  # fmt: skip
def test_googles_error_bodies_map_by_status_and_mid_stream(
    code: int, status: str, error: type[Exception]
) -> None:
    payload = _google_error(code, status)
    assert type(error_for_status(code, {}, msgspec.json.encode(payload))) is error
    assert type(error_for_payload(payload)) is error  # the same body inside a stream


def test_a_wrong_gemini_key_is_auth_failed_though_google_says_400() -> None:
    payload = _google_error(
        400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."
    )
    assert type(error_for_status(400, {}, msgspec.json.encode(payload))) is AuthFailed


# --- the fake provider's Gemini paths ----------------------------------------------


async def test_the_fake_answers_generate_content_whole_and_refuses_a_request_without_key() -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with MockProvider(name="gemini", tokens=TOKENS) as mock, httpx.AsyncClient() as http:
        path = f"{mock.url}/v1beta/models/{MODEL}:generateContent"
        whole = await http.post(f"{path}?key=k", json=body)
        refused = await http.post(path, json=body)
    [candidate] = whole.json()["candidates"]
    assert candidate["content"]["parts"][0]["text"] == expected_answer("gemini", TOKENS)
    assert candidate["finishReason"] == "STOP"
    assert whole.json()["usageMetadata"]["candidatesTokenCount"] == TOKENS
    assert refused.status_code == 403
    assert refused.json()["error"]["status"] == "PERMISSION_DENIED"
