"""The checks on a delivered job before any upstream call: decode, validate, find its model.

``JobRun._run`` (``_job.py``) starts with these. Every job comes from an
untrusted client: it is decoded with ``decode_untrusted`` (any payload, however
large, deep or malformed, is an ``InvalidJob``, never an exception of another
kind) and checked field by field with ``broker/_validate.validate_job``, which
also clamps its deadline to the route's ``deadline_s``.

Bad input never raises out of here: it is answered (when a reply subject can
be read, and only on its tenant's ``llm.reply.`` subjects), parked in the dead-letter queue (a
payload that is not a job as a bounded, escaped preview, never its raw bytes),
and its message is settled (``settle``).
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from broker._errors import (
    FeatureUnsupported,
    InvalidJob,
    PayloadTooLarge,
    RelayError,
    UnknownRoute,
)
from broker._nats import nats_errors
from broker._protocol import DeadLetter, Error, Job, now_ms, requested_features
from broker._subjects import is_valid_name
from broker._validate import decode_untrusted, peek, preview, validate_job
from workers._context import PoolContext
from workers._delivery import Delivery
from workers.providers._registry import provider_features

log = logging.getLogger("llmrelay.worker")

INVALID_ROUTE_TOKEN = "_invalid"
# A refused job the DLQ could not take comes back after this long, to be parked again.
DLQ_RETRY_S = 2.0


async def read_job(ctx: PoolContext, delivery: Delivery) -> Job | None:
    """The delivered job fit to serve, or None once a job that cannot be served was rejected.

    Routing state is the workers' (``Delivery.trusted``: the subject decides the
    route) before any field is checked, so the route's limits are the ones applied.
    """
    try:
        job = delivery.trusted(decode_untrusted(delivery.msg.data))
    except InvalidJob as exc:
        await _reject_raw(ctx, delivery, exc.code, exc.message)
        return None
    if not delivery.may_answer(job.reply_to):  # another tenant's replies: never answered
        wanted = f"llm.reply.{delivery.tenant}.<id>" if delivery.tenant else "llm.reply.<id>"
        await _reject(ctx, delivery, job, InvalidJob.code, f"reply_to: must be {wanted}")
        return None
    try:
        return validate_job(job, ctx.config, now_ms())
    except (InvalidJob, PayloadTooLarge) as exc:
        await _reject(ctx, delivery, job, exc.code, exc.message)
        return None


async def resolve_model(ctx: PoolContext, delivery: Delivery, job: Job) -> str | None:
    """The upstream model this pool uses for ``job``, or None once the job was rejected."""
    model = ctx.model_for(job)
    if model is None:
        message = f"pool {ctx.pool_name} does not serve route {job.route!r}"
        await _reject(ctx, delivery, job, UnknownRoute.code, message)
    return model


async def settle(msg: Msg, parked: bool) -> None:
    """Terminate the message of a job that was dead-lettered; hand it back if it was not.

    Parked, it must never come back: ``term``. When the DLQ did not take it
    (a timeout, the DLQ stream gone), ``nak`` with a delay instead of ``term``:
    the job stays in the queue, so nothing is silently lost, and it comes back
    in ``DLQ_RETRY_S`` to be parked again. That is no crash loop (a retry costs
    one decode, and nothing raises), and it ends: after ``max_deliver`` tries
    the max-deliveries advisory (``_control.py``) parks the job, or, with the
    DLQ still down, leaves it in the stream for an operator to see.
    """
    try:
        with nats_errors("settling a refused job"):
            if parked:
                await msg.term()
            else:
                await msg.nak(delay=DLQ_RETRY_S)
    except RelayError as exc:  # connection gone, or acked already: redelivery decides
        log.warning("could not settle a refused job: %s", exc)


def raw_letter(code: str, message: str, data: bytes, route: str | None = None) -> DeadLetter:
    """The dead letter of a payload that is not a job: a bounded preview, never the bytes."""
    token = route if route is not None and is_valid_name(route) else INVALID_ROUTE_TOKEN
    return DeadLetter(
        code=code,
        message=message,
        at_ms=now_ms(),
        route=token,
        raw=preview(data),
        raw_bytes=len(data),
    )


def refusal(delivery: Delivery, code: str, message: str, job: Job | None = None) -> Error:
    """The error event of a refused delivery, named by its job and attempt like any other."""
    attempts = job.attempts if job is not None else []
    return Error(
        code=code,
        message=message,
        attempt=delivery.attempt,
        attempts=attempts,
        job_seq=delivery.job_seq,
    )


async def _reject(ctx: PoolContext, delivery: Delivery, job: Job, code: str, message: str) -> None:
    if delivery.may_answer(job.reply_to):
        await ctx.answer(job.reply_to, refusal(delivery, code, message, job))
    route = job.route if is_valid_name(job.route) else INVALID_ROUTE_TOKEN
    letter = DeadLetter(code=code, message=message, at_ms=now_ms(), route=route, job=job)
    await settle(delivery.msg, await ctx.dead_letter(letter))


async def _reject_raw(ctx: PoolContext, delivery: Delivery, code: str, message: str) -> None:
    """Answer a payload that is not a job, if a reply subject can be read from it."""
    data = delivery.msg.data
    reply, claimed = peek(data)
    if reply is not None and delivery.may_answer(reply):
        await ctx.answer(reply, refusal(delivery, code, message))
    # The DLQ subject (and its metric label) names a configured route or `_invalid`,
    # never any name a payload claims: a client must not mint subjects or labels.
    route = claimed if claimed in ctx.config.routes else None
    await settle(delivery.msg, await ctx.dead_letter(raw_letter(code, message, data, route)))


def unsupported(ctx: PoolContext, job: Job) -> FeatureUnsupported | None:
    """A job asking for what this pool's provider kind does not map: never sent without
    it (``Provider.features``); it goes to a target that maps it (``_decide.py``)."""
    missing = frozenset(requested_features(job) - provider_features(ctx.pool.kind))
    if not missing:
        return None
    names = ", ".join(sorted(missing))
    return FeatureUnsupported(
        f"{names}: pool {ctx.pool_name} ({ctx.pool.kind}) does not support it",
        features=missing,
    )
