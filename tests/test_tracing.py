"""OpenTelemetry tracing (README "Tracing"): one trace per request, across processes.

The gateway runs in this process with the SDK's in-memory exporter; the workers
run as ``llmrelay worker`` processes whose config sends their spans as JSON lines
to a file (``exporter: console``). Stopping a worker (SIGTERM) drains it and
exports what it still holds, so the file is complete once it has exited. Spans
of both sides are compared as the SDK's own JSON (``ReadableSpan.to_json``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client as NATS
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker import ConfigError, JobOptions, RelayClient, parse_config
from broker._otel import TracedRelayClient, Tracing
from broker._server import free_port
from broker._tracing import TracingSettings
from devstack import ConfigDoc, GatewayProcess, MockProvider, WorkerProcess, wait_for_workers
from gateway import serve_gateway
from tests._harness import running_workers

PROMPT = "a prompt nobody may read: 5d1e-violet"
# The caller's own trace context (W3C's example ids): the gateway continues it.
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"

Span = dict[str, Any]


def failover_doc(a: MockProvider, b: MockProvider) -> ConfigDoc:
    """Route ``chat``: pool a, whose provider answers 503, then pool b."""
    return (
        ConfigDoc()
        .pool("a", base_url=f"{a.url}/v1", api_key="sk-a")
        .pool("b", base_url=f"{b.url}/v1", api_key="sk-b")
        .route("chat", [("a", "gpt-a+status=503"), ("b", "gpt-b")], retry_before_failover=1)
    )


def spans_in(path: Path) -> list[Span]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_json(exporter: InMemorySpanExporter) -> list[Span]:
    return [json.loads(span.to_json(indent=None)) for span in exporter.get_finished_spans()]


def of_kind(spans: Iterable[Span], kind: str) -> list[Span]:
    return [s for s in spans if s["kind"] == f"SpanKind.{kind}"]


def one(spans: list[Span]) -> Span:
    assert len(spans) == 1, [s["name"] for s in spans]
    return spans[0]


def children(parent: Span, spans: Iterable[Span]) -> list[Span]:
    return [s for s in spans if s["parent_id"] == parent["context"]["span_id"]]


async def ask(base_url: str, prompt: str, **extra: Any) -> str:
    """One streamed chat completion through the gateway, by the official SDK."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": prompt}], stream=True, **extra
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_request_that_fails_over_is_one_trace_across_gateway_and_workers(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    spans_file = tmp_path / "worker-spans.jsonl"
    exporter = InMemorySpanExporter()
    async with MockProvider(name="a") as a, MockProvider(name="b", tokens=6) as b:
        doc = failover_doc(a, b).tracing(exporter="console", file=str(spans_file))
        config = doc.parse()
        workers = [WorkerProcess(p, doc.write(tmp_path / "relay.yaml"), worker_url, tmp_path)
                   for p in ("a", "b")]  # fmt: skip
        try:
            await wait_for_workers(nc, workers)
            tracing = Tracing.start(config.tracing, kind="gateway", exporter=exporter)
            async with serve_gateway(config, nats_url=client_url, tracing=tracing) as url:
                text = await ask(url, PROMPT, extra_headers={"traceparent": CALLER})
        finally:
            for worker in workers:
                worker.stop()  # SIGTERM: drain, then export what is left
    assert text == b.expected_answer()
    gateway, worker = as_json(exporter), spans_in(spans_file)
    everything = gateway + worker

    # One trace, the caller's: the gateway's spans, then the workers' under them.
    assert {s["context"]["trace_id"] for s in everything} == {f"0x{CALLER_TRACE}"}
    server = one(of_kind(gateway, "SERVER"))
    assert server["name"] == "POST /v1/chat/completions"
    assert server["parent_id"] == f"0x{CALLER_SPAN}"
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["resource"]["attributes"]["service.name"] == "llmrelay-gateway"
    submit = one(children(server, gateway))
    assert (submit["name"], submit["kind"]) == ("send llm.jobs.chat", "SpanKind.PRODUCER")
    assert (
        submit["attributes"]["llmrelay.request_id"] == server["attributes"]["llmrelay.request_id"]
    )

    # One delivery per pool, both children of the submit, each with its upstream calls.
    deliveries = {s["attributes"]["llmrelay.pool"]: s for s in children(submit, worker)}
    assert sorted(deliveries) == ["a", "b"]
    assert deliveries["a"]["name"] == "process llm.jobs.chat"
    assert deliveries["a"]["attributes"]["llmrelay.outcome"] == "failover"
    assert deliveries["b"]["attributes"]["llmrelay.outcome"] == "done"
    for delivery in deliveries.values():
        assert delivery["kind"] == "SpanKind.CONSUMER"
        assert delivery["attributes"]["llmrelay.queue_wait_ms"] >= 0
        assert delivery["resource"]["attributes"]["service.name"] == "llmrelay-worker"
    calls_a = children(deliveries["a"], worker)
    call_b = one(children(deliveries["b"], worker))
    assert len(of_kind(worker, "CLIENT")) == len(calls_a) + 1

    # Pool a: a retry in place, then the failover to b, each saying why.
    assert [c["attributes"]["llmrelay.decision"] for c in calls_a] == ["retry", "failover"]
    for call in calls_a:
        attrs = call["attributes"]
        assert attrs["gen_ai.request.model"] == "gpt-a+status=503"
        assert (attrs["error.type"], attrs["llmrelay.failover.reason"]) == (
            "upstream_unavailable", "upstream_unavailable",
        )  # fmt: skip
        assert attrs["http.response.status_code"] == 503
        assert call["status"]["status_code"] == "ERROR"
    assert calls_a[-1]["attributes"]["llmrelay.failover.to_pool"] == "b"

    # Pool b answers: usage, the model, the time to first token.
    attrs = call_b["attributes"]
    assert call_b["name"] == "chat gpt-b"
    assert attrs["gen_ai.response.model"] == "gpt-b"
    assert attrs["gen_ai.usage.output_tokens"] == 6
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert 0 <= attrs["llmrelay.ttft_ms"] < call_duration_ms(call_b)
    assert [e["name"] for e in call_b["events"]] == ["first token"]
    for call in [*calls_a, call_b]:
        attrs = call["attributes"]
        assert call["kind"] == "SpanKind.CLIENT"
        assert (attrs["gen_ai.operation.name"], attrs["gen_ai.provider.name"]) == ("chat", "openai")
        assert attrs["llmrelay.route"] == "chat"
        assert attrs["llmrelay.pool"] == call["resource"]["attributes"]["llmrelay.pool"]
        assert isinstance(attrs["llmrelay.attempt"], int)

    # Neither the prompt nor the answer is on any span.
    recorded = json.dumps(everything)
    assert PROMPT not in recorded
    assert b.expected_answer() not in recorded
    assert "gen_ai.input.messages" not in recorded


def call_duration_ms(span: Span) -> float:
    start, end = (datetime.fromisoformat(span[key]) for key in ("start_time", "end_time"))
    return (end - start).total_seconds() * 1000


async def test_with_tracing_off_no_process_imports_opentelemetry(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    """``-X importtime`` (PYTHONPROFILEIMPORTTIME) logs every module a process imports,
    whenever it does: a worker and a gateway that served a request imported none."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    async with MockProvider(name="a") as a, MockProvider(name="b") as b:
        doc = failover_doc(a, b)
        path = doc.write(tmp_path / "relay.yaml")
        workers = [WorkerProcess(p, path, worker_url, tmp_path, env=env) for p in ("a", "b")]
        gateway = GatewayProcess(path, client_url, tmp_path, port=free_port(), env=env)
        try:
            await wait_for_workers(nc, workers)
            await gateway.wait_ready()
            text = await ask(f"{gateway.url}/v1", PROMPT, extra_headers={"traceparent": CALLER})
        finally:
            for process in [gateway, *workers]:
                process.stop()
    assert text == b.expected_answer()
    for process in [gateway, *workers]:
        imported = process.log_path.read_text()
        assert re.search(r"\| +nats\.aio\.client$", imported, re.M)  # the log lists imports
        assert "opentelemetry" not in imported, process.name


async def test_record_content_puts_the_prompt_and_the_answer_on_the_call(
    worker_url: str, client_url: str, tmp_path: Path
) -> None:
    """With ``record_content: true`` (an in-process worker, and a ``TracedRelayClient``):
    the call span has the prompt and the answer, in the GenAI shape."""
    spans_file = tmp_path / "spans.jsonl"
    exporter = InMemorySpanExporter()
    async with MockProvider(name="a") as a, MockProvider(name="b") as b:
        doc = failover_doc(a, b).route("chat", [("b", "gpt-b")])
        config = doc.tracing(exporter="console", file=str(spans_file), record_content=True).parse()
        tracing = Tracing.start(config.tracing, kind="client", exporter=exporter)
        async with (
            running_workers(config, ["b"], worker_url),
            TracedRelayClient(client_url, config=config, tracing=tracing) as relay,
        ):
            answer = await (await relay.submit(PROMPT, route="chat", system="be brief")).text()
    submit = one(as_json(exporter))
    assert submit["resource"]["attributes"]["service.name"] == "llmrelay-client"
    call = one(of_kind(spans_in(spans_file), "CLIENT"))
    assert call["context"]["trace_id"] == submit["context"]["trace_id"]
    prompt = json.loads(call["attributes"]["gen_ai.input.messages"])
    assert prompt == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]},
    ]
    output = json.loads(call["attributes"]["gen_ai.output.messages"])
    assert output == [{"role": "assistant", "parts": [{"type": "text", "content": answer}],
                       "finish_reason": "stop"}]  # fmt: skip


SSE_ANSWER = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


async def test_the_provider_gets_the_calls_own_trace_context(
    worker_url: str, client_url: str, tmp_path: Path
) -> None:
    """The provider's ``traceparent`` names the call span, so its own spans hang under it
    (the worker's injectable HTTP transport records what the provider was sent)."""
    sent: list[str | None] = []

    def provider(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("traceparent"))
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(SSE_ANSWER))

    spans_file = tmp_path / "spans.jsonl"
    doc = ConfigDoc().pool("p", base_url="http://provider.test/v1").route("chat", [("p", "m")])
    config = doc.tracing(exporter="console", file=str(spans_file)).parse()
    transport = httpx.MockTransport(provider)
    options = JobOptions(traceparent=CALLER)
    async with (
        running_workers(config, ["p"], worker_url, transport=transport),
        RelayClient(client_url, config=config) as relay,  # no tracing of its own
    ):
        answer = await (await relay.submit("hi", route="chat", options=options)).text()
    assert answer == "ok"
    call = one(of_kind(spans_in(spans_file), "CLIENT"))
    trace_id, span_id = call["context"]["trace_id"][2:], call["context"]["span_id"][2:]
    assert trace_id == CALLER_TRACE  # a job's own traceparent is its parent
    assert sent == [f"00-{trace_id}-{span_id}-01"]


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tracing: {exporter: jaeger}", r"tracing\.exporter: Invalid enum value 'jaeger'"),
        ("tracing: {exporter: otlp, endpont: 'http://c:4318'}", r"tracing: .*unknown field"),
        ("tracing: {exporter: console, endpoint: 'http://c:4318'}", r"only exporter otlp"),
        ("tracing: {exporter: otlp, endpoint: 'c:4317'}", r"http:// or https://"),
        ("tracing: {exporter: otlp, file: spans.jsonl}", r"only it takes one"),
        ("tracing: {exporter: console, sample_ratio: 1.5}", r"tracing\.sample_ratio"),
    ],
)
def test_bad_tracing_settings_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, source="relay.yaml")


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert not parse_config("").tracing.enabled
    assert not parse_config("tracing: {exporter: none, sample_ratio: 0.5}").tracing.enabled
    assert parse_config("tracing: {exporter: console}").tracing.enabled


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        (None, None, "llmrelay-worker"),
        (None, "from-env", "from-env"),
        ("from-config", "from-env", "from-config"),
    ],
)
def test_the_service_name_is_the_configs_then_otel_service_name_then_the_kinds(
    monkeypatch: pytest.MonkeyPatch, configured: str | None, env: str | None, expected: str
) -> None:
    if env is not None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", env)
    else:
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    settings = TracingSettings(exporter="console", service_name=configured)
    exporter = InMemorySpanExporter()
    Tracing.start(settings, kind="worker", exporter=exporter).tracer.start_span("x").end()
    assert exporter.get_finished_spans()[0].resource.attributes["service.name"] == expected


def test_an_unsampled_trace_records_nothing_but_still_carries_its_context() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.start(
        TracingSettings(exporter="console", sample_ratio=0), kind="client", exporter=exporter
    )
    span = tracing.tracer.start_span("x", context=tracing.parent(None))
    span.end()
    assert exporter.get_finished_spans() == ()
    traceparent = Tracing.traceparent(span)
    assert traceparent is not None
    assert int(traceparent[-2:], 16) & 1 == 0  # the sampled flag is off, and it is passed on
    child = tracing.tracer.start_span("y", context=tracing.parent(CALLER))  # the caller's flags 01
    child.end()
    assert [s.name for s in exporter.get_finished_spans()] == ["y"]


def test_a_console_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    settings = TracingSettings(exporter="console", file=str(tmp_path / "no-such-dir" / "x.jsonl"))
    with pytest.raises(ConfigError, match=r"tracing\.file: cannot open .*x\.jsonl"):
        Tracing.start(settings, kind="gateway")


def test_tracing_on_without_the_sdk_installed_is_one_clear_error() -> None:
    """A process whose Python lacks OpenTelemetry (``None`` in ``sys.modules`` is how
    Python says a module cannot be imported) refuses to start, naming the extra."""
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from broker import ConfigError, parse_config\n"
        "from gateway import Gateway\n"
        "from workers import Worker\n"
        "cfg = parse_config('tracing: {exporter: console}')\n"
        "Gateway(parse_config(''))  # tracing off: no import, no error\n"
        "try:\n"
        "    Gateway(cfg)\n"
        "except ConfigError as exc:\n"
        "    print(exc.message)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert "pip install 'llmrelay[tracing]'" in done.stdout
