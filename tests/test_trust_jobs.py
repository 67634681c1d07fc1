"""A hostile client's job never crashes or stalls a worker (issue 11).

Each test is an attack from the issue, made as the ``client`` user of the real
``nats.conf`` with plain nats-py (the library refuses most of these jobs), and
asserts what the victim or the operator sees afterwards: the worker still
alive and serving, the next job's exact answer, the dead letter with a bounded
preview, the pool still pulling, the circuit closed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker import Done, Error, InvalidJob, Job, Message, RelayClient, ensure_topology
from broker._errors import PayloadTooLarge
from broker._jsapi import next_subject, pull_request_body
from broker._protocol import DeadLetter, Event, decode_dead_letter, decode_event, now_ms
from broker._subjects import PRIORITY_GROUP, route_consumer
from broker._validate import PREVIEW_BYTES, peek, preview, validate_job
from devstack import ConfigDoc, MockProvider, expected_answer
from tests._harness import CLIENT_INBOX, running_workers
from workers._ratelimit import RateBudget

LLMRELAY = Path(sys.executable).parent / "llmrelay"
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# A dead letter of a bad payload stays small, however large the payload.
MAX_LETTER_BYTES = 16 * 1024


def config_doc(pools: dict[str, tuple[str, dict[str, Any]]], routes: dict[str, Any]) -> ConfigDoc:
    """pools: name -> (mock url, settings); routes: name -> [(pool, model), ...]."""
    doc = ConfigDoc()
    for name, (url, settings) in pools.items():
        doc.pool(name, base_url=f"{url}/v1", api_key="sk-test", **settings)
    for name, targets in routes.items():
        doc.route(name, targets)
    return doc


def raw_job(rid: str, **fields: Any) -> dict[str, Any]:
    """A job as a raw client writes it (plain JSON), valid unless ``fields`` say otherwise."""
    job: dict[str, Any] = {
        "id": rid,
        "route": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "reply_to": f"llm.reply.{rid}",
        "deadline_ms": now_ms() + 30_000,
    }
    return {**job, **fields}


@asynccontextmanager
async def attacker(client_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(client_url, inbox_prefix=CLIENT_INBOX)
    try:
        yield conn
    finally:
        await conn.close()


async def final_event(sub: Any, timeout_s: float = 10.0) -> Event:
    """The done/error event of one reply subscription."""
    with anyio.fail_after(timeout_s):
        while True:
            event = decode_event((await sub.next_msg(timeout=timeout_s)).data)
            if isinstance(event, Done | Error):
                return event


async def answer_of(sub: Any, timeout_s: float = 15.0) -> tuple[str, Event]:
    """The final attempt's text and the done/error event of one reply subscription."""
    texts: dict[int, list[str]] = {}
    with anyio.fail_after(timeout_s):
        while True:
            event = decode_event((await sub.next_msg(timeout=timeout_s)).data)
            if isinstance(event, Done | Error):
                return "".join(texts.get(event.attempt, [])), event
            if hasattr(event, "delta"):
                texts.setdefault(event.attempt, []).append(event.delta)


async def dead_letters(nc: NATS, subject: str, count: int, timeout_s: float = 15.0) -> list[Msg]:
    """The first ``count`` dead letters on ``subject``, waiting for them to arrive."""
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=timeout_s) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def letter_while_alive(nc: NATS, subject: str, proc: Any) -> Msg:
    """The first dead letter on ``subject``; fails at once if the worker process exits."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    try:
        with anyio.fail_after(15):
            while True:
                assert proc.poll() is None, proc.log_path.read_text(errors="replace")[-3000:]
                try:
                    return await sub.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
    finally:
        await sub.unsubscribe()


def assert_bounded(letter_msg: Msg, raw_bytes: int) -> DeadLetter:
    letter = decode_dead_letter(letter_msg.data)
    assert len(letter_msg.data) < MAX_LETTER_BYTES, len(letter_msg.data)
    assert letter.raw is not None and letter.raw_bytes == raw_bytes
    assert len(letter.raw.encode()) <= 4 * PREVIEW_BYTES
    return letter


@asynccontextmanager
async def worker_process(doc: ConfigDoc, pool: str, nats_url: str, tmp: Path) -> AsyncIterator[Any]:
    """``llmrelay worker`` as a child process; its log goes to a file (never a full pipe)."""
    cfg = doc.write(tmp / f"{pool}.yaml")
    log_path = tmp / f"worker-{pool}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(LLMRELAY), "worker", "--pool", pool, "--config", str(cfg), "--nats-url", nats_url],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    try:
        with anyio.fail_after(20):
            while "serving pool" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text(errors="replace")
                await anyio.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- defect 1: one message crashes every worker --------------------------------------


async def test_a_megabyte_of_control_bytes_neither_kills_the_worker_nor_fills_the_dlq(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    async with MockProvider(name="p", tokens=3) as mock:
        doc = config_doc({"a": (mock.url, {})}, {"chat": [("a", "m")]})
        async with worker_process(doc, "a", worker_url, tmp_path) as proc:
            async with attacker(client_url) as evil:
                await evil.jetstream().publish("llm.jobs.chat", b"\x01" * 1_000_000)
            letter_msg = await letter_while_alive(nc, "llm.dlq._invalid", proc)
            async with RelayClient(client_url, config=doc.parse()) as relay:
                text = await (await relay.submit("fine", route="chat", timeout_s=10)).text()
            alive = proc.poll() is None
    assert alive, proc.log_path.read_text()
    assert text == expected_answer("p", 3)
    letter = assert_bounded(letter_msg, 1_000_000)
    assert letter.code == "invalid_job"
    assert letter.raw == "\\x01" * PREVIEW_BYTES  # escaped, readable, never the raw bytes
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


async def test_invalid_utf8_in_an_ignored_field_is_served_or_refused_never_fatal(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="p", tokens=2) as mock:
        doc = config_doc({"a": (mock.url, {})}, {"chat": [("a", "m")]})
        junk = b',"junk":"' + b"\xff" * 900_000 + b'"}'
        good = msgspec.json.encode(raw_job("ff-good"))[:-1] + junk
        bad = msgspec.json.encode(raw_job("ff-bad", messages="oops"))[:-1] + junk
        async with running_workers(doc.parse(), ["a"], worker_url), attacker(client_url) as evil:
            subs = [await evil.subscribe(f"llm.reply.{r}") for r in ("ff-good", "ff-bad")]
            await evil.jetstream().publish("llm.jobs.chat", good)
            await evil.jetstream().publish("llm.jobs.chat", bad)
            served, refused = [await answer_of(s) for s in subs]
            (letter_msg,) = await dead_letters(nc, "llm.dlq.chat", 1)
            async with RelayClient(client_url, config=doc.parse()) as relay:
                after = await (await relay.submit("after", route="chat", timeout_s=10)).text()
    assert served[0] == expected_answer("p", 2) and isinstance(served[1], Done)
    error = refused[1]
    assert isinstance(error, Error) and error.code == "invalid_job"
    assert error.message.startswith("messages: ")
    assert_bounded(letter_msg, len(bad))
    assert after == expected_answer("p", 2)


async def test_a_dead_letter_that_times_out_neither_kills_the_worker_nor_loses_the_job(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="p", tokens=2) as mock:
        doc = config_doc({"a": (mock.url, {})}, {"chat": [("a", "m")]})
        cfg = doc.parse()
        async with running_workers(cfg, ["a"], worker_url), attacker(client_url) as evil:
            # The DLQ stream is gone and something silent listens instead: every
            # dead-letter publish now waits for a PubAck that never comes.
            await nc.jetstream().delete_stream("LLM_DLQ")
            black_hole = await nc.subscribe("llm.dlq.>")
            reply = await evil.subscribe("llm.reply.to-bad")
            await evil.jetstream().publish("llm.jobs.chat", b"not a job")
            await evil.jetstream().publish(
                "llm.jobs.chat", msgspec.json.encode(raw_job("to-bad", max_tokens=0))
            )
            refusal = await final_event(reply)
            async with RelayClient(client_url, config=cfg) as relay:
                during = await (await relay.submit("during", route="chat", timeout_s=10)).text()
            await anyio.sleep(6)  # the dead letters time out (5 s), the jobs are handed back
            await black_hole.unsubscribe()
            await ensure_topology(nc, cfg)  # the operator brings the DLQ back
            letters = await dead_letters(nc, "llm.dlq.>", 2, timeout_s=20)
            async with RelayClient(client_url, config=cfg) as relay:
                after = await (await relay.submit("after", route="chat", timeout_s=10)).text()
    assert isinstance(refusal, Error) and refusal.code == "invalid_job"
    assert refusal.message.startswith("max_tokens: ")
    assert during == after == expected_answer("p", 2)
    parked = sorted(
        (m.subject, (letter.job.id if letter.job else letter.raw))
        for m in letters
        if (letter := decode_dead_letter(m.data))
    )
    assert parked == [("llm.dlq._invalid", "not a job"), ("llm.dlq.chat", "to-bad")]
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


# --- defect 2: the max-deliveries advisory publishes anywhere ------------------------


async def test_a_poison_job_cannot_make_the_advisory_handler_publish_into_the_jetstream_api(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="p", tokens=2) as mock:
        doc = config_doc(
            {"a": (mock.url, {"ack_wait_s": 0.5, "max_retries": 0})}, {"chat": [("a", "m")]}
        )
        cfg = doc.streams(max_deliver=2).parse()
        await ensure_topology(nc, cfg)
        api = await nc.subscribe("$JS.API.STREAM.PURGE.>")
        async with attacker(client_url) as evil:
            poison = raw_job("poison", reply_to="$JS.API.STREAM.PURGE.LLM_JOBS")
            await evil.jetstream().publish("llm.jobs.chat", msgspec.json.encode(poison))
        # Two workers take the job and die before answering (max_deliver = 2).
        inbox = nc.new_inbox()
        taken = await nc.subscribe(inbox)
        for _ in range(2):
            body = pull_request_body(group=PRIORITY_GROUP, expires_s=2)
            await nc.publish(next_subject("LLM_JOBS", route_consumer("chat")), body, reply=inbox)
            assert (await taken.next_msg(timeout=3)).data == msgspec.json.encode(poison)
            await anyio.sleep(0.6)  # past ack_wait
        async with running_workers(cfg, ["a"], worker_url):
            (letter_msg,) = await dead_letters(nc, "llm.dlq.chat", 1)
            async with RelayClient(client_url, config=cfg) as relay:
                after = await (await relay.submit("after", route="chat", timeout_s=10)).text()
            await anyio.sleep(0.2)
    letter = decode_dead_letter(letter_msg.data)
    assert letter.code == "internal" and letter.job is not None and letter.job.id == "poison"
    assert after == expected_answer("p", 2)
    with pytest.raises(nats.errors.TimeoutError):
        await api.next_msg(timeout=0.2)  # nothing reached the JetStream API
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


# --- defect 6: one job freezes a rate-limited pool -----------------------------------


async def test_a_negative_max_tokens_cannot_freeze_a_token_limited_pool(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with MockProvider(name="p", tokens=2) as mock:
        doc = config_doc({"a": (mock.url, {"tpm": 60_000})}, {"chat": [("a", "m")]})
        cfg = doc.parse()
        async with running_workers(cfg, ["a"], worker_url), attacker(client_url) as evil:
            reply = await evil.subscribe("llm.reply.freeze")
            freeze = raw_job("freeze", max_tokens=-(10**15))
            await evil.jetstream().publish("llm.jobs.chat", msgspec.json.encode(freeze))
            refusal = await final_event(reply)
            async with RelayClient(client_url, config=cfg) as relay:
                texts = [
                    await (await relay.submit(f"q{i}", route="chat", timeout_s=5)).text()
                    for i in range(3)
                ]
    assert isinstance(refusal, Error) and refusal.code == "invalid_job"
    assert refusal.message.startswith("max_tokens: ") and not refusal.retryable
    assert texts == [expected_answer("p", 2)] * 3
    assert mock.stats()["requests"] == 3


def test_the_token_budget_clamps_absurd_charges_and_refunds() -> None:
    now = [0.0]
    budget = RateBudget(rpm=0, tpm=60_000, clock=lambda: now[0])
    budget.charge_tokens(10**15)  # a corrupt estimate: at most a minute of debt
    assert 0 < budget.wait_s() <= 61.0
    budget.charge_tokens(-(10**15))  # and a refund never lifts the bucket past its burst
    assert budget.tokens.level == budget.tokens.burst
    assert budget.tokens_used.total() <= 10**7
    budget.charge_tokens(500)
    assert budget.wait_s() == 0.0


# --- defect 7: any client opens every circuit ----------------------------------------


async def test_a_traceparent_with_a_newline_is_refused_and_never_opens_a_circuit(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    circuit = {"consecutive_failures": 2, "min_requests": 2}
    async with (
        MockProvider(name="mock-a", tokens=2) as ma,
        MockProvider(name="mock-b", tokens=2) as mb,
    ):
        doc = config_doc(
            {"a": (ma.url, {"circuit": circuit}), "b": (mb.url, {"circuit": circuit})},
            {"chat": [("a", "m"), ("b", "m")]},
        )
        cfg = doc.parse()
        async with running_workers(cfg, ["a", "b"], worker_url) as workers:
            async with attacker(client_url) as evil:
                subs = []
                for i in range(6):
                    subs.append(await evil.subscribe(f"llm.reply.tp{i}"))
                    job = raw_job(f"tp{i}", traceparent=f"{TRACE}\r\nx-injected: {i}")
                    await evil.jetstream().publish("llm.jobs.chat", msgspec.json.encode(job))
                refusals = [await final_event(s) for s in subs]
            states = [(w.circuits.state(), w.circuits.snapshot()) for w in workers]
            async with RelayClient(client_url, config=cfg) as relay:
                handle = await relay.submit("good", route="chat", timeout_s=10)
                text = await handle.text()
    assert {(e.code, e.message.split(":")[0]) for e in refusals if isinstance(e, Error)} == {
        ("invalid_job", "traceparent")
    }
    assert states == [("closed", {}), ("closed", {})]
    assert (ma.stats()["requests"], mb.stats()["requests"]) == (1, 0)
    assert text == expected_answer("mock-a", 2)
    assert handle.done is not None and handle.done.pool == "a"


# --- defect 11: a far-future deadline breaks failover --------------------------------


async def test_a_far_future_deadline_is_clamped_and_the_job_fails_over(
    nc: NATS, worker_url: str, client_url: str
) -> None:
    async with (
        MockProvider(name="mock-a", tokens=2) as ma,
        MockProvider(name="mock-b", tokens=2) as mb,
    ):
        doc = config_doc(
            {"a": (ma.url, {}), "b": (mb.url, {})},
            {"chat": [("a", "m+status=500"), ("b", "m")]},
        )
        cfg = doc.parse()
        async with running_workers(cfg, ["a", "b"], worker_url) as workers:
            with anyio.fail_after(10):
                while not all(len(w.peers) == 2 for w in workers):
                    await anyio.sleep(0.05)
            async with attacker(client_url) as evil:
                reply = await evil.subscribe("llm.reply.forever")
                job = raw_job("forever", deadline_ms=2**62)
                await evil.jetstream().publish("llm.jobs.chat", msgspec.json.encode(job))
                text, final = await answer_of(reply, timeout_s=15)
    assert isinstance(final, Done) and final.pool == "b"
    assert text == expected_answer("mock-b", 2)
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


# --- defect 10: a deeply nested job crash-loops the monitor --------------------------


def _subject(m: Msg) -> str:
    return m.subject


def deep_job(rid: str, route: str, depth: int = 200_000) -> bytes:
    head = msgspec.json.encode(raw_job(rid, route=route))[:-1]
    return head + b',"x":' + b"[" * depth + b"]" * depth + b"}"


async def test_a_deeply_nested_job_neither_kills_the_monitor_nor_the_worker(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    async with MockProvider(name="p", tokens=2) as mock:
        doc = config_doc({"a": (mock.url, {})}, {"chat": [("a", "m")]})
        cfg_path = doc.write(tmp_path / "relay.yaml")
        # Route ghost existed when the client published; then the operator removed it.
        await ensure_topology(nc, config_doc({"a": (mock.url, {})}, {
            "chat": [("a", "m")], "ghost": [("a", "m")]}).parse())  # fmt: skip
        async with attacker(client_url) as evil:
            ghost = await evil.subscribe("llm.reply.ghost-after")
            js = evil.jetstream()
            await js.publish("llm.jobs.ghost", deep_job("deep-ghost", "ghost"))
            await js.publish("llm.jobs.ghost", msgspec.json.encode(raw_job("ghost-after")))
            await nc.jetstream().delete_consumer("LLM_JOBS", route_consumer("ghost"))
            log = (tmp_path / "monitor.log").open("wb")
            monitor = subprocess.Popen(
                [str(LLMRELAY), "monitor", "--port", "0", "--interval", "0.2",
                 "--janitor-grace-s", "0", "-c", str(cfg_path), "--nats-url", worker_url],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
            try:
                async with running_workers(doc.parse(), ["a"], worker_url):
                    await js.publish("llm.jobs.chat", deep_job("deep-chat", "chat"))
                    unknown = await final_event(ghost, timeout_s=20)
                    letters = await dead_letters(nc, "llm.dlq.>", 3, timeout_s=20)
                    async with RelayClient(client_url, config=doc.parse()) as relay:
                        handle = await relay.submit("after", route="chat", timeout_s=10)
                        after = await handle.text()
                alive = monitor.poll() is None
            finally:
                monitor.terminate()
                monitor.wait(timeout=10)
                log.close()
    assert alive, (tmp_path / "monitor.log").read_text()
    assert isinstance(unknown, Error) and unknown.code == "unknown_route"
    codes = sorted((m.subject, decode_dead_letter(m.data).code) for m in letters)
    assert codes == [
        ("llm.dlq._invalid", "invalid_job"),  # the worker's, from llm.jobs.chat
        ("llm.dlq.ghost", "unknown_route"),  # the janitor's: the deep job and the next one
        ("llm.dlq.ghost", "unknown_route"),
    ]
    raw = sorted((m for m in letters if decode_dead_letter(m.data).job is None), key=_subject)
    sizes = [len(deep_job("deep-chat", "chat")), len(deep_job("deep-ghost", "ghost"))]
    assert [assert_bounded(m, size).raw_bytes for m, size in zip(raw, sizes, strict=True)]
    assert after == expected_answer("p", 2)
    assert "Traceback" not in (tmp_path / "monitor.log").read_text()


# --- every field validated (build item 4) --------------------------------------------

CFG = config_doc({"a": ("http://127.0.0.1:9", {})}, {"chat": [("a", "m")]}).parse()


def a_job(**fields: Any) -> Job:
    base = Job(
        id="j1",
        route="chat",
        messages=[Message(role="user", content="hi")],
        reply_to="llm.reply.j1",
        deadline_ms=1_000_000 + 30_000,
    )
    return msgspec.structs.replace(base, **fields)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -(10**15)}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"messages": []}, "messages"),
        ({"traceparent": f"{TRACE}\n"}, "traceparent"),
        ({"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}, "traceparent"),
        ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01"}, "traceparent"),
        ({"traceparent": TRACE.upper()}, "traceparent"),
        ({"reply_to": "$JS.API.STREAM.PURGE.LLM_JOBS"}, "reply_to"),
        ({"reply_to": "llm.reply.>"}, "reply_to"),
        ({"id": "a.b"}, "id"),
        ({"id": "x\r\nNats-Msg-Id: y"}, "id"),
        ({"pool": "A B"}, "pool"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"metadata": {str(i): "v" for i in range(33)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"route": "chat\n"}, "route"),
    ],
)
def test_every_bad_field_is_an_invalid_job_naming_it(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        validate_job(a_job(**fields), CFG, 1_000_000)
    assert caught.value.field == field and caught.value.message.startswith(f"{field}: ")
    assert caught.value.code == "invalid_job" and not caught.value.retryable


def test_a_valid_job_passes_and_a_far_deadline_is_clamped_to_the_route() -> None:
    ok = a_job(max_tokens=100, temperature=0.0, top_p=1.0, traceparent=TRACE, seed=-1)
    assert validate_job(ok, CFG, 1_000_000) == ok
    far = validate_job(a_job(deadline_ms=2**62), CFG, 1_000_000)
    assert far.deadline_ms == 1_000_000 + int(CFG.routes["chat"].deadline_s * 1000)


def test_a_job_too_large_once_escaped_is_refused() -> None:
    small = msgspec.structs.replace(
        CFG, streams=msgspec.structs.replace(CFG.streams, max_job_bytes=4096)
    )
    # 700 control characters are 700 bytes raw, 4200 once JSON-escaped.
    job = a_job(messages=[Message(role="user", content="\x01" * 700)])
    with pytest.raises(PayloadTooLarge):
        validate_job(job, small, 1_000_000)


def test_untrusted_bytes_have_a_bounded_escaped_preview_and_a_peek() -> None:
    assert preview(b"\x1b[2Jhi\n\xff") == "\\x1b[2Jhi\n\\xff"
    assert len(preview(b"\x01" * 10**6)) == 4 * PREVIEW_BYTES
    deep = b'{"reply_to": "llm.reply.x", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert peek(deep) == (None, None)  # too deep to read: unanswerable, but no exception
    assert peek(b'{"reply_to": "llm.reply.x", "route": "chat", "x": "\xff"}') == (
        "llm.reply.x",
        "chat",
    )
    assert peek(b'{"reply_to": "$JS.API.STREAM.PURGE.LLM_JOBS"}') == (None, None)


async def test_the_client_refuses_an_invalid_job_before_publishing(
    nc: NATS, client_url: str
) -> None:
    await ensure_topology(nc, CFG)
    async with RelayClient(client_url, config=CFG) as relay:
        job = relay.build_job("hi", route="chat")
        with pytest.raises(InvalidJob, match="traceparent: not a W3C"):
            await relay.submit_job(msgspec.structs.replace(job, traceparent="x\ny"))
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


def test_priority_is_gone_from_the_protocol() -> None:
    """It was accepted and never read; an old client's ``priority`` is ignored."""
    assert "priority" not in Job.__struct_fields__
    old = msgspec.json.encode({**raw_job("old"), "priority": 9})
    assert validate_job(msgspec.json.decode(old, type=Job), CFG, now_ms()).id == "old"


# --- the fuzz test ("Done means") ----------------------------------------------------

FUZZ_JOBS = 10_000
FUZZ_BATCH = 20  # jobs per hypothesis example: generation costs ~1 ms a job this way
FIELDS = [
    "id", "route", "messages", "reply_to", "deadline_ms", "pool", "max_tokens", "temperature",
    "top_p", "stop", "seed", "priority", "metadata", "traceparent", "created_ms", "attempts",
    "rank", "extra",
]  # fmt: skip
NASTY: list[Any] = [
    -(10**15), 0, -1, 2**62, 2**64, 1e308, "", "\n", "\x00", "\u202e", TRACE,
    f"{TRACE}\r\nx-evil: 1", "$JS.API.STREAM.PURGE.LLM_JOBS", "llm.reply.*", "llm.reply.>",
    "llm.events.x", [], {}, [""], [{"role": "user", "content": "x"}],
    [{"role": "admin", "content": "x"}], [{"role": "user"}], {"k": "v"},
    [{"pool": "a", "model": "m", "code": "c", "message": "m", "deliveries": 10**9}],
    "a", "chat", 1, 5,
]  # fmt: skip
# How a case's job becomes bytes; "json" most often, so that many jobs are served.
ENCODINGS = ["json"] * 10 + ["ascii"] * 3 + [
    "truncate", "garbage", "ff", "deep", "pad", "raw", "notobj",
]  # fmt: skip
PAD_BYTES = [100, 1000, 10_000, 100_000, 100, 1000, 10_000, 900_000, 1_100_000, 5000]
DEPTHS = [2, 30, 3000, 200_000]


def fuzz_cases() -> Any:
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
    value = st.one_of(
        st.sampled_from(NASTY),
        leaf,
        st.lists(leaf, max_size=3),
        st.dictionaries(st.text(max_size=8), leaf, max_size=3),
    )
    return st.tuples(
        st.lists(st.tuples(st.sampled_from(FIELDS), value), max_size=3),  # fields changed
        st.lists(st.sampled_from(FIELDS), max_size=2),  # fields left out
        st.sampled_from(ENCODINGS),
        st.integers(0, 2**16),
    )


def generate_cases(n: int) -> list[Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    cases: list[Any] = []

    @settings(
        max_examples=n // FUZZ_BATCH,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(fuzz_cases(), min_size=FUZZ_BATCH, max_size=FUZZ_BATCH))
    def collect(batch: list[Any]) -> None:
        cases.extend(batch)

    collect()
    return cases


def render(case: Any, i: int, now: int) -> bytes:
    """One generated case as the bytes a hostile client publishes."""
    import json

    changed, dropped, encoding, param = case
    job: dict[str, Any] = raw_job(f"fz{i}", content=f"q{i}", deadline_ms=now + 60_000)
    job.pop("content")
    for name in dropped:
        job.pop(name, None)
    job.update(changed)
    if encoding == "notobj":
        job = list(job.values())  # type: ignore[assignment]
    text = json.dumps(job, ensure_ascii=encoding == "ascii")
    data = text.encode("utf-8", "surrogatepass")
    tail = {
        "ff": b',"junk":"' + b"\xff" * (param % 5000) + b'"}',
        "deep": b',"deep":' + b"[" * DEPTHS[param % 4] + b"]" * DEPTHS[param % 4] + b"}",
        "pad": b',"pad":"' + b"x" * PAD_BYTES[param % len(PAD_BYTES)] + b'"}',
    }.get(encoding)
    if tail is not None and data.endswith(b"}") and len(data) > 2:
        return data[:-1] + tail
    if encoding == "truncate":
        return data[: param % max(1, len(data))]
    if encoding == "garbage":
        return bytes([param % 256, 0xFF, 0x00]) + data
    if encoding == "raw":  # up to 900 kB of one byte (0x01 is 6 bytes JSON-escaped)
        return bytes([param % 256]) * PAD_BYTES[param % len(PAD_BYTES)]
    return data


_PLAIN_REPLY = __import__("re").compile(r"llm\.reply\.[A-Za-z0-9_-]+")


def readable_reply(data: bytes) -> str | None:
    """The reply subject a strict JSON reader finds in ``data`` (the test's own oracle)."""
    import json

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    def finite(text: str) -> float:
        number = float(text)
        if number in (float("inf"), float("-inf")):
            raise ValueError(text)
        return number

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=no_constants, parse_float=finite)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere
    except (ValueError, RecursionError, UnicodeError):
        return None
    reply = value.get("reply_to") if isinstance(value, dict) else None
    return reply if isinstance(reply, str) and _PLAIN_REPLY.fullmatch(reply) else None


@pytest.mark.slow
async def test_ten_thousand_hostile_jobs_never_stop_a_worker_and_each_is_answered_or_parked(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    import collections
    import time

    started = time.monotonic()
    cases = await anyio.to_thread.run_sync(generate_cases, FUZZ_JOBS)
    generated_s = time.monotonic() - started
    async with MockProvider(name="p", tokens=1) as mock:
        doc = config_doc({"a": (mock.url, {})}, {"chat": [("a", "m")]})
        doc.streams(queue_capacity=2 * FUZZ_JOBS)
        async with worker_process(doc, "a", worker_url, tmp_path) as proc:
            async with attacker(client_url) as evil:
                finals: collections.Counter[str] = collections.Counter()

                async def on_reply(msg: Msg) -> None:
                    if b'"type":"done"' in msg.data or b'"type":"error"' in msg.data:
                        finals[msg.subject] += 1

                await evil.subscribe("llm.reply.>", cb=on_reply, pending_msgs_limit=-1)
                acks: dict[int, bool] = {}

                async def on_ack(msg: Msg) -> None:
                    acks[int(msg.subject.rsplit(".", 1)[1])] = b'"error"' not in msg.data

                inbox = evil.new_inbox()
                await evil.subscribe(f"{inbox}.*", cb=on_ack, pending_msgs_limit=-1)
                now = now_ms()
                payloads = [render(case, i, now) for i, case in enumerate(cases)]
                for i, data in enumerate(payloads):
                    await evil.publish("llm.jobs.chat", data, reply=f"{inbox}.{i}")
                    if i % 200 == 0:
                        await evil.flush()
                await evil.flush()
                with anyio.fail_after(30):
                    while len(acks) < len(payloads):
                        await anyio.sleep(0.05)
                accepted = [i for i, ok in acks.items() if ok]
                expected = collections.Counter(
                    r for i in accepted if (r := readable_reply(payloads[i])) is not None
                )
                js = nc.jetstream()
                with anyio.fail_after(90):
                    while (await js.stream_info("LLM_JOBS")).state.messages or any(
                        finals[r] < n for r, n in expected.items()
                    ):
                        assert proc.poll() is None, proc.log_path.read_text()[-3000:]
                        await anyio.sleep(0.2)
                dlq = (await js.stream_info("LLM_DLQ")).state.messages
            alive = proc.poll() is None
            log = proc.log_path.read_text(errors="replace")
    unreadable = len(accepted) - sum(expected.values())
    figures = {
        "generated": len(cases),
        "generated_s": round(generated_s, 1),
        "accepted": len(accepted),
        "refused_by_server": len(payloads) - len(accepted),
        "readable": sum(expected.values()),
        "answered": sum(min(finals[r], n) for r, n in expected.items()),
        "served": mock.stats()["requests"],
        "dead_lettered": dlq,
        "unreadable": unreadable,
        "total_s": round(time.monotonic() - started, 1),
    }
    print("fuzz figures:", figures)
    assert len(cases) == FUZZ_JOBS
    assert alive and "Traceback" not in log, log[-3000:]
    assert figures["answered"] == figures["readable"]
    assert dlq >= unreadable  # every job that could not be answered was parked


def test_the_gateway_refuses_a_deep_body_and_drops_a_bad_traceparent() -> None:
    from gateway import InvalidRequest, parse_request
    from gateway._request import job_options

    body = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]'
    deep = body + b', "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        parse_request(deep)
    req = parse_request(body + b"}")
    assert job_options(req, "00-\u00e9\u00e9-01").traceparent is None  # W3C: ignore, do not fail
    assert job_options(req, TRACE).traceparent == TRACE
