"""llmrelay's OpenAI- and Anthropic-compatible HTTP gateway: a front door that turns
HTTP into jobs.

An application that speaks the OpenAI API switches to llmrelay by changing its
base URL to ``http://<gateway>/v1``; one that speaks Anthropic's Messages API (an
Anthropic SDK, Claude Code) by changing it to ``http://<gateway>``. Endpoints::

    POST /v1/chat/completions   stream and non-stream; ``model`` names a route
    POST /v1/messages           Anthropic's Messages API on the same jobs
    GET  /v1/models             the routes (and /v1/models/<route>)
    GET  /healthz               the process is up
    GET  /readyz                NATS is connected and the route consumers exist (else 503)
    GET  /metrics               Prometheus, ``llmrelay_gateway_*``

Each request becomes one job, submitted with one shared ``RelayClient`` (one
NATS connection per process, as the ``client`` user). The modules, in the
order a request meets them:

- ``_app``: the ``Gateway`` (shared state, endpoints, the ASGI app);
- ``_keys``: bearer keys, compared in constant time;
- ``_dialect``: the seam between an API and the exchange (OpenAI's chat here);
- ``_request``: the OpenAI request, decoded and checked, as a job's parts;
- ``_messages``, ``_messages_sse``: Anthropic's request, and its answers and errors;
- ``_exchange``: one request's exchange with its job, whole or streamed (SSE);
- ``_fold``: the reset policy (what a client may see when an attempt restarts);
- ``_responses``: OpenAI's response objects as typed Structs, and SSE frames;
- ``_apierror``: errors in OpenAI's shape, with the HTTP status of their code;
- ``_metrics``: the gateway's Prometheus metrics;
- ``_serve``: running it (``llmrelay gateway``, or in a program's event loop).

Errors are ``broker._errors`` classes; the gateway never sees a raw nats
error (``broker._nats`` and ``RelayClient`` translate them).
"""

from broker._errors import InvalidRequest, StreamReset
from gateway._apierror import ApiError
from gateway._app import Gateway
from gateway._fold import ReplyFold
from gateway._metrics import GatewayMetrics
from gateway._request import ChatRequest, parse_request, to_messages
from gateway._responses import SseWriter
from gateway._serve import create_app, run_gateway, serve_gateway

__all__ = [
    "ApiError",
    "ChatRequest",
    "Gateway",
    "GatewayMetrics",
    "InvalidRequest",
    "ReplyFold",
    "SseWriter",
    "StreamReset",
    "create_app",
    "parse_request",
    "run_gateway",
    "serve_gateway",
    "to_messages",
]
