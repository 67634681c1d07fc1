"""The checks on a delivered job before any upstream call: decode it, find its model.

``JobRun._run`` (``_job.py``) starts with these. Bad input never raises out of
here: it is answered (when a reply subject can be read, and only under
``llm.reply.``) and parked in the dead-letter queue, and the message is
terminated so it is not delivered again.
"""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg

from broker._errors import InvalidJob, UnknownRoute
from broker._protocol import DeadLetter, Error, Job, decode_job, encode, now_ms
from broker._subjects import REPLY_PREFIX, is_valid_name
from workers._context import PoolContext

INVALID_ROUTE_TOKEN = "_invalid"


async def read_job(ctx: PoolContext, msg: Msg) -> Job | None:
    """The job in ``msg``, or None once a job that cannot be served was rejected."""
    try:
        job = decode_job(msg.data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        await _reject_raw(ctx, msg, InvalidJob.code, f"the job could not be decoded: {exc}")
        return None
    if not _valid_reply(job.reply_to):
        await _reject_raw(ctx, msg, InvalidJob.code, "reply_to must be a subject under llm.reply.")
        return None
    return job


async def resolve_model(ctx: PoolContext, msg: Msg, job: Job) -> str | None:
    """The upstream model this pool uses for ``job``, or None once the job was rejected."""
    model = ctx.model_for(job)
    if model is None:
        message = f"pool {ctx.pool_name} does not serve route {job.route!r}"
        await _reject(ctx, msg, job, UnknownRoute.code, message)
    return model


async def _reject(ctx: PoolContext, msg: Msg, job: Job, code: str, message: str) -> None:
    error = Error(code=code, message=message, attempts=job.attempts)
    await ctx.nc.publish(job.reply_to, encode(error))
    route = job.route if is_valid_name(job.route) else INVALID_ROUTE_TOKEN
    await ctx.dead_letter(
        DeadLetter(code=code, message=message, at_ms=now_ms(), route=route, job=job)
    )
    await msg.term()


async def _reject_raw(ctx: PoolContext, msg: Msg, code: str, message: str) -> None:
    """Answer a job we could not decode, if a reply subject can be read from it."""
    loose = _loose_fields(msg.data)
    reply, route = loose.get("reply_to"), loose.get("route")
    if isinstance(reply, str) and _valid_reply(reply):
        await ctx.nc.publish(reply, encode(Error(code=code, message=message)))
    token = route if isinstance(route, str) and is_valid_name(route) else INVALID_ROUTE_TOKEN
    raw = msg.data[: ctx.config.streams.max_job_bytes].decode(errors="replace")
    await ctx.dead_letter(
        DeadLetter(code=code, message=message, at_ms=now_ms(), route=token, raw=raw)
    )
    await msg.term()


def _valid_reply(subject: str) -> bool:
    """Only plain subjects under llm.reply.: a job must not make a worker publish elsewhere."""
    return (
        subject.startswith(REPLY_PREFIX + ".")
        and len(subject) > len(REPLY_PREFIX) + 1
        and not any(c in subject for c in "*> \t\r\n")
    )


def _loose_fields(data: bytes) -> dict[str, object]:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}
