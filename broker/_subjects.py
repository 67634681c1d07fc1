"""Names of every subject, stream, consumer and bucket, in one place."""

from __future__ import annotations

import re

JOBS_STREAM = "LLM_JOBS"
REPLIES_STREAM = "LLM_REPLIES"
EVENTS_STREAM = "LLM_EVENTS"
DLQ_STREAM = "LLM_DLQ"
WORKERS_BUCKET = "llm_workers"

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


def route_subject(route: str) -> str:
    return f"{JOBS_PREFIX}.{route}"


def pool_subject(pool: str) -> str:
    return f"{POOL_PREFIX}.{pool}"


def requeue_subject(pool: str) -> str:
    return f"{REQUEUE_PREFIX}.{pool}"


def arrival(subject: str) -> tuple[str, str]:
    """What a job's subject says about it: ``("route", name)``, ``("pool", name)``
    (both published by clients) or ``("requeue", pool)`` (by a worker); else ``("", "")``."""
    prefix, _, name = subject.rpartition(".")
    kinds = {JOBS_PREFIX: "route", POOL_PREFIX: "pool", REQUEUE_PREFIX: "requeue"}
    return (kinds[prefix], name) if prefix in kinds and name else ("", "")


def reply_subject(request_id: str) -> str:
    return f"{REPLY_PREFIX}.{request_id}"


def cancel_subject(request_id: str) -> str:
    return f"{CANCEL_PREFIX}.{request_id}"


def events_subject(kind: str) -> str:
    return f"{EVENTS_PREFIX}.{kind}"


def dlq_subject(route: str) -> str:
    return f"{DLQ_PREFIX}.{route}"


def pause_subject(pool: str) -> str:
    """Control subject: every worker of ``pool`` pauses (payload ``PoolPause``)."""
    return f"{CONTROL_PREFIX}.{pool}.pause"


def cancel_all_subject() -> str:
    """What a worker subscribes to: every ``llm.cancel.<id>``."""
    return f"{CANCEL_PREFIX}.*"


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
