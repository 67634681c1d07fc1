"""llmrelay.yaml: decoded once at start-up into validated, immutable structs.

The path comes from ``--config`` or ``LLMRELAY_CONFIG``. String values may use
``${VAR}`` or ``${VAR:-default}``; interpolation happens after YAML parsing, so
a secret can never change the document's structure. Unknown keys are errors
(a typo in a limit should not silently fall back to a default). Every problem
is reported as one ``ConfigError`` naming the key path, e.g.
``pools.openai.concurrency: Expected `int` >= 1, got 0``.

Secrets (API keys, NATS passwords) are held in ``Secret`` and never appear in
``repr``, logs, events or metric labels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from broker._cost import Price, price_order
from broker._errors import ConfigError
from broker._subjects import is_valid_name
from broker._tracing import TracingSettings

CONFIG_ENV = "LLMRELAY_CONFIG"

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class Secret:
    """A string that hides itself from repr/str. Use ``reveal()`` where it is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class TlsSettings(_Strict, frozen=True):
    """``nats.tls``: TLS to NATS. Present (even empty), TLS is required, as with a ``tls://`` URL.

    ``ca_file``: the CA that signed the server's certificate (default: the
    system's CAs). ``cert_file``/``key_file``: a client certificate, for servers
    that verify clients (mutual TLS). ``handshake_first``: start TLS before the
    server's INFO, for servers with ``tls { handshake_first: true }``.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    handshake_first: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "cert_file and key_file go together (a client certificate and its key)"
            )


class NatsSettings(_Strict, frozen=True):
    """How every process connects to NATS.

    ``creds_file``: a NATS credentials file (user JWT and nkey seed; decentralised
    auth, as ``nsc`` writes it). ``nkey_seed_file``: a user nkey seed file (``SU...``,
    for a server whose ``authorization { users: [{nkey: U...}] }`` names its public
    key); the seed signs the server's nonce and is never sent. ``tls``: see
    ``TlsSettings``; a ``tls://`` URL also requires TLS, and then credentials are
    never sent in clear text.
    """

    # One server, or every node of a cluster (a YAML list, or comma-separated).
    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    connect_timeout_s: PositiveFloat = 2.0
    tls: TlsSettings | None = None


class StreamSettings(_Strict, frozen=True):
    """JetStream limits. ``queue_capacity`` bounds each route and pool subject."""

    queue_capacity: PositiveInt = 10_000
    max_job_bytes: PositiveInt = 1_048_576
    duplicate_window_s: PositiveFloat = 120.0
    replies_max_age_s: PositiveFloat = 300.0
    events_max_age_s: PositiveFloat = 3600.0
    dlq_max_age_s: PositiveFloat = 14 * 86400.0
    max_deliver: PositiveInt = 10
    heartbeat_ttl_s: PositiveFloat = 5.0
    replicas: PositiveInt = 1


class Timeouts(_Strict, frozen=True):
    """Per-pool time limits (seconds)."""

    connect_s: PositiveFloat = 5.0
    ttft_s: PositiveFloat = 30.0
    idle_s: PositiveFloat = 30.0


class CircuitSettings(_Strict, frozen=True):
    consecutive_failures: PositiveInt = 5
    failure_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    window_s: PositiveFloat = 30.0
    min_requests: PositiveInt = 10
    cooldown_s: PositiveFloat = 10.0


ProviderKind = Literal["openai", "anthropic", "ollama", "azure", "bedrock", "gemini"]
# Azure OpenAI's GA API version with streamed usage (``stream_options.include_usage``).
AZURE_API_VERSION = "2024-10-21"


class PoolConfig(_Strict, frozen=True):
    """One provider account: where it is, its limits, and how it is retried.

    ``prefill``: continue a broken answer on this pool with an assistant prefill
    (the text the caller has as the last assistant message: Anthropic Messages,
    Ollama, and OpenAI-compatible servers with ``continue_final_message`` such as
    vLLM). A pool that refuses it (OpenAI's own API does, with a 400) is asked
    again at once without, and the worker stops sending it to that model;
    ``false`` never sends one. ``api_version``: Azure OpenAI's ``api-version`` query
    parameter (``kind: azure`` only; default ``AZURE_API_VERSION``); an Azure
    target's ``model`` is its deployment name. ``region`` and the ``aws_*`` keys:
    the SigV4 credentials of a ``kind: bedrock`` pool (only that kind takes them);
    a Bedrock target's ``model`` is the model id. ``retry_after_wait_max_s``: a
    429 whose Retry-After is at most this is waited out on this pool (when the
    deadline allows); a
    longer one moves the job to a backup. ``pause_max_s``: the ceiling on how long
    a provider's 429 may pause the whole pool.
    """

    kind: ProviderKind
    base_url: str
    api_key: Secret | None = None
    models: list[str] = []
    concurrency: PositiveInt = 16
    rpm: NonNegInt = 0
    tpm: NonNegInt = 0
    max_retries: NonNegInt = 2
    backoff_base_s: PositiveFloat = 0.5
    backoff_max_s: PositiveFloat = 30.0
    ack_wait_s: PositiveFloat = 30.0
    context_window: PositiveInt | None = None
    prefill: bool = True
    api_version: str | None = None
    # AWS Bedrock (kind: bedrock) signs each request with SigV4 for this region and key.
    region: str | None = None
    aws_access_key_id: Secret | None = None
    aws_secret_access_key: Secret | None = None
    aws_session_token: Secret | None = None
    retry_after_wait_max_s: NonNegFloat = 3.0
    pause_max_s: PositiveFloat = 60.0
    # Extra headers on every request (e.g. Azure's `api-key`): secrets, as keys often are.
    headers: dict[str, Secret] = {}
    timeouts: Timeouts = Timeouts()
    circuit: CircuitSettings = CircuitSettings()


class Target(_Strict, frozen=True):
    pool: str
    model: str
    rank: NonNegInt | None = None
    price: Price | None = None


SpillPolicy = Literal["saturation", "backlog", "failover"]
MidstreamPolicy = Literal["continue", "restart", "fail"]
OrderPolicy = Literal["rank", "price"]


class RouteConfig(_Strict, frozen=True):
    """A logical model: ordered targets, primary first.

    ``spill``: ``saturation`` sends work to backups whenever the primaries have no
    free slot; ``backlog`` only once more than ``min_pending`` jobs wait;
    ``failover`` only when no primary worker is healthy.

    ``midstream``: what a failure after the caller has text does. ``continue``
    (the default): the next attempt continues the answer (assistant prefill,
    else a restart spliced on only if it begins with exactly that text, else
    a ``cannot_continue`` error); ``restart``: the text is void
    (``notice{reset}``) and the next attempt starts over; ``fail``: the caller
    gets ``stream_interrupted``. ``retry_before_failover``: while a target of the
    route is healthy, how often a retryable failure before any text is retried
    on the same pool, at once, before the job moves on.

    ``order``: ``rank`` (the default) keeps targets of one rank sharing its load;
    ``price`` ranks them again by price (``Price.per_mtok``, cheapest first, unknown
    last), so the cheapest gets the jobs while it has a free slot, the next one
    takes what it cannot (per ``spill``), and failover tries the cheapest first.
    """

    targets: Annotated[list[Target], msgspec.Meta(min_length=1)]
    spill: SpillPolicy = "saturation"
    min_pending: PositiveInt = 100
    deadline_s: PositiveFloat = 120.0
    midstream: MidstreamPolicy = "continue"
    retry_before_failover: NonNegInt = 1
    order: OrderPolicy = "rank"

    def ranks(self) -> list[tuple[int, Target]]:
        """Targets with their effective rank (list position unless given). With
        ``order: price`` the ranks are renumbered 0, 1, 2 ... by (rank, price): pull
        priorities and failover both follow it, and equal prices still share."""
        given = [(t.rank if t.rank is not None else i, t) for i, t in enumerate(self.targets)]
        if self.order == "rank":
            return given
        keys = sorted({(r, price_order(t.price)) for r, t in given})
        steps = {key: i for i, key in enumerate(keys)}
        return [(steps[r, price_order(t.price)], t) for r, t in given]


class GatewaySettings(_Strict, frozen=True):
    """`llmrelay gateway`: the OpenAI-compatible HTTP front door (the gateway/ package).

    ``api_keys``: bearer keys clients must send; empty means no key is asked for.
    ``request_timeout_s``: a request's deadline; unset, the route's ``deadline_s``.
    ``stream_holdback_ms``: how long a streamed answer's first text is held back so
    that an early failover (which voids it) stays invisible; 0 forwards text at
    once. ``keepalive_s``: with nothing to send for this long, a stream sends its
    headers (if not yet sent) and an SSE comment, so that proxies and clients do
    not time out. ``nats_user``/``nats_password``: the gateway's NATS user (the
    ``client`` user of nats.conf), used when the NATS URL carries no credentials.

    Connection limits (docs/gateway.md, "Limits"), so that slow or idle clients
    cannot hold the process's sockets: ``max_connections`` open at once (a
    request beyond it gets a 503); a request's headers must arrive within
    ``header_timeout_s`` of the connection (or of its first byte, for a later
    request) and its body within ``body_timeout_s`` after them; an idle
    keep-alive connection closes after ``keepalive_timeout_s``; a client that
    takes nothing of a pending answer for ``write_timeout_s`` is cut.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    api_keys: list[Secret] = []
    request_timeout_s: PositiveFloat | None = None
    stream_holdback_ms: NonNegFloat = 0.0
    keepalive_s: PositiveFloat = 10.0
    retry_after_s: PositiveInt = 1
    nats_user: str | None = None
    nats_password: Secret | None = None
    max_connections: PositiveInt = 1000
    header_timeout_s: PositiveFloat = 10.0
    body_timeout_s: PositiveFloat = 30.0
    keepalive_timeout_s: PositiveFloat = 5.0
    write_timeout_s: PositiveFloat = 30.0


class Config(_Strict, frozen=True):
    nats: NatsSettings = NatsSettings()
    streams: StreamSettings = StreamSettings()
    pools: dict[str, PoolConfig] = {}
    routes: dict[str, RouteConfig] = {}
    gateway: GatewaySettings = GatewaySettings()
    tracing: TracingSettings = TracingSettings()

    def pool(self, name: str) -> PoolConfig:
        return self.pools[name]

    def routes_of_pool(self, pool: str) -> list[tuple[str, int, Target]]:
        """(route, rank, target) for every route target served by ``pool``."""
        return [
            (route_name, rank, target)
            for route_name, route in self.routes.items()
            for rank, target in route.ranks()
            if target.pool == pool
        ]

    def model_for(self, route: str, pool: str) -> str | None:
        """The upstream model ``pool`` serves for ``route`` (None if it does not)."""
        r = self.routes.get(route)
        if r is None:
            return None
        return next((t.model for t in r.targets if t.pool == pool), None)

    def price_for(self, route: str, pool: str) -> Price | None:
        """The price of ``route``'s target on ``pool`` (None: unknown, or no such target)."""
        r = self.routes.get(route)
        return next((t.price for t in r.targets if t.pool == pool), None) if r else None


# --- loading -----------------------------------------------------------------

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _interpolate_str(value, path, env)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _interpolate_str(value: str, path: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{path}: environment variable {name} is not set (use ${{{name}:-default}})"
        )

    return _VAR_RE.sub(sub, value)


# What a secret may hold once surrounding whitespace is stripped: it is sent as
# an HTTP header or a NATS credential, where a control character would be
# refused (and echoed in the error) or would inject a second header.
_SECRET_RE = re.compile(r"^[\x20-\x7e]*$")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Secret:
        if not isinstance(obj, str):
            raise ValueError(f"Expected `str`, got `{type(obj).__name__}`")
        value = obj.strip()  # a key read from a file keeps its newline
        if not _SECRET_RE.match(value):
            # Never echo the value: it is a secret, and it is malformed.
            # (A ValueError, unlike a ValidationError, gets the key path from msgspec.)
            raise ValueError("a secret may only hold printable ASCII characters")
        return Secret(value)
    raise NotImplementedError(typ)


def _friendly(err: msgspec.ValidationError) -> str:
    text = str(err)
    m = re.search(r" - at `\$(.*)`$", text)
    if not m:
        return text
    where = m.group(1).lstrip(".")
    where = re.sub(r"\[(['\"])([^'\"]*)\1\]", r".\2", where).lstrip(".")
    return f"{where}: {text[: m.start()]}"


def _check_references(cfg: Config) -> None:
    for i, key in enumerate(cfg.gateway.api_keys):
        if not key:
            # An unset ${VAR:-} must not turn into "any request without a key".
            raise ConfigError(f"gateway.api_keys[{i}]: an API key must not be empty")
    for name in [*cfg.pools, *cfg.routes]:
        if not is_valid_name(name):
            raise ConfigError(f"{name!r}: pool and route names must match [a-z0-9_-]+")
    for name, pool in cfg.pools.items():
        _check_pool(name, pool, cfg.streams)
    for rname, route in cfg.routes.items():
        seen: set[str] = set()
        for i, target in enumerate(route.targets):
            if target.pool not in cfg.pools:
                known = ", ".join(sorted(cfg.pools)) or "none"
                raise ConfigError(
                    f"routes.{rname}.targets[{i}].pool: unknown pool {target.pool!r} "
                    f"(configured pools: {known})"
                )
            if target.pool in seen:
                raise ConfigError(
                    f"routes.{rname}.targets[{i}].pool: pool {target.pool!r} appears twice"
                )
            seen.add(target.pool)


def _check_pool(name: str, pool: PoolConfig, streams: StreamSettings) -> None:
    if pool.max_retries + 1 >= streams.max_deliver:
        raise ConfigError(
            f"pools.{name}.max_retries: must be below streams.max_deliver - 1 "
            f"({streams.max_deliver - 1})"
        )
    if not pool.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"pools.{name}.base_url: must start with http:// or https://")
    if pool.api_version is not None and pool.kind != "azure":
        raise ConfigError(f"pools.{name}.api_version: only kind azure takes an api-version")
    aws = {"region": pool.region, "aws_access_key_id": pool.aws_access_key_id,
           "aws_secret_access_key": pool.aws_secret_access_key,
           "aws_session_token": pool.aws_session_token}  # fmt: skip
    for key, value in aws.items():
        if value is not None and pool.kind != "bedrock":
            raise ConfigError(f"pools.{name}.{key}: only kind bedrock takes AWS settings")
    if pool.kind == "bedrock":
        for key in ("region", "aws_access_key_id", "aws_secret_access_key"):
            if not aws[key]:
                raise ConfigError(f"pools.{name}.{key}: a bedrock pool needs it (SigV4 signing)")


def parse_config(
    text: str, *, source: str = "<string>", env: dict[str, str] | None = None
) -> Config:
    """Parse YAML text into a validated ``Config``; raise ``ConfigError`` otherwise."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    data = _interpolate(raw, "", dict(os.environ) if env is None else env)
    _join_servers(data)
    # Pools and routes are converted one by one so that an error names the
    # entry (msgspec reports dict keys as `[...]`).
    pools = {
        n: _convert(p, PoolConfig, f"pools.{n}", source) for n, p in _section(data, "pools", source)
    }
    routes = {
        n: _convert(r, RouteConfig, f"routes.{n}", source)
        for n, r in _section(data, "routes", source)
    }
    base: Config = _convert(data, Config, "", source)
    cfg = msgspec.structs.replace(base, pools=pools, routes=routes)
    _check_references(cfg)
    return cfg


def _join_servers(data: dict[str, Any]) -> None:
    """``nats.url`` as a YAML list of servers is the same as comma-separated."""
    section = data.get("nats")
    if isinstance(section, dict) and isinstance(section.get("url"), list):
        section["url"] = ",".join(str(u).strip() for u in section["url"])


def _section(data: dict[str, Any], key: str, source: str) -> list[tuple[str, Any]]:
    value = data.pop(key, None) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: Expected a mapping of name -> settings")
    return [(str(k), v) for k, v in value.items()]


def _convert(data: Any, typ: type[Any], path: str, source: str) -> Any:
    try:
        return msgspec.convert(data, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        detail = _friendly(exc)
        if path:
            detail = (
                f"{path}.{detail}"
                if not detail.startswith(("Expected", "Object"))
                else f"{path}: {detail}"
            )
        raise ConfigError(f"{source}: {detail}") from exc


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from ``path``, else ``$LLMRELAY_CONFIG``, else ./llmrelay.yaml."""
    chosen = Path(path) if path else Path(os.environ.get(CONFIG_ENV, "llmrelay.yaml"))
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{chosen}: no such config file (set --config or {CONFIG_ENV})") from exc
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot read config: {exc.strerror}") from exc
    return parse_config(text, source=str(chosen))
