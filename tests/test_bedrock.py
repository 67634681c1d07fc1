"""AWS Bedrock pools (``kind: bedrock``): ConverseStream, SigV4-signed, binary event stream.

Real workers against the fake provider, which speaks Bedrock's event-stream
frames and refuses an unsigned request (403 ``Missing Authentication Token``);
then the adapter's pieces alone, for what the fake never sends.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from broker import JobOptions
from broker._protocol import Job, Message
from devstack import MockProvider, expected_answer
from devstack.fake_provider._bedrock import frame
from tests._harness import BEDROCK_KEYS, StartStack, upstream
from workers.providers import (
    ContextLengthExceeded,
    Finish,
    Malformed,
    RateLimited,
    StreamInterrupted,
    TextDelta,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.providers._eventstream import BadFrame, EventMessage, EventStreamParser
from workers.providers.bedrock import _exception, _StreamState, request_body

TOKENS = 6
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
FAST: dict[str, Any] = {"max_retries": 0, "backoff_base_s": 0.05}
AWS = BEDROCK_KEYS
STREAM_PATH = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream"
FULL_A = expected_answer("mock-a", TOKENS)


def _bedrock(name: str = "bedrock", **settings: Any) -> Any:
    return upstream(MockProvider(name=name, tokens=TOKENS), "bedrock", **AWS, **FAST, **settings)


def _openai(name: str) -> Any:
    return upstream(MockProvider(name=name, tokens=TOKENS), **FAST)


async def test_a_bedrock_model_answers_with_usage_and_finish_reason(
    relay_stack: StartStack,
) -> None:
    async with relay_stack({"br": _bedrock()}, {"chat": [("br", MODEL)]}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
        [call] = s.providers["br"].stats()["log"]
    assert text == expected_answer("bedrock", TOKENS)
    done = handle.done
    assert done is not None and (done.model, done.finish_reason) == (MODEL, "stop")
    assert done.usage.completion_tokens == TOKENS and done.usage.prompt_tokens >= 1
    assert (call["path"], call["status"]) == (STREAM_PATH, 200)  # the id's ":" encoded


async def test_max_tokens_reaches_bedrock_as_inference_config(relay_stack: StartStack) -> None:
    async with relay_stack({"br": _bedrock()}, {"chat": [("br", MODEL)]}) as s:
        handle = await s.relay.submit("hi", route="chat", options=JobOptions(max_tokens=3))
        text = await handle.text()
    assert text == expected_answer("bedrock", 3)
    assert handle.done is not None and handle.done.finish_reason == "length"


async def test_a_cut_bedrock_answer_is_finished_by_an_openai_backup(
    relay_stack: StartStack,
) -> None:
    pools = {"br": _bedrock("mock-a"), "b": _openai("mock-b")}
    targets = [{"pool": "br", "model": f"{MODEL}+cut=3"}, {"pool": "b", "model": "mb"}]
    async with relay_stack(pools, {"chat": {"targets": targets}}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
    assert text == FULL_A  # nothing lost or repeated
    assert [n.kind for n in handle.notices] == ["failover", "resumed"]
    assert handle.done is not None and handle.done.pool == "b"


async def test_a_cut_openai_answer_is_finished_by_a_bedrock_backup(
    relay_stack: StartStack,
) -> None:
    pools = {"a": _openai("mock-a"), "br": _bedrock()}
    targets = [{"pool": "a", "model": "gpt+cut=3"}, {"pool": "br", "model": MODEL}]
    async with relay_stack(pools, {"chat": {"targets": targets}}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
        prefills = s.providers["br"].stats()["prefills"]
    assert text == FULL_A
    assert prefills == 1  # continued from a trailing assistant turn, not restarted
    assert handle.done is not None and handle.done.pool == "br"


@pytest.mark.parametrize(
    ("fault", "code"),
    [("error_after=2", "upstream_unavailable"),  # serviceUnavailableException frame
     ("error_after=2+error=rate_limit", "rate_limited"),  # throttlingException frame
     ("status=429+retry_after=0.1", "rate_limited")],  # before the stream
)  # fmt: skip
async def test_an_exception_fails_over_with_its_code(
    relay_stack: StartStack, fault: str, code: str
) -> None:
    pools = {"br": _bedrock("mock-a"), "b": _openai("mock-b")}
    targets = [{"pool": "br", "model": f"{MODEL}+{fault}"}, {"pool": "b", "model": "mb"}]
    async with relay_stack(pools, {"chat": {"targets": targets}}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
    before = "status" in fault
    assert text == (expected_answer("mock-b", TOKENS) if before else FULL_A)
    assert handle.done is not None and handle.done.pool == "b"
    assert [a.code for a in handle.done.attempts] == [code]


async def test_a_frame_with_a_bad_crc_is_malformed_and_the_rest_still_comes(
    relay_stack: StartStack,
) -> None:
    async with relay_stack({"br": _bedrock()}, {"chat": [("br", f"{MODEL}+malformed=3")]}) as s:
        handle = await s.relay.submit("hi", route="chat")
        text = await handle.text()
    # No backup: the answer goes on, marked degraded (a word may be lost; the fake loses none).
    assert text == expected_answer("bedrock", TOKENS)
    assert handle.done is not None and handle.done.degraded


async def test_an_unsigned_request_is_refused_like_aws_does() -> None:
    async with MockProvider(name="bedrock") as mock, httpx.AsyncClient() as http:
        response = await http.post(f"{mock.url}{STREAM_PATH}", json={"messages": []})
    assert response.status_code == 403
    assert response.json() == {"message": "Missing Authentication Token"}


def test_httpx_sends_the_path_that_was_signed() -> None:
    # The signature covers the path as sent: httpx must not re-encode the id's %3A.
    request = httpx.Request("POST", f"https://bedrock-runtime.us-east-1.amazonaws.com{STREAM_PATH}")
    assert request.url.raw_path == STREAM_PATH.encode()


# --- the adapter's pieces alone ------------------------------------------------------


def _job(**fields: Any) -> Job:
    messages = [
        Message(role="system", content="Be terse."),
        Message(role="user", content="Hi"),
        Message(role="tool", tool_call_id="tooluse_1", content="42"),
        Message(role="assistant", content="Hello."),
    ]
    return Job(id="j1", route="chat", messages=messages, reply_to="r", deadline_ms=0, **fields)


def test_the_request_is_converse_shaped_with_alternating_turns() -> None:
    body = msgspec.json.decode(request_body(_job(max_tokens=9, top_p=0.5, stop=["x"]), "So"))
    assert body == {
        "messages": [
            {"role": "user", "content": [
                {"text": "Hi"},
                {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "42"}]}},
            ]},
            {"role": "assistant", "content": [{"text": "Hello."}, {"text": "So"}]},
        ],
        "system": [{"text": "Be terse."}],
        "inferenceConfig": {"maxTokens": 9, "topP": 0.5, "stopSequences": ["x"]},
    }  # fmt: skip


def _event(event_type: str, payload: Any) -> EventMessage:
    headers = {":event-type": event_type, ":message-type": "event"}
    return EventMessage(headers, msgspec.json.encode(payload))  # type: ignore[arg-type]


def test_the_answer_is_final_when_stop_and_usage_both_came() -> None:
    state = _StreamState()
    assert state.on_message(_event("contentBlockDelta", {"delta": {"text": "Hi"}})) == (
        TextDelta("Hi")
    )
    assert state.on_message(_event("messageStop", {"stopReason": "content_filtered"})) is None
    final = state.on_message(_event("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1}}))
    assert isinstance(final, Finish) and final.reason == "content_filter"
    assert final.usage is not None and (
        final.usage.prompt_tokens,
        final.usage.completion_tokens,
    ) == (3, 1)


def test_a_stream_without_message_stop_is_truncated_and_one_with_it_is_not() -> None:
    with pytest.raises(StreamInterrupted):
        _StreamState().at_end_of_body()
    state = _StreamState()
    state.on_message(_event("messageStop", {"stopReason": "tool_use"}))
    assert state.at_end_of_body().reason == "tool_calls"


def test_bad_frames_are_malformed_or_break_the_stream() -> None:
    assert isinstance(_StreamState().on_message(BadFrame("crc")), Malformed)
    with pytest.raises(StreamInterrupted):
        _StreamState().on_message(BadFrame("prelude", fatal=True))


def _exception_frame(name: str, message: str) -> EventMessage:
    headers = {":message-type": "exception", ":exception-type": name}
    return EventMessage(headers, msgspec.json.encode({"message": message}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "message", "cls"),
    [("throttlingException", "Too many requests", RateLimited),
     ("modelStreamErrorException", "The model failed", UpstreamUnavailable),
     ("internalServerException", "oops", UpstreamUnavailable),
     ("validationException", "Malformed input request", UpstreamRejected),
     ("validationException", "Input is too long for requested model.", ContextLengthExceeded),
     ("somethingNewException", "?", UpstreamUnavailable)],
)  # fmt: skip
def test_exception_frames_map_to_the_error_tree(name: str, message: str, cls: type) -> None:
    error = _exception(_exception_frame(name, message))
    assert type(error) is cls and message in str(error)


def test_the_fakes_frames_parse_into_the_adapters_items() -> None:
    data = frame([(b":event-type", b"contentBlockDelta"), (b":message-type", b"event")],
                 b'{"delta":{"text":"ok"}}')  # fmt: skip
    [message] = EventStreamParser().feed(data)
    assert _StreamState().on_message(message) == TextDelta("ok")
