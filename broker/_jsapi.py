"""Raw JetStream API calls that nats-py has no wrapper for.

Priority-group consumers (ADR-42) are created with a raw
``$JS.API.CONSUMER.CREATE`` request and pulled with raw
``$JS.API.CONSUMER.MSG.NEXT`` requests carrying ``group`` and ``priority``
(see NATS-NOTES.md). Errors come back as ``JetStreamApiError`` with the
server's ``err_code`` and description.
"""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from broker._errors import JetStreamApiError
from broker._nats import nats_errors
from broker._subjects import js_api

_NS = 1_000_000_000
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def seconds_to_ns(seconds: float) -> int:
    return int(seconds * _NS)


async def api_request(
    nc: NATS, subject: str, body: dict[str, Any], timeout_s: float = 5.0
) -> dict[str, Any]:
    """One JetStream API request; raise ``JetStreamApiError`` on an error reply."""
    with nats_errors(subject):
        try:
            msg = await nc.request(subject, _encoder.encode(body), timeout=timeout_s)
        except NoRespondersError as exc:
            raise JetStreamApiError(f"{subject}: JetStream is not enabled on this server") from exc
        except NatsTimeout as exc:
            raise JetStreamApiError(f"{subject}: no answer from JetStream in {timeout_s}s") from exc
    reply: dict[str, Any] = _decoder.decode(msg.data) if msg.data else {}
    err = reply.get("error")
    if err:
        raise JetStreamApiError(
            f"{subject}: {err.get('description', 'error')}",
            status=int(err.get("code", 0)),
            err_code=int(err.get("err_code", 0)),
        )
    return reply


def priority_consumer_config(
    *,
    name: str,
    filter_subjects: list[str],
    group: str,
    policy: str,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int,
    max_waiting: int,
    replicas: int = 0,
) -> dict[str, Any]:
    """A durable priority-group consumer; one filter subject is sent as ``filter_subject``.

    ``replicas``: 0 takes the stream's when the consumer is created, but does not
    follow a later change of the stream's (a WorkQueue stream's consumers must have
    as many as the stream): give them explicitly.
    """
    filters: dict[str, Any] = (
        {"filter_subject": filter_subjects[0]}
        if len(filter_subjects) == 1
        else {"filter_subjects": filter_subjects}
    )
    return {
        "durable_name": name,
        "name": name,
        **filters,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "replay_policy": "instant",
        "ack_wait": seconds_to_ns(ack_wait_s),
        "max_deliver": max_deliver,
        "max_ack_pending": max_ack_pending,
        "max_waiting": max_waiting,
        "priority_groups": [group],
        "priority_policy": policy,
        "num_replicas": replicas,
    }


async def create_or_update_consumer(
    nc: NATS, stream: str, config: dict[str, Any]
) -> dict[str, Any]:
    """Create the durable consumer, or update it in place if it exists."""
    name = config["durable_name"]
    subject = js_api("CONSUMER", "CREATE", stream, name)
    return await api_request(nc, subject, {"stream_name": stream, "config": config})


async def consumer_info(nc: NATS, stream: str, name: str) -> dict[str, Any]:
    return await api_request(nc, js_api("CONSUMER", "INFO", stream, name), {})


def pull_request_body(
    *,
    group: str,
    priority: int = 0,
    expires_s: float,
    min_pending: int | None = None,
    heartbeat_s: float | None = None,
) -> bytes:
    """Body of a ``batch=1`` priority-group pull (see NATS-NOTES.md)."""
    body: dict[str, Any] = {"batch": 1, "expires": seconds_to_ns(expires_s), "group": group}
    if priority:
        body["priority"] = priority
    if min_pending is not None:
        body["min_pending"] = min_pending
    if heartbeat_s is not None:
        body["idle_heartbeat"] = seconds_to_ns(heartbeat_s)
    return _encoder.encode(body)


def next_subject(stream: str, consumer: str) -> str:
    return js_api("CONSUMER", "MSG", "NEXT", stream, consumer)
