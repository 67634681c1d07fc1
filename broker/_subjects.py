"""Names of every subject, stream, consumer and bucket, in one place."""

from __future__ import annotations

import re

JOBS_STREAM = "LLM_JOBS"
REPLIES_STREAM = "LLM_REPLIES"
EVENTS_STREAM = "LLM_EVENTS"
DLQ_STREAM = "LLM_DLQ"
WORKERS_BUCKET = "llm_workers"
WORKERS_STREAM = f"KV_{WORKERS_BUCKET}"  # the stream behind the bucket
# Every stream llmrelay creates (``ensure_topology``), as `status` lists them.
ALL_STREAMS = (JOBS_STREAM, REPLIES_STREAM, EVENTS_STREAM, DLQ_STREAM, WORKERS_STREAM)

JOBS_PREFIX = "llm.jobs"
POOL_PREFIX = "llm.pool"
# Re-queues to a backup pool: workers only (nats.conf), so their routing state is trusted.
REQUEUE_PREFIX = "llm.requeue"
REPLY_PREFIX = "llm.reply"
CANCEL_PREFIX = "llm.cancel"
EVENTS_PREFIX = "llm.events"
DLQ_PREFIX = "llm.dlq"
CONTROL_PREFIX = "llm.control"

# Every NATS user gets inboxes of its own, `_INBOX_<user>.>`, and nats.conf lets a
# user subscribe to its own only: PubAcks, replays, JetStream API answers and pulled
# jobs land in inboxes, so one user must never read another's. A connection without
# a user name (a token, creds) falls back to `_INBOX`. Workers use a prefix of their
# own besides, so no permission slip could expose the jobs they pull.
INBOX_PREFIX = "_INBOX"
WORKER_INBOX_PREFIX = "_LLMRELAY_WORKER_INBOX"

JS_API_PREFIX = "$JS.API"
# Published by the server when a job was delivered max_deliver times (NATS-NOTES.md).
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}.*"

# Headers of a re-queued job (on ``llm.requeue.<pool>`` only, so a worker wrote them):
# the job's stream sequence as its client published it, and the attempt id base of
# the re-queued message (``broker/_fold.py``, attempt ids).
JOB_SEQ_HEADER = "Llmrelay-Job-Seq"
ATTEMPT_BASE_HEADER = "Llmrelay-Attempt-Base"

# Every priority-group consumer has exactly one group.
PRIORITY_GROUP = "workers"

NAME_RE = re.compile(r"^[a-z0-9_-]+$")


def inbox_prefix(user: str | None) -> str:
    """The inbox prefix of a NATS user (``_INBOX_client``); ``_INBOX`` without a name."""
    return f"{INBOX_PREFIX}_{user}" if user and is_valid_name(user) else INBOX_PREFIX


# Tenants (README, "Security model"; deploy/nats-tenants.conf): a tenant is a NATS
# user with a subject space of its own, the tenant name being its user name. Its
# jobs go to `llm.jobs.<route>.<tenant>` and `llm.pool.<pool>.<tenant>` (the
# tenant last, so a route's consumer takes `llm.jobs.<route>` and
# `llm.jobs.<route>.*`, and each tenant has a bounded queue of its own), its
# replies to `llm.reply.<tenant>.<id>`, its cancels to `llm.cancel.<tenant>.<id>`,
# its inboxes are `_INBOX_<tenant>`. Without a tenant (the default, nats.conf):
# `llm.jobs.<route>`, `llm.reply.<id>`, `llm.cancel.<id>`, one token each.


def _scoped(prefix: str, name: str, tenant: str | None) -> str:
    return f"{prefix}.{name}.{tenant}" if tenant else f"{prefix}.{name}"


def route_subject(route: str, tenant: str | None = None) -> str:
    return _scoped(JOBS_PREFIX, route, tenant)


def pool_subject(pool: str, tenant: str | None = None) -> str:
    return _scoped(POOL_PREFIX, pool, tenant)


def tenant_subjects(subject: str) -> str:
    """The wildcard of every tenant's queue beside a route or pool subject."""
    return f"{subject}.*"


def requeue_subject(pool: str) -> str:
    return f"{REQUEUE_PREFIX}.{pool}"


_ARRIVALS = ((JOBS_PREFIX, "route", 2), (POOL_PREFIX, "pool", 2), (REQUEUE_PREFIX, "requeue", 1))


def _arrival(subject: str) -> tuple[str, str, str | None]:
    for prefix, kind, most in _ARRIVALS:
        if subject.startswith(prefix + "."):
            tokens = subject[len(prefix) + 1 :].split(".")
            if len(tokens) <= most and all(tokens):
                return kind, tokens[0], tokens[1] if len(tokens) == 2 else None
    return "", "", None


def arrival(subject: str) -> tuple[str, str]:
    """What a job's subject says about it: ``("route", name)``, ``("pool", name)``
    (both published by clients, tenant or not) or ``("requeue", pool)`` (by a
    worker); else ``("", "")``."""
    kind, name, _ = _arrival(subject)
    return kind, name


def tenant_of(subject: str) -> str | None:
    """The tenant token of a job subject (``llm.jobs.<route>.<tenant>``), else None.
    Not checked here: a token that is no tenant name fits no reply subject."""
    return _arrival(subject)[2]


def reply_subject(request_id: str, tenant: str | None = None) -> str:
    return f"{REPLY_PREFIX}.{tenant}.{request_id}" if tenant else f"{REPLY_PREFIX}.{request_id}"


def reply_tenant(reply_to: str) -> str | None:
    """The tenant of a (checked) reply subject: ``t`` of ``llm.reply.<t>.<id>``."""
    tokens = reply_to.split(".")
    return tokens[2] if len(tokens) == 4 else None


def cancel_subject(request_id: str, tenant: str | None = None) -> str:
    return f"{CANCEL_PREFIX}.{tenant}.{request_id}" if tenant else f"{CANCEL_PREFIX}.{request_id}"


def parse_cancel(subject: str) -> tuple[str | None, str] | None:
    """(tenant, request id) of ``llm.cancel.<id>`` / ``llm.cancel.<tenant>.<id>``."""
    tokens = subject.split(".")
    if subject.startswith(CANCEL_PREFIX + ".") and len(tokens) in (3, 4) and all(tokens):
        return (tokens[2] if len(tokens) == 4 else None), tokens[-1]
    return None


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


def events_subject(kind: str) -> str:
    return f"{EVENTS_PREFIX}.{kind}"


def dlq_subject(route: str) -> str:
    return f"{DLQ_PREFIX}.{route}"


def pause_subject(pool: str) -> str:
    """Control subject: every worker of ``pool`` pauses (payload ``PoolPause``)."""
    return f"{CONTROL_PREFIX}.{pool}.pause"


def cancel_all_subject() -> str:
    """What a worker subscribes to: every ``llm.cancel.<id>`` and ``llm.cancel.<tenant>.<id>``."""
    return f"{CANCEL_PREFIX}.>"


def js_api(*tokens: str) -> str:
    """A JetStream API subject, e.g. ``js_api("STREAM", "INFO", JOBS_STREAM)``."""
    return ".".join((JS_API_PREFIX, *tokens))


def route_consumer(route: str) -> str:
    """Durable consumer name for a route subject (names allow [A-Za-z0-9_-])."""
    return f"route_{route}"


def pool_consumer(pool: str) -> str:
    return f"pool_{pool}"


def is_valid_name(name: str) -> bool:
    """A route or pool name usable as a subject token: ``[a-z0-9_-]+``, and nothing after
    it (``re.match`` with ``$`` would let a trailing newline through into a subject)."""
    return NAME_RE.fullmatch(name) is not None
