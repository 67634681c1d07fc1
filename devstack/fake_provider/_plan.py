"""What a chat request asks for, and the plan of its answer, shared by the wire formats.

``ChatRequest`` decodes the parts of all three request shapes (OpenAI,
Anthropic, Ollama) that the fake provider looks at; the server turns it and
the fault in force into a ``Plan`` before writing the first byte, and a
``WireFormat`` renders that plan in one provider's words. The formats hold no
state, so the three of them are built once and shared by every request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import msgspec

from devstack.fake_provider._answer import expected_answer
from devstack.fake_provider._faults import ErrorKind, Fault

__all__ = ["ChatRequest", "Plan", "WireFormat", "decode_request", "estimate_prompt_tokens"]


class _Block(msgspec.Struct):
    text: str = ""


class _Msg(msgspec.Struct):
    content: str | list[_Block] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _OllamaOptions(msgspec.Struct):
    num_predict: int | None = None


class ChatRequest(msgspec.Struct):
    """The parts of any of the three request shapes that the mock looks at."""

    model: str = ""
    messages: list[_Msg] = []
    system: str | list[_Block] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    options: _OllamaOptions | None = None


_decoder = msgspec.json.Decoder(ChatRequest)


def _chars(content: str | list[_Block] | None) -> int:
    if content is None:
        return 0
    return len(content) if isinstance(content, str) else sum(len(b.text) for b in content)


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """A deterministic prompt size: total characters / 4, at least 1."""
    chars = _chars(request.system) + sum(_chars(m.content) for m in request.messages)
    return max(chars // 4, 1)


def decode_request(body: bytes) -> ChatRequest:
    """The request body as a ``ChatRequest``; raises ``msgspec.DecodeError`` if it is not one."""
    return _decoder.decode(body)


@dataclasses.dataclass(slots=True)
class Plan:
    """Everything decided about one chat request before the first byte is written."""

    name: str
    model: str
    full_model: str
    fault: Fault
    tokens: int
    length_limited: bool
    prompt_tokens: int
    stream: bool
    include_usage: bool
    status: int
    request_no: int
    created: int

    @property
    def answer(self) -> str:
        return expected_answer(self.name, self.tokens)

    @property
    def ending(self) -> tuple[str, int]:
        """How the answer ends, and after how many tokens: the earliest of the faults set."""
        fault = self.fault
        endings = [("cut", fault.cut), ("stall", fault.stall), ("error", fault.error_after)]
        chosen = min(((n, name) for name, n in endings if n is not None), default=None)
        if chosen is None:
            return "normal", self.tokens
        return chosen[1], min(chosen[0], self.tokens)


class WireFormat(Protocol):
    """One provider's wire format: events of a streamed answer, whole answers, error bodies.

    ``opening``, ``token_events``, ``closing`` and ``terminator`` are the parts of a
    stream in order, so a fault can cut, stall or corrupt it between any two.
    """

    content_type: bytes

    def wants_stream(self, request: ChatRequest) -> bool: ...
    def limit(self, request: ChatRequest) -> int | None: ...
    def opening(self, plan: Plan) -> list[bytes]: ...
    def token_events(self, plan: Plan) -> list[bytes]: ...
    def closing(self, plan: Plan) -> list[bytes]: ...
    def terminator(self, plan: Plan) -> list[bytes]: ...
    def garbage(self) -> bytes: ...
    def stream_error(self, kind: ErrorKind) -> bytes: ...
    def error_body(self, kind: ErrorKind) -> Any: ...
    def full(self, plan: Plan) -> Any: ...
