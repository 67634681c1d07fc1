"""What a chat request asks for, and the plan of its answer, shared by the wire formats.

``ChatRequest`` decodes the parts of all three request shapes (OpenAI,
Anthropic, Ollama) that the fake provider looks at; the server turns it and
the fault in force into a ``Plan`` before writing the first byte, and a
``WireFormat`` renders that plan in one provider's words. The formats hold no
state, so the three of them are built once and shared by every request.

A request whose conversation ends in an assistant message may ask to continue
it (a prefill); each format says when (``WireFormat.prefill``), and the plan
then starts at the first token the prefill does not hold yet (``Plan.start``).
Only the last message's role is looked at, so ordinary requests cost no more.

The ``tools`` and ``tool_choice`` of OpenAI and Anthropic (and Ollama's tools,
OpenAI's shape without ``tool_choice``) are decoded into the
same structs (``_Tool.spec``, ``ChatRequest.may_call_tools``/``named_tool``
read either shape), and so are tool results (``_Msg.tool_results``: an OpenAI or
Ollama ``tool`` message, or Anthropic's ``tool_result`` blocks); a plan that answers with a tool
call carries it (``Plan.tool``), its arguments cut into the plan's tokens like
a JSON answer. Bedrock Converse's ``toolConfig`` is read as the Anthropic tools
and ``tool_choice`` it means (``_ToolConfig``), its ``toolResult`` blocks as tool results.
Gemini's ``functionDeclarations`` are read as OpenAI's function tools, its
``toolConfig.functionCallingConfig`` as the ``tool_choice`` it means, and its
``functionResponse`` parts as tool results (``_GeminiContent.tool_results``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import msgspec

from devstack.fake_provider._answer import answer_tokens, json_tokens, reasoning_tokens
from devstack.fake_provider._faults import ErrorKind, Fault

__all__ = [
    "ChatRequest",
    "Plan",
    "Prefill",
    "ToolCall",
    "WireFormat",
    "content_text",
    "decode_request",
    "estimate_prompt_tokens",
    "trailing_assistant",
]


class _Media(msgspec.Struct):
    """Where an image is: OpenAI's ``image_url.url``, Anthropic's ``source.type``."""

    url: str = ""
    type: str = ""


class _BedrockImage(msgspec.Struct):
    """A Converse ``image`` block: its ``format`` and ``source`` (``{"bytes": ...}``)."""

    format: str = ""
    source: dict[str, Any] = {}


class _Block(msgspec.Struct):
    text: str = ""
    # Of the block types the mock looks for Anthropic's ``tool_result`` and images
    # (OpenAI's ``image_url`` parts, Anthropic's ``image`` blocks), which it logs.
    type: str = ""
    image_url: _Media | None = None
    source: _Media | None = None
    # Bedrock Converse's blocks are named by their one key: a tool result, an image.
    tool_result: Any = msgspec.field(default=None, name="toolResult")
    image: _BedrockImage | None = None
    # Gemini's parts, too: a call, a tool's result, an image as data or by URI.
    function_call: Any = msgspec.field(default=None, name="functionCall")
    function_response: Any = msgspec.field(default=None, name="functionResponse")
    inline_data: Any = msgspec.field(default=None, name="inlineData")
    file_data: Any = msgspec.field(default=None, name="fileData")


class _Function(msgspec.Struct, omit_defaults=True):
    name: str = ""
    description: str | None = None
    parameters: Any = None
    arguments: Any = None  # a call's (a JSON string; Ollama's an object)
    # Gemini's declaration: full JSON Schema here, the OpenAPI subset in ``parameters``.
    parameters_json_schema: Any = msgspec.field(default=None, name="parametersJsonSchema")


class _Tool(msgspec.Struct):
    type: str = ""
    function: _Function | None = None  # OpenAI's function tool
    name: str = ""  # Anthropic's tool: its name and ``input_schema``
    input_schema: Any = None
    # Gemini's tool: the functions it declares (read as OpenAI's tools: ``_declared``).
    function_declarations: list[_Function] = msgspec.field(
        default_factory=list, name="functionDeclarations"
    )

    def spec(self) -> tuple[str, Any] | None:
        """The tool's name and its arguments' schema; None for a tool the mock cannot call
        (neither an OpenAI function nor an Anthropic tool with an ``input_schema``)."""
        if self.function is not None:
            return self.function.name, self.function.parameters
        if self.input_schema is not None:
            return self.name, self.input_schema
        return None


class _ToolChoice(msgspec.Struct, omit_defaults=True):
    type: str = ""
    function: _Function | None = None
    name: str | None = None  # Anthropic's ``{"type": "tool", "name": ...}``

    def named(self) -> str | None:
        """The tool this choice requires by name (OpenAI's ``function``, Anthropic's ``tool``)."""
        if self.function is not None:
            return self.function.name
        return self.name if self.type == "tool" else None


class _ToolCallMsg(msgspec.Struct):
    id: str = ""
    type: str = "function"
    function: _Function | None = None


class _Msg(msgspec.Struct):
    role: str = ""
    content: str | list[_Block] | None = None
    tool_calls: list[_ToolCallMsg] | None = None
    tool_call_id: str | None = None
    images: list[str] | None = None  # Ollama's: base64 images beside the text

    def tool_results(self) -> int:
        """How many tool results this message carries: an OpenAI ``tool`` message is one;
        an Anthropic user message one per ``tool_result`` block."""
        if self.role == "tool":
            return 1
        if isinstance(self.content, list):
            return sum(
                1 for b in self.content if b.type == "tool_result" or b.tool_result is not None
            )
        return 0


class _ToolSpec(msgspec.Struct, rename="camel"):
    name: str = ""
    input_schema: dict[str, Any] = {}  # the schema is under ``json``


class _BedrockTool(msgspec.Struct, rename="camel"):
    tool_spec: _ToolSpec | None = None


class _FunctionCallingConfig(msgspec.Struct, rename="camel", omit_defaults=True):
    """Gemini's ``toolConfig.functionCallingConfig``: ``AUTO``, ``NONE`` or ``ANY`` (of the
    ``allowedFunctionNames``, if named)."""

    mode: str = ""
    allowed_function_names: list[str] = []

    def choice(self) -> str | _ToolChoice:
        """The ``tool_choice`` this means; ``ANY`` of one name requires that function."""
        if self.mode == "ANY" and len(self.allowed_function_names) == 1:
            named = _Function(name=self.allowed_function_names[0])
            return _ToolChoice(type="function", function=named)
        return {"NONE": "none", "ANY": "required"}.get(self.mode, "auto")


class _ToolConfig(msgspec.Struct, rename="camel"):
    """Bedrock Converse's tools and ``toolChoice`` (``{"auto": {}}``, ``{"any": {}}``,
    ``{"tool": {"name": ...}}``); or Gemini's, of the same name: ``functionCallingConfig``."""

    tools: list[_BedrockTool] = []
    tool_choice: dict[str, dict[str, Any]] | None = None
    function_calling_config: _FunctionCallingConfig | None = None

    def anthropic(self) -> tuple[list[_Tool], _ToolChoice | None]:
        """The tools and the choice in Anthropic's words, which the mock reads."""
        specs = [t.tool_spec for t in self.tools if t.tool_spec is not None]
        tools = [_Tool(name=s.name, input_schema=s.input_schema.get("json", {})) for s in specs]
        kind, named = next(iter((self.tool_choice or {}).items()), (None, {}))
        if kind is None:
            return tools, None
        return tools, _ToolChoice(type=kind, name=named.get("name") if kind == "tool" else None)


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _JsonSchema(msgspec.Struct):
    schema: Any = None


class _ResponseFormat(msgspec.Struct):
    type: str = "text"
    json_schema: _JsonSchema | None = None


class _OllamaOptions(msgspec.Struct):
    num_predict: int | None = None


class _GeminiContent(msgspec.Struct):
    role: str = ""
    parts: list[_Block] = []

    def tool_results(self) -> int:
        """How many tool results this turn carries: its ``functionResponse`` parts."""
        return sum(1 for part in self.parts if part.function_response is not None)


def _declared(tools: list[_Tool]) -> list[_Tool]:
    """Gemini's declarations as OpenAI's function tools (their JSON Schema, if given)."""
    return [
        _Tool(function=_Function(name=f.name, parameters=f.parameters_json_schema or f.parameters))
        for tool in tools
        for f in tool.function_declarations
    ]


class _GenerationConfig(msgspec.Struct, rename="camel"):
    max_output_tokens: int | None = None
    response_mime_type: str | None = None
    response_json_schema: Any = None
    thinking_config: Any = None


class _InferenceConfig(msgspec.Struct, rename="camel"):
    max_tokens: int | None = None


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
    continue_final_message: bool | None = None  # vLLM's prefill switch (OpenAI format)
    # Structured output and options the mock logs (``Plan.options``): OpenAI's
    # response_format, reasoning_effort and logit_bias; Ollama's format.
    response_format: _ResponseFormat | None = None
    reasoning_effort: str | None = None
    logit_bias: Any = None
    format: Any = None
    thinking: Any = None  # Anthropic's extended thinking: {type: enabled, budget_tokens}
    logprobs: bool | None = None  # OpenAI's: log probabilities of each answer token
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    # OpenAI's function tools or Anthropic's tools, and which of them the answer must call.
    tools: list[_Tool] = []
    tool_choice: str | _ToolChoice | None = None
    # Gemini's: turns of role user/model, the system prompt, maxOutputTokens.
    contents: list[_GeminiContent] = []
    system_instruction: _GeminiContent | None = msgspec.field(
        default=None, name="systemInstruction"
    )
    generation_config: _GenerationConfig | None = msgspec.field(
        default=None, name="generationConfig"
    )
    # Bedrock Converse's: inferenceConfig.maxTokens (its system is a list of text blocks).
    inference_config: _InferenceConfig | None = msgspec.field(default=None, name="inferenceConfig")
    tool_config: _ToolConfig | None = msgspec.field(default=None, name="toolConfig")
    # An embeddings request's (``_embeddings.py``): its texts, and the vectors asked.
    input: str | list[str] | None = None
    dimensions: int | None = None
    encoding_format: str | None = None

    def __post_init__(self) -> None:
        config = self.tool_config
        if config is not None and config.function_calling_config is not None:  # Gemini's
            self.tool_choice = config.function_calling_config.choice()
        elif config is not None:  # Bedrock's: read as Anthropic's tools
            self.tools, self.tool_choice = config.anthropic()
        if any(tool.function_declarations for tool in self.tools):  # Gemini's
            self.tools = _declared(self.tools)

    def may_call_tools(self) -> bool:
        """Whether tools are offered and ``tool_choice`` is not none (OpenAI's ``"none"``,
        Anthropic's ``{"type": "none"}``)."""
        choice = self.tool_choice
        if not self.tools or choice is None:
            return bool(self.tools)
        return choice != "none" if isinstance(choice, str) else choice.type != "none"

    def named_tool(self) -> str | None:
        """The tool ``tool_choice`` requires by name, if it names one."""
        choice = self.tool_choice
        return None if isinstance(choice, str) or choice is None else choice.named()


_decoder = msgspec.json.Decoder(ChatRequest)


def _chars(content: str | list[_Block] | None) -> int:
    if content is None:
        return 0
    return len(content) if isinstance(content, str) else sum(len(b.text) for b in content)


def content_text(content: str | list[_Block] | None) -> str:
    """A message's text: the string, or its text blocks joined."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(b.text for b in content)


def trailing_assistant(request: ChatRequest) -> str | None:
    """The text of the conversation's last message if an assistant wrote it, else None."""
    messages = request.messages
    if not messages or messages[-1].role != "assistant":
        return None
    return content_text(messages[-1].content)


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """A deterministic prompt size: total characters / 4, at least 1."""
    chars = _chars(request.system) + sum(_chars(m.content) for m in request.messages)
    chars += sum(_chars(c.parts) for c in request.contents)
    if request.system_instruction is not None:
        chars += _chars(request.system_instruction.parts)
    return max(chars // 4, 1)


def decode_request(body: bytes) -> ChatRequest:
    """The request body as a ``ChatRequest``; raises ``msgspec.DecodeError`` if it is not one."""
    return _decoder.decode(body)


class Prefill(NamedTuple):
    """The assistant text a request asks to continue, and why the provider refuses it (if so)."""

    text: str
    refusal: str | None = None


class ToolCall(NamedTuple):
    """The one tool call an answer makes: its id, the function's name, its JSON arguments."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass(slots=True)
class Plan:
    """Everything decided about one chat request before the first byte is written."""

    name: str
    model: str
    full_model: str
    fault: Fault
    tokens: int  # the tokens this answer carries (after the prefill's, if any)
    length_limited: bool
    prompt_tokens: int
    stream: bool
    include_usage: bool
    status: int
    request_no: int
    created: int
    start: int = 0  # index of the first token sent: how many of them the prefill holds
    prefilled: bool = False
    refusal: Any = None  # the 400 body that refuses the request's prefill, if it is refused
    texts: tuple[str, ...] | None = None  # the tokens of a JSON answer (``_structured.py``)
    options: dict[str, Any] | None = None  # the request's options, as the stats log shows them
    tool: ToolCall | None = None  # the answer is this call; ``texts`` are its arguments' pieces
    embed: ChatRequest | None = None  # an embeddings request: the vectors it asks for

    @property
    def answer(self) -> str:
        """The text this answer carries (a continuation's own text, without the prefill)."""
        if self.texts is not None:
            return "".join(self.texts[: self.tokens])
        return "".join(answer_tokens(self.name, self.start + self.tokens)[self.start :])

    @property
    def reasoning(self) -> tuple[str, ...]:
        """The reasoning deltas streamed before the answer (``think=N``; none without it)."""
        return reasoning_tokens(self.fault.think or 0)

    def deltas(self) -> tuple[bytes, ...]:
        """The tokens to send, JSON-encoded (cached per answer length)."""
        if self.texts is not None:
            return tuple(msgspec.json.encode(t) for t in self.texts[: self.tokens])
        if not self.start:
            return json_tokens(self.name, self.tokens)
        return json_tokens(self.name, self.start + self.tokens)[self.start :]

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
    ``prefill`` finds the assistant text a request asks to continue (None: a new
    turn); ``noprefill_body`` is how a model without prefill support refuses it.
    """

    content_type: bytes

    def wants_stream(self, request: ChatRequest) -> bool: ...
    def limit(self, request: ChatRequest) -> int | None: ...
    def prefill(self, request: ChatRequest) -> Prefill | None: ...
    def noprefill_body(self) -> Any: ...
    def opening(self, plan: Plan) -> list[bytes]: ...
    def token_events(self, plan: Plan) -> list[bytes]: ...
    def closing(self, plan: Plan) -> list[bytes]: ...
    def terminator(self, plan: Plan) -> list[bytes]: ...
    def garbage(self) -> bytes: ...
    def stream_error(self, kind: ErrorKind) -> bytes: ...
    def error_body(self, kind: ErrorKind) -> Any: ...
    def full(self, plan: Plan) -> Any: ...
