"""A fake LLM provider: a real HTTP/1.1 server that misbehaves on request.

Tests, the demo and the benchmark need upstreams that answer predictably, fast,
and fail in exactly the ways real providers do. This server speaks the three
wire formats llmrelay's adapters speak (and Azure's paths), chosen by path:

    POST /v1/chat/completions, /chat/completions   OpenAI (SSE, or JSON with stream=false)
    POST /v1/messages                              Anthropic Messages (SSE event stream)
    POST /api/chat                                 Ollama (NDJSON)
    POST /openai/deployments/<d>/chat/completions  Azure OpenAI (OpenAI's format; needs an
                                                   ``api-key`` header and ``?api-version=``)
    POST /v1beta/models/<m>:streamGenerateContent  Gemini (SSE; ``:generateContent``: JSON;
                                                   needs ``x-goog-api-key`` or ``?key=``)
    POST /model/<id>/converse-stream               Bedrock ConverseStream (binary event stream;
                                                   ``/converse``: JSON; needs SigV4 auth)
    POST /v1/embeddings, /embeddings, /api/embed   embeddings, OpenAI's shape (and Azure's,
                                                   at ``/openai/deployments/<d>/embeddings``)
                                                   or Ollama's: ``expected_embedding``
    GET  /stats   POST /control/reset   POST|GET /control/faults   GET /healthz

It is written on raw asyncio streams (no framework) with keep-alive and chunked
transfer encoding, so one core serves thousands of streamed requests a second
and ``/stats`` can count TCP connections separately from requests.

**The answer** is ``expected_answer(name, tokens)``: ``"Hello from <name>."`` and
then deterministic words, one token per streamed delta. ``tokens`` is the
server's ``--tokens``, lowered by the request's max_tokens (``num_predict`` for
Ollama); ``finish_reason`` is ``length`` when the request's limit cut it short.

**Prefill (continuation):** a request may end with an assistant message that
the answer continues. OpenAI paths: only with ``"continue_final_message": true``
(vLLM's; ``"add_generation_prompt": false`` optional, ``true`` is a 400), else a
trailing assistant message is a new turn. Anthropic, Ollama and Gemini: whenever
the last message is the assistant's (Gemini's: the last ``contents`` turn is
``model``'s; Anthropic refuses one ending in whitespace, 400, as the real API
does). If the prefill is some mock's greeting and then its
words 1..k-1, the answer goes on at token k, so a backup completes another
mock's answer exactly (``continuation(name, prefill, tokens)``,
``MockProvider.continuation``); foreign text goes on at token 1, an empty
prefill at 0. ``tokens`` is the whole answer's length, so a continuation adds
``tokens - k`` tokens; max_tokens (``num_predict``) limits the tokens it adds, and
faults count them too. Usage: completion tokens are those sent; prompt tokens
include the prefill.

**Faults** are ``key=value`` pairs joined by ``+`` (or a JSON object). They can
be the server default (``--fault``, ``POST /control/faults``, ``set_fault``) and
per request as suffixes of the model name, which win over the default, e.g.
``gpt-4o-mini+status=429+retry_after=2``. Keys (``FAULT_KEYS``):

    status=N          answer HTTP N with the provider's error JSON (529: overloaded)
    error=KIND        error kind (``ERROR_KINDS``): context_length_exceeded, content_filter,
                      overloaded, rate_limit, ...; alone it answers the kind's status
    retry_after=S     Retry-After header (seconds or an HTTP date)
    retry_after_ms=N  retry-after-ms header
    reset             close the socket (RST) before sending headers
    noresponse        read the request, never answer, keep the socket open
    stall=N           stream N tokens, then go silent with the socket open
    cut=N             stream N tokens, then close without ending the body
    malformed=N       send an undecodable event just before token N (all tokens still follow)
    nodone            omit [DONE] / message_stop / the end of the body; keep the socket open
    error_after=N     stream N tokens, then an in-stream error event of kind ``error``
                      (default overloaded), and end the body
    noprefill         refuse a request that carries a prefill with 400, in the provider's
                      words; requests without one are answered normally
    ttft_ms=N  token_delay_ms=N  tokens=N   timing and length overrides
    fail_first=K      only the first K requests with this exact model string get the
                      failure faults (503 if none is given); later ones succeed
                      (timing keys still apply). ``set_fault`` and /control/reset
                      restart the count.
    cached=N          OpenAI format: the usage reports N prompt tokens read from a
                      cache (``prompt_tokens_details.cached_tokens``)
    reasoning=N       OpenAI format: ... N completion tokens spent on reasoning
                      (``completion_tokens_details.reasoning_tokens``)
    think=N           stream N reasoning deltas (``expected_reasoning(N)``) before the
                      answer, in each format's own shape: OpenAI-compatible
                      ``delta.reasoning_content``, an Anthropic ``thinking`` block, Ollama's
                      ``message.thinking``, Gemini's ``thought`` parts, Bedrock's
                      ``reasoningContent``

``/stats`` counts requests, TCP connections, in-flight and peak concurrency,
prefills continued (``prefills``) and refused (``prefills_refused``), and logs
the last 10,000 chat requests with their arrival time and the status they were
given (0 for ``reset``/``noresponse``).

**Running it:** ``async with MockProvider(name="mock-a") as mock:`` serves from
the current event loop (tests); ``MockProviderProcess`` runs ``llmrelay
mock-provider`` as a child process (the benchmark), which prints
``mock-provider <name> listening on http://127.0.0.1:PORT`` once it is ready.

**Modules:** ``_answer`` (the deterministic text), ``_faults`` (fault parsing and
the error kinds), ``_http`` (raw HTTP/1.1), ``_plan`` (the request and the plan
of its answer), ``_openai``/``_anthropic``/``_ollama``/``_gemini`` (one wire
format each), ``_embeddings`` (the embeddings endpoints), ``_azure`` (Azure's paths),
``_stats``, ``_server`` (``MockProvider``), ``_process`` (``serve`` and
``MockProviderProcess``).
"""

from devstack.fake_provider._answer import (
    DEFAULT_TOKENS,
    answer_tokens,
    continuation,
    expected_answer,
    expected_reasoning,
)
from devstack.fake_provider._embeddings import expected_embedding
from devstack.fake_provider._faults import (
    ERROR_KINDS,
    FAULT_KEYS,
    ErrorKind,
    Fault,
    FaultSpec,
    parse_fault,
)
from devstack.fake_provider._process import MockProviderProcess, listening_line, serve
from devstack.fake_provider._server import CHAT_PATHS, MockProvider
from devstack.fake_provider._stats import LOG_SIZE, Stats

__all__ = [
    "CHAT_PATHS",
    "DEFAULT_TOKENS",
    "ERROR_KINDS",
    "FAULT_KEYS",
    "LOG_SIZE",
    "ErrorKind",
    "Fault",
    "FaultSpec",
    "MockProvider",
    "MockProviderProcess",
    "Stats",
    "answer_tokens",
    "continuation",
    "expected_answer",
    "expected_embedding",
    "expected_reasoning",
    "listening_line",
    "parse_fault",
    "serve",
]
