"""Structured output for the fake provider: a JSON answer that follows the request's schema.

A request with ``response_format`` ``json_object`` (OpenAI's; Ollama's ``format:
"json"``; Gemini's ``responseMimeType: application/json``) gets ``{"answer": "<the text
answer>"}``; with a schema (``json_schema``, Ollama's ``format`` object,
Gemini's ``responseJsonSchema``) it gets a document built from the schema:
every property (required or not) with a value of its type (strings say who
answered, numbers are 1, booleans true, arrays one item, ``enum``/``const`` their
first value), so that it validates. The answer is split into tokens like any
other, so streams, cuts and prefills work on JSON as on text.

**Tool calls** (OpenAI's, Anthropic's, Ollama's and Bedrock's formats): a request that offers
``tools``, with a ``tool_choice`` other than none (``"none"``, ``{"type":
"none"}``) and a last message that carries no tool result (an OpenAI ``tool``
message, an Anthropic ``tool_result`` block; Gemini's requests, read as OpenAI's,
too: a ``functionResponse`` part), is answered by one call
(``tool_call``) to the tool ``tool_choice`` names, else the first, with
``tool_arguments(schema, name)`` as its arguments; after a tool result the
answer is text again, so a two-turn tool loop ends. ``answer_texts`` picks, for
the server, between a tool call, a JSON answer and text (None).
"""

from __future__ import annotations

from typing import Any

import msgspec

from devstack.fake_provider._answer import expected_answer
from devstack.fake_provider._plan import ChatRequest, ToolCall

__all__ = [
    "answer_texts",
    "json_answer",
    "json_tokens_of",
    "logged_options",
    "sample",
    "structured_texts",
    "tool_arguments",
    "tool_call",
]

# Nesting the fake follows before it answers null (a recursive schema would not end).
_MAX_DEPTH = 8


def sample(schema: Any, name: str, depth: int = 0) -> Any:
    """A value that ``schema`` accepts (the subset of JSON Schema structured outputs use)."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return sample(schema[key][0], name, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {key: sample(sub, name, depth + 1) for key, sub in props.items()}
    if kind == "array":
        return [sample(schema.get("items", {}), name, depth + 1)]
    return {"string": f"from {name}", "integer": 1, "number": 1, "boolean": True}.get(kind)


def json_answer(name: str, text: str, schema: Any | None) -> str:
    """The JSON text answered for a ``json_object`` (schema None) or ``json_schema`` request."""
    document = {"answer": text} if schema is None else sample(schema, name)
    return msgspec.json.encode(document).decode()


def json_tokens_of(answer: str, tokens: int) -> tuple[str, ...]:
    """``answer`` cut into ``tokens`` pieces (fewer if it is short), joined back exactly."""
    count = max(1, min(tokens, len(answer)))
    size = -(-len(answer) // count)
    return tuple(answer[i : i + size] for i in range(0, len(answer), size))


def structured_texts(request: ChatRequest, name: str, tokens: int) -> tuple[str, ...] | None:
    """The tokens of a JSON answer, when the request asks for one (OpenAI's
    ``response_format``, Ollama's ``format``); None for a text answer."""
    fmt, schema, gemini = request.response_format, None, request.generation_config
    if fmt is not None and fmt.type in ("json_object", "json_schema"):
        schema = fmt.json_schema.schema if fmt.json_schema is not None else None
    elif request.format is not None:
        schema = request.format if isinstance(request.format, dict) else None
    elif gemini is not None and gemini.response_mime_type == "application/json":
        schema = gemini.response_json_schema
    else:
        return None
    return json_tokens_of(json_answer(name, expected_answer(name, tokens), schema), tokens)


def tool_arguments(parameters: Any, name: str) -> str:
    """The arguments (compact JSON) the mock ``name`` calls a tool with ``parameters`` with."""
    document = sample(parameters if parameters is not None else {"type": "object"}, name)
    return msgspec.json.encode(document).decode()


def tool_call(request: ChatRequest, name: str, call_id: str) -> ToolCall | None:
    """The tool call ``call_id`` that answers ``request``, or None for a text answer.

    Raises ``ValueError`` (a 400) when ``tool_choice`` names a tool not offered.
    """
    if not request.may_call_tools():
        return None
    turns = request.messages or request.contents  # Gemini's turns are its contents
    if turns and turns[-1].tool_results():
        return None  # the tool loop's second turn: answer in words
    specs = [spec for spec in (t.spec() for t in request.tools) if spec is not None]
    wanted = request.named_tool()
    if wanted is not None:
        specs = [spec for spec in specs if spec[0] == wanted]
        if not specs:
            raise ValueError(f"tool_choice names {wanted!r}, which is not in tools")
    if not specs:
        return None
    tool, schema = specs[0]
    return ToolCall(call_id, tool, tool_arguments(schema, name))


def answer_texts(
    request: ChatRequest, name: str, tokens: int, call_id: str | None
) -> tuple[ToolCall | None, tuple[str, ...] | None]:
    """The tool call that answers ``request`` (only if ``call_id`` is given: the format
    calls tools) and the answer's tokens: the call's arguments, a JSON answer, or None
    for text. Raises ``ValueError`` as ``tool_call`` does."""
    tool = None if call_id is None else tool_call(request, name, call_id)
    if tool is None:
        return None, structured_texts(request, name, tokens)
    return tool, json_tokens_of(tool.arguments, tokens)


def _tool_options(request: ChatRequest, options: dict[str, Any]) -> None:
    if request.tools:
        options["tools"] = len(request.tools)
    gemini = request.tool_config.function_calling_config if request.tool_config else None
    if gemini is not None:  # in Gemini's words, not the tool_choice read from them
        options["tool_config"] = {"functionCallingConfig": msgspec.to_builtins(gemini)}
    elif request.tool_choice is not None:
        options["tool_choice"] = msgspec.to_builtins(request.tool_choice)
    results = sum(m.tool_results() for m in request.messages)
    results += sum(c.tool_results() for c in request.contents)
    if results:
        options["tool_results"] = results


def logged_options(request: ChatRequest) -> dict[str, Any] | None:
    """What the stats log shows a request asked beyond text (a test reads it)."""
    options: dict[str, Any] = {}
    if request.input is not None:  # an embeddings request: how many texts, what vectors
        options["inputs"] = 1 if isinstance(request.input, str) else len(request.input)
        extra = {"dimensions": request.dimensions, "encoding_format": request.encoding_format}
        options |= {key: value for key, value in extra.items() if value is not None}
    if request.response_format is not None and request.response_format.type != "text":
        options["response_format"] = request.response_format.type
    if request.format is not None:
        options["format"] = "json" if request.format == "json" else "schema"
    gemini = request.generation_config
    if gemini is not None and gemini.response_mime_type is not None:
        options["response_mime_type"] = gemini.response_mime_type
        if gemini.response_json_schema is not None:
            options["response_json_schema"] = True
    if gemini is not None and gemini.thinking_config is not None:
        options["thinking_config"] = gemini.thinking_config
    if request.reasoning_effort is not None:
        options["reasoning_effort"] = request.reasoning_effort
    if request.logit_bias is not None:
        options["logit_bias"] = True
    if request.thinking is not None:
        options["thinking"] = request.thinking
    if request.logprobs:
        options["logprobs"] = request.top_logprobs or 0
    _tool_options(request, options)
    images = _image_sources(request)
    if images:
        options["images"] = images
    return options or None


def _image_sources(request: ChatRequest) -> list[str]:
    """How each image came, in the provider's words: OpenAI ``url``/``data`` (a data
    URL), Anthropic's ``source.type`` (``base64``/``url``), Ollama's ``images`` (``base64``),
    Bedrock's ``image.source`` key (``bytes``), Gemini's ``inlineData`` (``base64``) and
    ``fileData`` (``url``) parts."""
    found = [
        "base64" if part.inline_data is not None else "url"
        for content in request.contents
        for part in content.parts
        if part.inline_data is not None or part.file_data is not None
    ]
    for message in request.messages:
        if message.images:
            found += ["base64"] * len(message.images)
        for block in message.content if isinstance(message.content, list) else ():
            if block.type == "image_url" and block.image_url is not None:
                found.append("data" if block.image_url.url.startswith("data:") else "url")
            elif block.type == "image" and block.source is not None:
                found.append(block.source.type)
            elif block.image is not None:
                found.append(next(iter(block.image.source), ""))
    return found
