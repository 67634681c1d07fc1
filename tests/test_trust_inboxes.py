"""Inboxes and cancels (issue 11, defects 8 and 9), attacked as the `client` user.

- Defect 8: operator tools (the monitor's oldest-job probe, `dlq show`) used the
  default `_INBOX` prefix, and a client subscribed to `_INBOX.>` captured queued
  prompts and a whole dead letter. Every user now reads only `_INBOX_<user>.>`.
- Defect 9: any client read a request id on `llm.reply.>` and cancelled the job
  with `llm.cancel.<id>`. A cancel now carries the job's `cancel_key`, which only
  its submitter knows (clients cannot read jobs).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker import Job, Message, RelayClient, ensure_topology
from broker._monitor import Monitor
from broker._nats import connect_nats
from broker._protocol import DeadLetter, encode, now_ms
from broker._server import WORKER_USER
from broker._subjects import inbox_prefix
from devstack import MockProvider, expected_answer
from tests._harness import CLIENT_INBOX, StartStack, mock_pool, relay_config, upstream

LLMRELAY = Path(sys.executable).parent / "llmrelay"
SECRET = "TOP-SECRET-PROMPT-4711"
CHAT = {"chat": [("a", "gpt")]}


class Snoop:
    """A client that tries to read every inbox; it records what arrives and what is refused."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.refused: list[str] = []
        self.nc: NATS | None = None

    async def start(self, client_url: str, *subjects: str) -> None:
        async def on_error(exc: Exception) -> None:
            self.refused.append(str(exc).lower())

        async def record(msg: Msg) -> None:
            self.seen.append(msg.data)

        self.nc = await nats.connect(
            client_url, inbox_prefix=CLIENT_INBOX, error_cb=on_error, allow_reconnect=False
        )
        for subject in subjects:
            await self.nc.subscribe(subject, cb=record)
        await self.nc.flush()

    async def stop(self) -> None:
        assert self.nc is not None
        await self.nc.flush()
        await self.nc.close()

    def leaked(self) -> bool:
        return any(SECRET.encode() in data for data in self.seen)


def _job(rid: str, route: str = "chat") -> Job:
    return Job(
        id=rid,
        route=route,
        messages=[Message(role="user", content=SECRET)],
        reply_to=f"llm.reply.{rid}",
        deadline_ms=now_ms() + 60_000,
    )


async def test_a_client_cannot_read_the_inboxes_of_operator_tools(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    cfg = relay_config({"a": mock_pool("http://127.0.0.1:9")}, CHAT)
    await ensure_topology(nc, cfg)  # no worker: the job waits, and the probe reads it
    await nc.jetstream().publish("llm.jobs.chat", encode(_job("queued")))
    letter = DeadLetter(code="internal", message="x", at_ms=now_ms(), route="chat", job=_job("d"))
    await nc.jetstream().publish("llm.dlq.chat", encode(letter))
    snoop = Snoop()
    await snoop.start(client_url, "_INBOX.>", f"{inbox_prefix(WORKER_USER[0])}.>")
    # The operator, as `llmrelay monitor` and `llmrelay dlq show` connect.
    operator = await connect_nats(worker_url, name="llmrelay-monitor")
    try:
        status = await Monitor(operator, cfg).tick()
    finally:
        await operator.close()
    shown = await asyncio.create_subprocess_exec(
        str(LLMRELAY), "dlq", "show", "d", "--nats-url", worker_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await shown.communicate()
    await snoop.stop()
    assert (
        status is not None and status.route("chat").oldest_job_age_s is not None
    )  # it read the job
    assert shown.returncode == 0 and SECRET in out.decode()  # the operator sees the letter
    assert not snoop.leaked()
    assert len(snoop.refused) == 2 and all("permissions violation" in e for e in snoop.refused)


async def test_a_client_cannot_cancel_another_clients_job(
    relay_stack: StartStack, client_url: str
) -> None:
    mock = MockProvider(name="p", tokens=12, token_delay_ms=40)
    async with relay_stack({"a": upstream(mock)}, CHAT) as s:
        evil = await nats.connect(client_url, inbox_prefix=CLIENT_INBOX)
        cancels: list[str] = []

        async def cancel_what_streams(msg: Msg) -> None:
            rid = msg.subject.removeprefix("llm.reply.")
            if rid not in cancels:
                cancels.append(rid)
                for payload in (b"", b"guess", b"null"):
                    await evil.publish(f"llm.cancel.{rid}", payload)

        await evil.subscribe("llm.reply.>", cb=cancel_what_streams)
        await evil.flush()
        try:
            text = await (await s.relay.submit("victim", route="chat")).text()
        finally:
            await evil.close()
    assert cancels  # the attacker did try
    assert text == expected_answer("p", 12)


async def test_a_raw_client_job_without_a_key_is_cancelled_by_its_id(
    relay_stack: StartStack, client_url: str
) -> None:
    """The protocol stays open to any NATS client: no key, no protection (README)."""
    mock = MockProvider(name="p", tokens=200, token_delay_ms=20)
    async with relay_stack({"a": upstream(mock)}, CHAT):
        raw = await nats.connect(client_url, inbox_prefix=CLIENT_INBOX)
        try:
            replies = await raw.subscribe("llm.reply.raw1")
            await raw.jetstream().publish("llm.jobs.chat", encode(_job("raw1")))
            await replies.next_msg(timeout=10)  # it streams
            await raw.publish("llm.cancel.raw1", b"")
            with anyio.fail_after(10):
                while True:
                    msg = await replies.next_msg(timeout=10)
                    if b'"type":"error"' in msg.data:
                        break
        finally:
            await raw.close()
    assert b'"code":"cancelled"' in msg.data


async def test_relay_clients_connect_with_their_users_inbox_prefix(client_url: str) -> None:
    async with RelayClient(client_url) as relay:
        assert relay.nc.new_inbox().startswith(f"{CLIENT_INBOX}.")
