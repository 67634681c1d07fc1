"""llmrelay's broker side: wire protocol, config, topology and the client library.

Public names are listed in ``__all__``; everything else lives in private
modules and may change.
"""

from broker._client import JobHandle, JobOptions, RelayClient
from broker._config import Config, PoolConfig, RouteConfig, Secret, load_config, parse_config
from broker._errors import (
    ERROR_CODES,
    AllProvidersFailed,
    BrokerUnavailable,
    Cancelled,
    ConfigError,
    ConnectFailed,
    DeadlineExceeded,
    DuplicateRequest,
    InternalError,
    InvalidJob,
    PayloadTooLarge,
    ProviderError,
    QueueFull,
    RelayError,
    RequestFailed,
    ServerStartError,
    UnknownRoute,
)
from broker._fold import Answer
from broker._nats import connect_nats
from broker._protocol import (
    Attempt,
    Chunk,
    Done,
    EmbedRequest,
    Error,
    Event,
    Job,
    Message,
    Notice,
    Timings,
    Usage,
)
from broker._schema import json_schema
from broker._server import NatsServer
from broker._topology import ensure_topology
from broker._vectors import Embeddings

__all__ = [
    "ERROR_CODES",
    "AllProvidersFailed",
    "Answer",
    "Attempt",
    "BrokerUnavailable",
    "Cancelled",
    "Chunk",
    "Config",
    "ConfigError",
    "ConnectFailed",
    "DeadlineExceeded",
    "Done",
    "DuplicateRequest",
    "EmbedRequest",
    "Embeddings",
    "Error",
    "Event",
    "InternalError",
    "InvalidJob",
    "Job",
    "JobHandle",
    "JobOptions",
    "Message",
    "NatsServer",
    "Notice",
    "PayloadTooLarge",
    "PoolConfig",
    "ProviderError",
    "QueueFull",
    "RelayClient",
    "RelayError",
    "RequestFailed",
    "RouteConfig",
    "Secret",
    "ServerStartError",
    "Timings",
    "UnknownRoute",
    "Usage",
    "connect_nats",
    "ensure_topology",
    "json_schema",
    "load_config",
    "parse_config",
]
