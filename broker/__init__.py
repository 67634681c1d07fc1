"""llmrelay's broker side: wire protocol, config, topology and the client library.

Public names are listed in ``__all__``; everything else lives in private
modules and may change.
"""

from broker._client import Answer, JobHandle, RelayClient, connect_nats
from broker._config import Config, PoolConfig, RouteConfig, Secret, load_config, parse_config
from broker._errors import (
    Cancelled,
    ConfigError,
    ConnectFailed,
    DeadlineExceeded,
    InvalidJob,
    PayloadTooLarge,
    QueueFull,
    RelayError,
    RequestFailed,
    ServerStartError,
    UnknownRoute,
)
from broker._protocol import (
    ERROR_CODES,
    Attempt,
    Chunk,
    Done,
    Error,
    Event,
    Job,
    Message,
    Notice,
    Timings,
    Usage,
    json_schema,
)
from broker._server import NatsServer
from broker._topology import ensure_topology

__all__ = [
    "ERROR_CODES",
    "Answer",
    "Attempt",
    "Cancelled",
    "Chunk",
    "Config",
    "ConfigError",
    "ConnectFailed",
    "DeadlineExceeded",
    "Done",
    "Error",
    "Event",
    "InvalidJob",
    "Job",
    "JobHandle",
    "Message",
    "NatsServer",
    "Notice",
    "PayloadTooLarge",
    "PoolConfig",
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
