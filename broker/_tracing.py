"""``tracing:`` in llmrelay.yaml: whether, and where, a process sends OpenTelemetry spans.

Tracing is off unless ``exporter`` names where spans go, and off costs nothing:
this module imports no OpenTelemetry, and neither does any process whose
config leaves tracing off. Only a process that has it on imports
``broker/_otel.py`` (and ``workers/_tracing.py`` or ``gateway/_tracing.py``), once,
at start-up. README "Tracing" lists the spans and their attributes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from broker._errors import ConfigError

TracingExporter = Literal["none", "otlp", "console"]


class TracingSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """OpenTelemetry spans of the gateway, clients and workers (README "Tracing").

    ``exporter``: ``none`` (the default: no spans at all), ``otlp`` (OTLP over
    HTTP/protobuf, batched in a background thread; needs the ``otlp`` extra), or
    ``console`` (each span as one JSON line as it ends: appended to ``file``, else
    written to stdout; for a look without a collector). ``endpoint``: the OTLP/HTTP
    traces URL, e.g. ``http://collector:4318/v1/traces``; unset, the SDK's
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``, else
    ``http://localhost:4318/v1/traces``. ``service_name``: unset, ``OTEL_SERVICE_NAME``,
    else ``llmrelay-gateway``, ``llmrelay-worker`` or ``llmrelay-client``.
    ``sample_ratio``: the share of new traces recorded; a request that arrives with
    a trace context follows its caller's decision. ``record_content``: put prompts
    and answers on the attempt spans; off (the default), no span carries them.
    """

    exporter: TracingExporter = "none"
    endpoint: str | None = None
    file: str | None = None
    service_name: str | None = None
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    record_content: bool = False

    def __post_init__(self) -> None:
        if self.endpoint is not None and self.exporter != "otlp":
            raise ValueError("endpoint is the OTLP collector's: only exporter otlp takes it")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL (OTLP over HTTP)")
        if self.file is not None and self.exporter != "console":
            raise ValueError("file is where exporter console writes: only it takes one")

    @property
    def enabled(self) -> bool:
        return self.exporter != "none"


def sdk_missing(exc: ModuleNotFoundError) -> ConfigError:
    """What a process with tracing on says when OpenTelemetry is not installed."""
    return ConfigError(
        f"tracing: the exporter needs the OpenTelemetry SDK (no module {exc.name}): "
        "pip install 'llmrelay[tracing]' (or 'llmrelay[otlp]')"
    )
