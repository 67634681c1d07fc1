"""OpenTelemetry for one process: its tracer provider and exporter, W3C trace context
across NATS, and the span of a job's submit.

Imported only by a process whose config turns tracing on (``broker/_tracing.py``).
``Tracing.start`` builds the process's own ``TracerProvider`` (never the global
one: settings are passed, not global) with the exporter ``tracing:`` names, a
parent-based ratio sampler and a resource that names the service. A program
with its own OpenTelemetry set-up can wrap its provider instead:
``Tracing(trace.get_tracer_provider())``.

A job carries its trace context in ``Job.traceparent`` (W3C Trace Context), so a
trace goes on across NATS: ``Tracing.submit`` publishes a job under a producer
span and puts that span's context on the job (``TracedRelayClient`` does it for
every submit); a worker continues from it (``workers/_tracing.py``). Which
settings win over ``OTEL_*`` variables is in README "Tracing".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, TextIO, TypeVar

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker._client import JobHandle, RelayClient
from broker._errors import ConfigError, RelayError
from broker._protocol import Job
from broker._subjects import pool_subject, route_subject
from broker._tracing import TracingSettings

ProcessKind = Literal["gateway", "worker", "client"]
SERVICE_NAMES: dict[ProcessKind, str] = {
    "gateway": "llmrelay-gateway",
    "worker": "llmrelay-worker",
    "client": "llmrelay-client",
}
INSTRUMENTATION = "llmrelay"
# W3C Trace Context in and out; stateless, so one serves every process.
_PROPAGATOR = TraceContextTextMapPropagator()


class _Submitted(Protocol):
    job_seq: int | None


H = TypeVar("H", bound=_Submitted)


class Tracing:
    """One process's tracer, and whether its spans may carry prompts and answers."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        *,
        record_content: bool = False,
        owned: SdkTracerProvider | None = None,
    ) -> None:
        self.tracer = provider.get_tracer(INSTRUMENTATION)
        self.record_content = record_content
        self._owned = owned  # shut down (flushed) by ``close``

    @classmethod
    def start(
        cls,
        settings: TracingSettings,
        *,
        kind: ProcessKind,
        attributes: Mapping[str, str] | None = None,
        exporter: SpanExporter | None = None,
    ) -> Tracing:
        """A provider of this process's own, exporting as ``settings`` say (or to
        ``exporter``, each span as it ends: what tests pass an in-memory one as)."""
        resource = _resource(settings, kind, attributes or {})
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        provider = SdkTracerProvider(sampler=sampler, resource=resource)
        provider.add_span_processor(
            SimpleSpanProcessor(exporter) if exporter is not None else _processor(settings)
        )
        return cls(provider, record_content=settings.record_content, owned=provider)

    def close(self) -> None:
        """Export what is left and stop the exporter (if this process's own). Safe twice."""
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.shutdown()

    # --- trace context ------------------------------------------------------------------

    def parent(self, traceparent: str | None) -> Context | None:
        """The context a new span starts in: the current span's, if one is active (the
        gateway's request), else the one ``traceparent`` names (None: a new trace)."""
        if trace.get_current_span().get_span_context().is_valid or not traceparent:
            return None
        return _PROPAGATOR.extract({"traceparent": traceparent})

    @staticmethod
    def traceparent(span: trace.Span) -> str | None:
        """``span``'s context as a W3C ``traceparent`` value."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    # --- the submit span ----------------------------------------------------------------

    async def submit(self, job: Job, publish: Callable[[Job], Awaitable[H]]) -> H:
        """``publish(job)`` under a producer span; the job it publishes carries the span's
        context, so the worker's spans are its children."""
        subject = pool_subject(job.pool) if job.pool else route_subject(job.route)
        attributes = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": job.id,
            "llmrelay.route": job.route,
            "llmrelay.request_id": job.id,
        }
        with self.tracer.start_as_current_span(
            f"send {subject}",
            context=self.parent(job.traceparent),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            carried = self.traceparent(span) or job.traceparent
            try:
                handle = await publish(msgspec.structs.replace(job, traceparent=carried))
            except RelayError as exc:
                span.set_attribute("error.type", exc.code)
                raise
            if handle.job_seq is not None:
                span.set_attribute("llmrelay.job_seq", handle.job_seq)
            return handle


class TracedRelayClient(RelayClient):
    """A ``RelayClient`` whose every submit is a producer span (``Tracing.submit``): the
    job's ``traceparent`` becomes the span's, its parent the current span (else the
    job's own ``traceparent``). ``RelayClient(...)`` arguments, plus ``tracing``."""

    def __init__(self, *args: Any, tracing: Tracing, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracing = tracing

    async def submit_job(self, job: Job, *, retry: bool = False) -> JobHandle:
        submit = super().submit_job
        return await self.tracing.submit(job, lambda traced: submit(traced, retry=retry))


def _resource(
    settings: TracingSettings, kind: ProcessKind, attributes: Mapping[str, str]
) -> Resource:
    """``service.name`` from the config, else ``OTEL_SERVICE_NAME`` (read by the SDK's
    detector, as ``OTEL_RESOURCE_ATTRIBUTES`` is), else the process kind's."""
    own = dict(attributes)
    if settings.service_name:
        own[SERVICE_NAME] = settings.service_name
    resource = Resource.create(own)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE_NAMES[kind]}))
    return resource


def _processor(settings: TracingSettings) -> SpanProcessor:
    if settings.exporter == "console":
        # As each span ends: the point of a console is to see them now.
        return SimpleSpanProcessor(JsonLinesExporter(settings.file))
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "tracing.exporter: otlp needs the OTLP exporter: pip install 'llmrelay[otlp]'"
        ) from exc
    # Batched, in the SDK's background thread: the event loop never waits on a collector.
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint))


class JsonLinesExporter(SpanExporter):
    """Each span as one line of JSON (the SDK's own ``to_json``), appended to ``path``
    with one write per span, so that processes sharing a file do not tear each
    other's lines; without a path, to stdout."""

    def __init__(self, path: str | None) -> None:
        self._out: TextIO | None = None if path else sys.stdout
        self._fd: int | None = None
        if path:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(f"tracing.file: cannot open {path}: {exc.strerror}") from exc

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            for span in spans:
                self._write(span.to_json(indent=None) + "\n")
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _write(self, line: str) -> None:
        if self._fd is None:
            assert self._out is not None
            self._out.write(line)
            self._out.flush()
            return
        data = line.encode()
        while data:
            data = data[os.write(self._fd, data) :]

    def shutdown(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
