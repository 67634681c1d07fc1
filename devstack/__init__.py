"""Development tooling: a fake LLM provider, a local stack runner and a config builder.

Tests, ``llmrelay demo``, ``llmrelay mock-provider`` and the benchmark use these;
no worker, client or gateway imports them, so the runtime packages ship no test
tooling. ``fake_provider`` is the upstream that misbehaves on request;
``Stack``/``LocalStack`` run nats-server, fake providers, workers and gateways
as real processes; ``ConfigDoc`` writes the config documents they read.
"""

from devstack._config_doc import ConfigDoc, TargetSpec
from devstack._stack import (
    ChildProcess,
    GatewayProcess,
    LocalStack,
    MockSpec,
    Stack,
    WorkerProcess,
    stop_process,
    wait_for_workers,
)
from devstack.fake_provider import (
    DEFAULT_TOKENS,
    ERROR_KINDS,
    FAULT_KEYS,
    ErrorKind,
    Fault,
    FaultSpec,
    MockProvider,
    MockProviderProcess,
    answer_tokens,
    expected_answer,
    expected_embedding,
    expected_reasoning,
    listening_line,
    parse_fault,
    serve,
)

__all__ = [
    "DEFAULT_TOKENS",
    "ERROR_KINDS",
    "FAULT_KEYS",
    "ChildProcess",
    "ConfigDoc",
    "ErrorKind",
    "Fault",
    "FaultSpec",
    "GatewayProcess",
    "LocalStack",
    "MockProvider",
    "MockProviderProcess",
    "MockSpec",
    "Stack",
    "TargetSpec",
    "WorkerProcess",
    "answer_tokens",
    "expected_answer",
    "expected_embedding",
    "expected_reasoning",
    "listening_line",
    "parse_fault",
    "serve",
    "stop_process",
    "wait_for_workers",
]
