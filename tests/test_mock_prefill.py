"""The fake provider continues an assistant prefill, per wire format, and can refuse it.

A backup that is sent the first k tokens of another mock's answer must stream
exactly the rest of that answer: these tests send real HTTP to mocks on
loopback and compare ``prefill + streamed text`` with the primary's answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import httpx
import msgspec
import openai
import pytest

from devstack.fake_provider import MockProvider, answer_tokens, continuation, expected_answer
from workers.providers._sse import NDJSONParser, SSEParser

pytestmark = pytest.mark.anyio

PRIMARY = "mock-a"
BACKUP = "mock-b"
TOKENS = 6
QUESTION = "What is the relay doing today?"
OPENAI, ANTHROPIC, OLLAMA = "/v1/chat/completions", "/v1/messages", "/api/chat"
FORMATS = [OPENAI, ANTHROPIC, OLLAMA]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider(name=BACKUP, tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url) as http:
        yield http


def first_tokens(name: str, k: int) -> str:
    return "".join(answer_tokens(name, TOKENS)[:k])


def body(
    path: str, prefill: str | None, *, model: str = "m", stream: bool = True, **extra: Any
) -> dict[str, Any]:
    """A chat request in ``path``'s format, ending with the assistant's ``prefill`` if given."""
    messages = [{"role": "user", "content": QUESTION}]
    if prefill is not None:
        messages.append({"role": "assistant", "content": prefill})
    out: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if path == OPENAI:
        out |= {"continue_final_message": prefill is not None, "add_generation_prompt": False}
        if stream:
            out["stream_options"] = {"include_usage": True}
    if path == ANTHROPIC:
        out["max_tokens"] = 1024
    return out | extra


class Answer(NamedTuple):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish: str


def _openai(events: list[Any]) -> Answer:
    chunks = [msgspec.json.decode(e.data) for e in events if e.data != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    finish = chunks[-2]["choices"][0]["finish_reason"]
    return Answer(text, usage["prompt_tokens"], usage["completion_tokens"], finish)


def _anthropic(events: list[Any]) -> Answer:
    data = [msgspec.json.decode(e.data) for e in events]
    text = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
    start, delta = data[0]["message"], data[-2]
    assert delta["type"] == "message_delta"
    return Answer(
        text,
        start["usage"]["input_tokens"],
        delta["usage"]["output_tokens"],
        delta["delta"]["stop_reason"],
    )


def _ollama(lines: list[Any]) -> Answer:
    text = "".join(line["message"]["content"] for line in lines)
    last = lines[-1]
    return Answer(text, last["prompt_eval_count"], last["eval_count"], last["done_reason"])


def parse(path: str, response: httpx.Response) -> Answer:
    """The text, usage and finish reason of a streamed answer in ``path``'s format."""
    assert response.status_code == 200, response.text
    if path == OLLAMA:
        parser = NDJSONParser()
        lines = parser.feed(response.content) + parser.close()
        return _ollama([msgspec.json.decode(line) for line in lines])
    sse = SSEParser()
    events = sse.feed(response.content) + sse.close()
    return _openai(events) if path == OPENAI else _anthropic(events)


def parse_whole(path: str, response: httpx.Response) -> Answer:
    """The same for a non-streamed answer."""
    assert response.status_code == 200, response.text
    data = response.json()
    if path == OPENAI:
        choice, usage = data["choices"][0], data["usage"]
        return Answer(
            choice["message"]["content"],
            usage["prompt_tokens"],
            usage["completion_tokens"],
            choice["finish_reason"],
        )
    if path == ANTHROPIC:
        usage = data["usage"]
        text = data["content"][0]["text"]
        return Answer(text, usage["input_tokens"], usage["output_tokens"], data["stop_reason"])
    return _ollama([data])


def prompt_tokens(prefill: str = "") -> int:
    return max(len(QUESTION + prefill) // 4, 1)


# --- the helper -------------------------------------------------------------------


@pytest.mark.parametrize("k", range(1, TOKENS + 1))
def test_a_continuation_completes_the_other_mocks_answer(k: int) -> None:
    prefill = expected_answer(PRIMARY, k)
    assert prefill + continuation(BACKUP, prefill, TOKENS) == expected_answer(PRIMARY, TOKENS)


def test_a_prefill_longer_than_the_answer_is_followed_by_nothing() -> None:
    assert continuation(BACKUP, expected_answer(PRIMARY, TOKENS + 3), TOKENS) == ""


def test_foreign_text_is_followed_by_the_mocks_words() -> None:
    words = "".join(answer_tokens(BACKUP, TOKENS)[1:])
    for foreign in ["Sure, here", "Hello from mock-a", "Hello from mock-a. bravo", " alpha"]:
        assert continuation(BACKUP, foreign, TOKENS) == words
    assert continuation(BACKUP, "", TOKENS) == expected_answer(BACKUP, TOKENS)


def test_a_dotted_name_still_reads_as_one_greeting() -> None:
    prefill = expected_answer("mock.v2", 3)
    assert prefill + continuation(BACKUP, prefill, TOKENS) == expected_answer("mock.v2", TOKENS)


def test_mock_continuation_uses_its_name_and_tokens() -> None:
    mock = MockProvider(name=BACKUP, tokens=TOKENS)
    assert mock.continuation("Hi") == continuation(BACKUP, "Hi", TOKENS)
    assert mock.continuation(first_tokens(PRIMARY, 2), 4) == "".join(answer_tokens(PRIMARY, 4)[2:])


# --- continuing, per format -------------------------------------------------------


@pytest.mark.parametrize("path", FORMATS)
@pytest.mark.parametrize("k", [1, 3])
async def test_backup_completes_the_primarys_answer(
    mock: MockProvider, client: httpx.AsyncClient, path: str, k: int
) -> None:
    prefill = first_tokens(PRIMARY, k)
    answer = parse(path, await client.post(path, json=body(path, prefill)))
    assert prefill + answer.text == expected_answer(PRIMARY, TOKENS)
    assert answer.text == mock.continuation(prefill)
    assert (answer.prompt_tokens, answer.completion_tokens) == (prompt_tokens(prefill), TOKENS - k)
    assert answer.finish in ("stop", "end_turn")
    stats = (await client.get("/stats")).json()
    assert (stats["prefills"], stats["prefills_refused"]) == (1, 0)


@pytest.mark.parametrize("path", FORMATS)
async def test_non_streamed_answers_continue_too(client: httpx.AsyncClient, path: str) -> None:
    prefill = first_tokens(PRIMARY, 2)
    answer = parse_whole(path, await client.post(path, json=body(path, prefill, stream=False)))
    assert prefill + answer.text == expected_answer(PRIMARY, TOKENS)
    assert (answer.prompt_tokens, answer.completion_tokens) == (prompt_tokens(prefill), TOKENS - 2)


@pytest.mark.parametrize("path", FORMATS)
async def test_foreign_prefill_continues_with_the_mocks_words(
    client: httpx.AsyncClient, path: str
) -> None:
    prefill = "Sure, the relay is"
    answer = parse(path, await client.post(path, json=body(path, prefill)))
    assert answer.text == "".join(answer_tokens(BACKUP, TOKENS)[1:])
    assert answer.completion_tokens == TOKENS - 1


async def test_a_failover_continues_where_the_cut_stream_stopped() -> None:
    async with (
        MockProvider(name=PRIMARY, tokens=TOKENS, fault="cut=4") as primary,
        MockProvider(name=BACKUP, tokens=TOKENS) as backup,
        httpx.AsyncClient() as http,
    ):
        sse, received = SSEParser(), []
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", primary.url + OPENAI, json=body(OPENAI, None)) as r:
                async for chunk in r.aiter_bytes():
                    received += sse.feed(chunk)
        prefill = "".join(
            msgspec.json.decode(e.data)["choices"][0]["delta"].get("content", "") for e in received
        )
        assert prefill == first_tokens(PRIMARY, 4)
        answer = parse(OPENAI, await http.post(backup.url + OPENAI, json=body(OPENAI, prefill)))
    assert prefill + answer.text == expected_answer(PRIMARY, TOKENS)


@pytest.mark.parametrize("path", FORMATS)
async def test_max_tokens_limits_the_tokens_the_continuation_adds(
    client: httpx.AsyncClient, path: str
) -> None:
    limit = {"options": {"num_predict": 2}} if path == OLLAMA else {"max_tokens": 2}
    prefill = first_tokens(PRIMARY, 2)
    answer = parse(path, await client.post(path, json=body(path, prefill, **limit)))
    assert answer.text == "".join(answer_tokens(PRIMARY, TOKENS)[2:4])
    assert answer.completion_tokens == 2
    assert answer.finish in ("length", "max_tokens")


async def test_a_prefill_holding_the_whole_answer_adds_nothing(client: httpx.AsyncClient) -> None:
    prefill = expected_answer(PRIMARY, TOKENS)
    answer = parse(OPENAI, await client.post(OPENAI, json=body(OPENAI, prefill)))
    assert (answer.text, answer.completion_tokens, answer.finish) == ("", 0, "stop")


async def test_faults_count_the_continuations_tokens(client: httpx.AsyncClient) -> None:
    prefill = first_tokens(PRIMARY, 2)
    response = await client.post(OPENAI, json=body(OPENAI, prefill, model="m+error_after=2"))
    sse = SSEParser()
    events = sse.feed(response.content) + sse.close()
    chunks = [msgspec.json.decode(e.data) for e in events]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "".join(answer_tokens(PRIMARY, TOKENS)[2:4])
    assert chunks[-1]["error"]["code"] == "overloaded"


# --- what is not a prefill, and refusals --------------------------------------------


async def test_openai_trailing_assistant_without_continue_is_a_new_turn(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    prefill = first_tokens(PRIMARY, 3)
    request = body(OPENAI, prefill)
    del request["continue_final_message"], request["add_generation_prompt"]
    answer = parse(OPENAI, await client.post(OPENAI, json=request))
    assert (answer.text, answer.completion_tokens) == (expected_answer(BACKUP, TOKENS), TOKENS)
    assert answer.prompt_tokens == prompt_tokens(prefill)  # the message is still prompt
    assert mock.stats()["prefills"] == 0


async def test_openai_continue_without_generation_prompt_flag_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    prefill = first_tokens(PRIMARY, 2)
    request = body(OPENAI, prefill)
    del request["add_generation_prompt"]
    answer = parse(OPENAI, await client.post(OPENAI, json=request))
    assert prefill + answer.text == expected_answer(PRIMARY, TOKENS)


async def test_openai_continue_with_generation_prompt_is_refused_as_vllm_does(
    client: httpx.AsyncClient,
) -> None:
    request = body(OPENAI, "Hi", add_generation_prompt=True)
    response = await client.post(OPENAI, json=request)
    assert response.status_code == 400
    assert "add_generation_prompt" in response.json()["error"]["message"]


async def test_openai_continue_after_a_user_message_is_a_normal_answer(
    client: httpx.AsyncClient,
) -> None:
    request = body(OPENAI, None, continue_final_message=True)
    answer = parse(OPENAI, await client.post(OPENAI, json=request))
    assert answer.text == expected_answer(BACKUP, TOKENS)


async def test_anthropic_prefill_as_text_blocks(client: httpx.AsyncClient) -> None:
    prefill = first_tokens(PRIMARY, 3)
    blocks = [{"type": "text", "text": prefill[:5]}, {"type": "text", "text": prefill[5:]}]
    request = body(ANTHROPIC, None)
    request["messages"].append({"role": "assistant", "content": blocks})
    answer = parse(ANTHROPIC, await client.post(ANTHROPIC, json=request))
    assert prefill + answer.text == expected_answer(PRIMARY, TOKENS)


@pytest.mark.parametrize("prefill", ["Hello from mock-a. ", "Sure,\n"])
async def test_anthropic_refuses_a_prefill_ending_in_whitespace(
    mock: MockProvider, client: httpx.AsyncClient, prefill: str
) -> None:
    response = await client.post(ANTHROPIC, json=body(ANTHROPIC, prefill))
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages: final assistant content cannot end with trailing whitespace",
        },
    }
    stats = mock.stats()
    assert (stats["prefills"], stats["prefills_refused"]) == (0, 1)
    assert stats["log"][-1]["status"] == 400


NOPREFILL_BODIES = {
    OPENAI: {
        "error": {
            "message": "Unrecognized request argument supplied: continue_final_message",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    },
    ANTHROPIC: {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "This model does not support assistant message prefill. "
            "The conversation must end with a user message.",
        },
    },
    OLLAMA: {"error": "this model does not support continuing an assistant message"},
}


@pytest.mark.parametrize("path", FORMATS)
@pytest.mark.parametrize("where", ["suffix", "default"])
async def test_noprefill_refuses_prefills_in_the_providers_words(
    mock: MockProvider, client: httpx.AsyncClient, path: str, where: str
) -> None:
    model = "m+noprefill" if where == "suffix" else "m"
    if where == "default":
        mock.set_fault("noprefill")
    refused = await client.post(path, json=body(path, first_tokens(PRIMARY, 2), model=model))
    assert refused.status_code == 400
    assert refused.json() == NOPREFILL_BODIES[path]
    normal = parse(path, await client.post(path, json=body(path, None, model=model)))
    assert normal.text == expected_answer(BACKUP, TOKENS)
    stats = mock.stats()
    assert (stats["prefills"], stats["prefills_refused"]) == (0, 1)
    assert [e["status"] for e in stats["log"]] == [400, 200]


async def test_noprefill_server_default_from_the_control_api(client: httpx.AsyncClient) -> None:
    set_fault = await client.post("/control/faults", content=b"noprefill")
    assert set_fault.json() == {"fault": {"noprefill": True}}
    request = body(OLLAMA, "Hello from mock-a.", stream=False)
    assert (await client.post(OLLAMA, json=request)).status_code == 400
    await client.post("/control/faults", json={})
    answer = parse_whole(OLLAMA, await client.post(OLLAMA, json=request))
    assert answer.text == "".join(answer_tokens(BACKUP, TOKENS)[1:])


async def test_stats_count_prefills_and_reset_zeroes_them(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    prefill = first_tokens(PRIMARY, 2)
    await client.post(OLLAMA, json=body(OLLAMA, prefill))
    await client.post(ANTHROPIC, json=body(ANTHROPIC, prefill))
    await client.post(OPENAI, json=body(OPENAI, prefill, model="m+noprefill"))
    await client.post(OPENAI, json=body(OPENAI, None))
    stats = (await client.get("/stats")).json()
    assert (stats["requests"], stats["prefills"], stats["prefills_refused"]) == (4, 2, 1)
    await client.post("/control/reset")
    assert (mock.stats()["prefills"], mock.stats()["prefills_refused"]) == (0, 0)


# --- through the official SDK -------------------------------------------------------


async def test_openai_sdk_continues_a_prefill(mock: MockProvider) -> None:
    prefill = first_tokens(PRIMARY, 3)
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x") as sdk:
        stream = await sdk.chat.completions.create(
            model="m",
            messages=[
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": prefill},
            ],
            stream=True,
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert prefill + text == expected_answer(PRIMARY, TOKENS)
    assert mock.stats()["prefills"] == 1
