"""The gateway's span: one server span per API request, the root of its job's trace.

Imported only when the config turns tracing on (``Gateway``; README "Tracing").
``TracedApp`` wraps the ASGI app: a request to an API endpoint (chat
completions, messages, embeddings) runs inside a ``SERVER`` span whose parent
is the caller's ``traceparent`` header, if it sent a valid one. The span is the
current one while the request is answered, so the job's submit span
(``broker/_otel.Tracing.submit``) is its child, and through the job's
``traceparent`` so is everything the workers do for it. It ends when the last
byte of the answer is sent (a stream included), with the status code and the
request id of the answer's headers.

Health checks, metrics scrapes and model lists are not traced.
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker._otel import Tracing

TRACED_PATHS = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/embeddings"})


class TracedApp:
    """``app``, with a server span around each API request."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in TRACED_PATHS:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        attributes = {
            "http.request.method": method,
            "http.route": path,
            "url.path": path,
            "url.scheme": scope.get("scheme", "http"),
        }
        with self.tracing.tracer.start_as_current_span(
            f"{method} {path}",
            context=self.tracing.parent(_header(scope, b"traceparent")),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    for name, value in message.get("headers", ()):
                        if name.lower() == b"x-request-id":
                            span.set_attribute("llmrelay.request_id", value.decode("latin-1"))
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
                await send(message)

            await self.app(scope, receive, traced_send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
