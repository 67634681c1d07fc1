"""A worker's spans: one per delivery of a job, one per upstream call of it.

Imported only when the config turns tracing on (``Worker``; README "Tracing").
The trace goes on from the job's ``traceparent`` (the submit span of its client,
``broker/_otel.py``)::

    process llm.jobs.chat       CONSUMER, one per delivery: queue wait, outcome
      chat gpt-4o-mini          CLIENT, one per upstream call: GenAI attributes,
      chat gpt-4o-mini          time to first token, why it retried or failed over

Each call's own context goes to the provider as its ``traceparent``, so a
provider's spans hang under the call. A job re-queued to a backup carries the
traceparent it came with: the backup's delivery is a sibling of this one.

A ``JobRun`` (``_job.py``) reports at five points: an upstream call starts
(``attempt``), a failure is decided (``failed``), the answer is done
(``succeeded``), the run ends early (``outcome``), the run is over (``end``).
Nothing per chunk: the time to first token is read from the run when its call
ends. Prompts and answers go on the call spans only with ``record_content``.
"""

from __future__ import annotations

import json
import time

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from broker._config import Config
from broker._errors import ProviderError
from broker._otel import Tracing
from broker._protocol import Job, Usage, now_ms
from workers._continuation import Continuation
from workers._decide import Decision, Fail, Requeue, Retry
from workers._delivery import Delivery
from workers.providers._base import Finish

# ``gen_ai.provider.name`` of each provider kind (the GenAI conventions' names).
PROVIDER_NAMES = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "ollama": "ollama",
}
# What a decision did with the job, as ``llmrelay.decision`` says it.
_DECISIONS: dict[type, str] = {Retry: "retry", Requeue: "failover", Fail: "fail"}


class JobTracer:
    """The tracing of one worker process: its ``Tracing`` and its pool's names."""

    def __init__(self, tracing: Tracing, config: Config, pool_name: str) -> None:
        self.tracing = tracing
        self.pool_name = pool_name
        self.provider_name = PROVIDER_NAMES[config.pools[pool_name].kind]

    @classmethod
    def start(cls, config: Config, pool_name: str, worker_id: str) -> JobTracer:
        attributes = {"llmrelay.pool": pool_name, "service.instance.id": worker_id}
        tracing = Tracing.start(config.tracing, kind="worker", attributes=attributes)
        return cls(tracing, config, pool_name)

    def delivery(self, delivery: Delivery) -> JobTrace:
        return JobTrace(self, delivery)

    def close(self) -> None:
        self.tracing.close()


class JobTrace:
    """The spans of one delivery: the consumer span, opened with the first thing to
    report, and the span of the upstream call in progress."""

    def __init__(self, tracer: JobTracer, delivery: Delivery) -> None:
        self._tracer = tracer
        self._subject = delivery.msg.subject
        self._deliveries = delivery.deliveries
        self._attempt = delivery.attempt
        self._pulled_ns = time.time_ns()
        self._pulled_ms = now_ms()
        self._span: Span | None = None
        self._call: Span | None = None
        self._call_started = 0.0  # monotonic, as the run's first-token time
        self._call_started_ns = 0
        self._calls = 0
        self._outcome = "unfinished"

    # --- what a run reports ---------------------------------------------------------------

    def attempt(self, job: Job, model: str) -> Job:
        """An upstream call starts: its span, and the job as the provider is to get it
        (with the call's ``traceparent``)."""
        self._end_call(None, "restarted")  # a refused prefill restarts without one
        op = "embeddings" if job.embed is not None else "chat"
        attributes: dict[str, str | int | float] = {
            "gen_ai.operation.name": op,
            "gen_ai.provider.name": self._tracer.provider_name,
            "gen_ai.request.model": model,
            "llmrelay.route": job.route,
            "llmrelay.pool": self._tracer.pool_name,
            "llmrelay.attempt": self._attempt,
            "llmrelay.retry": self._calls,
        }
        for key, value in (("max_tokens", job.max_tokens), ("temperature", job.temperature)):
            if value is not None:
                attributes[f"gen_ai.request.{key}"] = value
        if self._tracer.tracing.record_content and job.embed is None:
            attributes["gen_ai.input.messages"] = _input_messages(job)
        self._call_started, self._call_started_ns = time.monotonic(), time.time_ns()
        self._call = span = self._tracer.tracing.tracer.start_span(
            f"{op} {model}",
            context=trace.set_span_in_context(self._consumer(job)),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=self._call_started_ns,
        )
        self._calls += 1
        traceparent = Tracing.traceparent(span) or job.traceparent  # None: OTEL_SDK_DISABLED
        return msgspec.structs.replace(job, traceparent=traceparent)

    def failed(
        self,
        job: Job,
        model: str,
        err: ProviderError,
        decision: Decision,
        first_token: float | None,
    ) -> None:
        """A failure and what was decided (a failure before any call, e.g. an open
        circuit, gets a call span of its own: the try that did not go out)."""
        if self._call is None:
            self.attempt(job, model)
        assert self._call is not None
        kind = _DECISIONS[type(decision)]
        self._call.set_attributes({"error.type": err.code, "llmrelay.decision": kind})
        if err.status is not None:
            self._call.set_attribute("http.response.status_code", err.status)
        if isinstance(decision, Retry | Requeue):
            self._call.set_attribute("llmrelay.failover.reason", err.code)
        if isinstance(decision, Requeue):
            self._call.set_attribute("llmrelay.failover.to_pool", decision.pool)
        if isinstance(decision, Retry):
            self._call.set_attribute("llmrelay.retry.delay_ms", int(decision.delay_s * 1000))
        self._call.set_status(Status(StatusCode.ERROR, f"{err.code}: {err.message}"))
        self._end_call(first_token, "failed")
        if isinstance(decision, Fail):
            self.outcome(job, decision.code)
        elif not (isinstance(decision, Retry) and decision.in_place):
            self._outcome = kind

    def succeeded(
        self, model: str, finish: Finish, usage: Usage, first_token: float | None,
        answer: Continuation,
    ) -> None:  # fmt: skip
        """The answer is done: the call's usage, and (``record_content``) the answer."""
        if self._call is not None:
            self._call.set_attributes({
                "gen_ai.response.model": model,
                "gen_ai.response.finish_reasons": (finish.reason,),
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            })  # fmt: skip
            if self._tracer.tracing.record_content and finish.embeddings is msgspec.UNSET:
                self._call.set_attribute("gen_ai.output.messages", _output(answer.text, finish))
        self._end_call(first_token, "done")
        self._outcome = "done"

    def outcome(self, job: Job, code: str) -> None:
        """The run ends with an error code (``deadline_exceeded``, ``cancelled``, ...)."""
        self._outcome = code
        for span in (self._call, self._consumer(job)):
            if span is not None:
                span.set_attribute("error.type", code)
                span.set_status(Status(StatusCode.ERROR, code))

    def end(self, job: Job | None) -> None:
        """The run is over: answered, re-queued, handed back, cancelled or stopped."""
        self._end_call(None, self._outcome)
        if self._span is None and job is not None:
            self._consumer(job)
        if self._span is not None:
            self._span.set_attribute("llmrelay.outcome", self._outcome)
            self._span.end()

    # --- spans ----------------------------------------------------------------------------

    def _consumer(self, job: Job) -> Span:
        """The delivery's span, from the job's trace context (opened once, at the pull)."""
        if self._span is not None:
            return self._span
        queued_since = job.attempts[-1].at_ms if job.attempts else job.created_ms
        attributes: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": self._subject,
            "messaging.message.id": job.id,
            "llmrelay.request_id": job.id,
            "llmrelay.route": job.route,
            "llmrelay.pool": self._tracer.pool_name,
            "llmrelay.attempt": self._attempt,
            "llmrelay.delivery": self._deliveries,
        }
        if queued_since:
            attributes["llmrelay.queue_wait_ms"] = max(0, self._pulled_ms - queued_since)
        self._span = self._tracer.tracing.tracer.start_span(
            f"process {self._subject}",
            context=self._tracer.tracing.parent(job.traceparent),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=self._pulled_ns,
        )
        return self._span

    def _end_call(self, first_token: float | None, outcome: str) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        if first_token is not None and first_token >= self._call_started:
            ttft_s = first_token - self._call_started
            call.set_attribute("llmrelay.ttft_ms", round(ttft_s * 1000, 3))
            call.add_event("first token", timestamp=self._call_started_ns + int(ttft_s * 1e9))
        call.set_attribute("llmrelay.outcome", outcome)
        call.end()


def _input_messages(job: Job) -> str:
    """The prompt in the GenAI conventions' shape (text parts only), as JSON."""
    messages = [
        {"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in job.messages
    ]
    return json.dumps(messages, ensure_ascii=False)


def _output(answer: str, finish: Finish) -> str:
    message = {"role": "assistant", "parts": [{"type": "text", "content": answer}],
               "finish_reason": finish.reason}  # fmt: skip
    return json.dumps([message], ensure_ascii=False)
