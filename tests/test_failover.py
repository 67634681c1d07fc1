"""Failover users never notice: one test per failure kind, through real NATS and real HTTP.

Each test asserts what the client saw (the final text, or the exact error
code), how many attempts each fake provider received and when, and that
nothing was lost (answered, or in the dead-letter queue).
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS

from broker import Chunk, Done, Error, Notice, RelayClient, RequestFailed
from broker._jsapi import api_request
from broker._protocol import decode_dead_letter, decode_lifecycle
from devstack import MockProvider, expected_answer
from tests._harness import StartStack, folded, upstream

TOKENS = 6
PRIMARY_DEFAULTS: dict[str, Any] = {"max_retries": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.2}


class Pair:
    """A route `chat`: pool `a` (primary, OpenAI) then pool `b` (backup, Anthropic)."""

    def __init__(
        self, a: MockProvider, b: MockProvider, relay: RelayClient, workers: list[Any]
    ) -> None:
        self.a, self.b, self.relay, self.workers = a, b, relay, workers

    async def ask(self, prompt: str = "hi", **options: Any) -> tuple[list[Any], str]:
        handle = await self.relay.submit(prompt, route="chat", **options)
        events = [e async for e in handle.events()]
        return events, _final_text(events)


def _final_text(events: list[Any]) -> str:
    """What a client shows: the answer's text, "" if it did not finish."""
    answer = folded(events)
    return answer.text if answer.done is not None else ""


@asynccontextmanager
async def _start_pair(
    relay_stack: StartStack,
    *,
    a_model: str = "gpt",
    a: dict[str, Any] | None = None,
    b: dict[str, Any] | None = None,
    route: dict[str, Any] | None = None,
    streams: dict[str, Any] | None = None,
    workers: list[str] | None = None,
) -> AsyncIterator[Pair]:
    primary, backup = {**PRIMARY_DEFAULTS, **(a or {})}, {**PRIMARY_DEFAULTS, **(b or {})}
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), **primary),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), "anthropic", **backup),
    }
    targets = {"targets": [{"pool": "a", "model": a_model}, {"pool": "b", "model": "claude"}]}
    routes = {"chat": {**targets, **(route or {})}}
    async with relay_stack(pools, routes, streams=streams, workers=workers or ["a", "b"]) as s:
        yield Pair(s.providers["a"], s.providers["b"], s.relay, s.workers)


StartPair = Callable[..., AbstractAsyncContextManager[Pair]]


@pytest.fixture(name="pair")
def _pair_fixture(relay_stack: StartStack) -> StartPair:
    """``async with pair(a_model=..., a={pool a settings}, ...) as p``: a started `Pair`."""
    return functools.partial(_start_pair, relay_stack)


def _requests(mock: MockProvider) -> list[dict[str, Any]]:
    return list(mock.stats()["log"])


BACKUP_ANSWER = expected_answer("mock-b", TOKENS)


async def test_5xx_is_retried_once_at_once_then_fails_over_to_the_healthy_backup(
    pair: StartPair,
) -> None:
    async with pair(a_model="gpt+status=503") as p:
        events, text = await p.ask()
        a_log, b_log = _requests(p.a), _requests(p.b)
    assert text == BACKUP_ANSWER
    done = events[-1]
    assert isinstance(done, Done) and (done.pool, done.model) == ("b", "claude")
    assert done.usage.completion_tokens == TOKENS  # billed: the backup's answer only
    assert [(x.pool, x.code, x.deliveries) for x in done.attempts] == [
        ("a", "upstream_unavailable", 1)
    ]
    # retry_before_failover: 1: one more try on a, in the same run (no redelivery,
    # no backoff), then the healthy backup; the caller never waits for a to recover.
    assert len(a_log) == 2 and len(b_log) == 1
    notices = [e for e in events if isinstance(e, Notice)]
    assert [n.kind for n in notices] == ["retry", "failover"]
    assert notices[0].delay_ms == 0
    assert (notices[-1].from_pool, notices[-1].to_pool) == ("a", "b")


async def test_5xx_without_a_healthy_backup_is_retried_with_backoff(
    relay_stack: StartStack,
) -> None:
    """No healthy target left: the backoff chain runs on the same pool."""
    solo = {"s": upstream(MockProvider(name="solo", tokens=TOKENS), **PRIMARY_DEFAULTS)}
    async with relay_stack(solo, {"one": [("s", "gpt+status=503+fail_first=2")]}) as stack:
        handle = await stack.relay.submit("hi", route="one")
        text = await handle.text()
        log = _requests(stack.providers["s"])
    assert text == expected_answer("solo", TOKENS)  # the third try succeeded
    assert len(log) == 3
    gaps = [y["t"] - x["t"] for x, y in itertools.pairwise(log)]
    assert all(g >= 0.02 for g in gaps), gaps  # backoff, never a tight loop
    # Each redelivery says so (reset=True): a redelivered job cannot tell a planned
    # retry from a worker that died mid-stream.
    kinds = [n.kind for n in handle.notices]
    assert kinds == ["retry", "redelivered", "retry", "redelivered"]


async def test_retry_after_is_honoured(pair: StartPair) -> None:
    model = "gpt+status=429+retry_after=2+fail_first=1"
    async with pair(a_model=model, a={"max_retries": 1}) as p:
        _, text = await p.ask()
        a_log = _requests(p.a)
    assert text == expected_answer("mock-a", TOKENS)  # the retry on a succeeded
    assert len(a_log) == 2
    assert a_log[1]["t"] - a_log[0]["t"] >= 1.8


async def test_a_long_retry_after_moves_the_job_at_once_and_the_pause_is_capped(
    pair: StartPair,
) -> None:
    """Retry-After 30 s, above retry_after_wait_max_s: the job goes to the healthy
    backup at once; the pool pauses only for its pause_max_s, then serves again."""
    model = "gpt+status=429+retry_after=30+fail_first=1"
    async with pair(a_model=model, a={"pause_max_s": 0.5}) as p:
        events, text = await p.ask()
        kinds = [e.kind for e in events if isinstance(e, Notice)]
        primary = p.workers[0]
        paused_for = primary.budget.pause_remaining_s()
        await _wait_until(lambda: primary.budget.pause_remaining_s() <= 0, timeout_s=5.0)
        _, again = await p.ask()
    assert text == BACKUP_ANSWER and kinds == ["failover"]
    assert 0 < paused_for <= 0.5
    assert again == expected_answer("mock-a", TOKENS)  # the primary serves again


async def test_persistent_429_is_not_hammered(pair: StartPair) -> None:
    model = "gpt+status=429+retry_after=1"
    async with pair(a_model=model, a={"max_retries": 2}) as p:
        results = await _ask_many(p, 4)
        a_times = sorted(r["t"] for r in _requests(p.a))
    assert results == [BACKUP_ANSWER] * 4  # all failed over in the end
    assert len(a_times) <= 4 * 3
    for i, start in enumerate(a_times):  # at most a few per second, in any second
        assert sum(1 for t in a_times[i:] if t - start < 1.0) <= 4, a_times


async def _ask_many(p: Pair, n: int) -> list[str]:
    texts: list[str] = []

    async def one(i: int) -> None:
        texts.append((await p.ask(f"q{i}"))[1])

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return texts


async def test_context_length_goes_once_to_primary_then_to_larger_backup(pair: StartPair) -> None:
    model = "gpt+status=400+error=context_length_exceeded"
    async with pair(
        a_model=model,
        a={"context_window": 8000},
        b={"context_window": 200000},
    ) as p:
        events, text = await p.ask("a very long prompt")
        a_n, b_n = len(_requests(p.a)), len(_requests(p.b))
    assert text == BACKUP_ANSWER and (a_n, b_n) == (1, 1)
    assert events[-1].attempts[0].code == "context_length_exceeded"


async def test_context_length_without_larger_target_is_a_clean_error(pair: StartPair) -> None:
    model = "gpt+status=400+error=context_length_exceeded"
    async with pair(a_model=model) as p:
        events, _ = await p.ask()
        a_n, b_n = len(_requests(p.a)), len(_requests(p.b))
    assert isinstance(events[-1], Error) and events[-1].code == "context_length_exceeded"
    assert (a_n, b_n) == (1, 0)


async def test_content_filter_is_returned_at_once_with_the_reason(pair: StartPair) -> None:
    async with pair(a_model="gpt+status=400+error=content_filter") as p:
        handle = await p.relay.submit("something bad", route="chat")
        with pytest.raises(RequestFailed) as info:
            await handle.text()
        a_n, b_n = len(_requests(p.a)), len(_requests(p.b))
    assert info.value.code == "content_filtered" and info.value.message
    assert (a_n, b_n) == (1, 0)


async def test_reset_before_headers_is_retried_then_fails_over(pair: StartPair) -> None:
    async with pair(a_model="gpt+reset", a={"max_retries": 1}) as p:
        events, text = await p.ask()
        a_n = len(_requests(p.a))
    assert text == BACKUP_ANSWER and a_n == 2
    assert events[-1].attempts[0].code == "connect_error"


@pytest.mark.parametrize("fault", ["cut=3", "stall=3"])
async def test_mid_stream_failure_is_continued_by_the_backup(fault: str, pair: StartPair) -> None:
    timeouts = {"ttft_s": 2.0, "idle_s": 0.5}
    async with pair(a_model=f"gpt+{fault}", a={"timeouts": timeouts}) as p:
        handle = await p.relay.submit("tell me", route="chat")
        text = await handle.text()
        a_n, b_n = len(_requests(p.a)), len(_requests(p.b))
    assert text == expected_answer("mock-a", TOKENS)  # a's text, finished by b
    assert [n.kind for n in handle.notices] == ["failover", "resumed"]
    assert not any(n.reset for n in handle.notices)
    assert (a_n, b_n) == (1, 1)  # mid-stream: no retry on the pool that broke


async def test_the_backups_first_chunk_says_where_it_continues(pair: StartPair) -> None:
    """So a caller that lost the resume notices (with a NATS node) still folds it right."""
    async with pair(a_model="gpt+cut=3") as p:
        handle = await p.relay.submit("tell me", route="chat")
        events = [event async for event in handle.events()]
    (resumed,) = [e for e in events if isinstance(e, Notice) and e.kind == "resumed"]
    first = next(e for e in events if isinstance(e, Chunk) and e.attempt == resumed.attempt)
    assert first.seq == 0 and first.offset == resumed.offset and resumed.offset
    fresh = next(e for e in events if isinstance(e, Chunk))
    assert fresh.attempt != resumed.attempt and fresh.offset is None  # a's own answer


@pytest.mark.parametrize("fault", ["cut=3", "stall=3"])
async def test_mid_stream_failure_with_midstream_restart_resets_and_the_backup_starts_over(
    fault: str, pair: StartPair
) -> None:
    timeouts = {"ttft_s": 2.0, "idle_s": 0.5}
    route = {"midstream": "restart"}
    async with pair(a_model=f"gpt+{fault}", a={"timeouts": timeouts}, route=route) as p:
        handle = await p.relay.submit("tell me", route="chat")
        text = await handle.text()
        a_n, b_n = len(_requests(p.a)), len(_requests(p.b))
    assert text == BACKUP_ANSWER  # the partial text of mock-a was dropped
    assert [n.kind for n in handle.notices] == ["failover"] and handle.notices[0].reset
    assert (a_n, b_n) == (1, 1)


async def test_silent_provider_is_abandoned_after_one_ttft_timeout(pair: StartPair) -> None:
    timeouts = {"ttft_s": 0.5, "idle_s": 5.0}
    async with pair(a_model="gpt+noresponse", a={"timeouts": timeouts}) as p:
        started = time.monotonic()
        events, text = await p.ask()
        elapsed = time.monotonic() - started
        a_n = len(_requests(p.a))
    assert text == BACKUP_ANSWER and a_n == 1
    assert events[-1].attempts[0].code == "upstream_timeout"
    assert elapsed < 5.0  # abandoned at the TTFT limit, not a read timeout


async def test_malformed_event_fails_over_when_a_backup_exists(pair: StartPair) -> None:
    async with pair(a_model="gpt+malformed=3") as p:
        events, text = await p.ask()
    assert text == expected_answer("mock-a", TOKENS)  # continued: nothing lost or repeated
    assert events[-1].attempts[0].code == "bad_upstream_event"


async def test_malformed_event_without_backup_is_skipped_and_flagged(
    relay_stack: StartStack,
) -> None:
    solo = {"s": upstream(MockProvider(name="solo", tokens=TOKENS))}
    async with relay_stack(solo, {"one": [("s", "gpt+malformed=3")]}) as stack:
        handle = await stack.relay.submit("hi", route="one")
        text = await handle.text()
        malformed = stack.workers[0].metrics.malformed.labels("s")._value.get()
    assert text == expected_answer("solo", TOKENS)
    assert handle.done is not None and handle.done.degraded
    assert malformed == 1


async def test_stream_without_done_is_finalised_at_once(pair: StartPair) -> None:
    timeouts = {"ttft_s": 5.0, "idle_s": 5.0}
    async with pair(a_model="gpt+nodone", a={"timeouts": timeouts}) as p:
        started = time.monotonic()
        events, text = await p.ask()
        elapsed = time.monotonic() - started
    assert text == expected_answer("mock-a", TOKENS)
    assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens == TOKENS
    assert elapsed < 2.5  # did not wait for the 5 s idle limit


async def test_auth_failure_fails_over_and_opens_the_circuit(pair: StartPair) -> None:
    async with pair(a_model="gpt+status=401") as p:
        events, text = await p.ask()
        state = p.workers[0].circuits.state()  # a rejected key: the pool-level circuit
        a_n = len(_requests(p.a))
    assert text == BACKUP_ANSWER and a_n == 1
    assert events[-1].attempts[0].code == "auth_failed"
    assert state == "open"


async def test_no_target_left_gives_all_providers_failed_and_dead_letter(
    nc: NATS, pair: StartPair
) -> None:
    async with pair(a_model="gpt+status=503", b={"max_retries": 0}) as p:
        p.b.set_fault("status=500")
        started = time.monotonic()
        events, _ = await p.ask(timeout_s=10)
        elapsed = time.monotonic() - started
    err = events[-1]
    assert isinstance(err, Error) and err.code == "all_providers_failed"
    assert [(x.pool, x.status) for x in err.attempts] == [("a", 503), ("b", 500)]
    assert elapsed < 10
    dead = await nc.jetstream().get_last_msg("LLM_DLQ", "llm.dlq.chat")
    letter = decode_dead_letter(dead.data or b"")
    assert letter.code == "all_providers_failed" and letter.job is not None
    assert [x.pool for x in letter.job.attempts] == ["a", "b"]


async def test_events_are_published_for_retry_failover_circuit_and_dead_letter(
    nc: NATS, pair: StartPair
) -> None:
    seen: list[Any] = []

    async def record(msg: Any) -> None:
        seen.append(decode_lifecycle(msg.data))

    await nc.subscribe("llm.events.>", cb=record)
    circuit = {"consecutive_failures": 1, "cooldown_s": 30}
    primary = {"max_retries": 1, "circuit": circuit}
    async with pair(a_model="gpt+status=503", a=primary, b={"max_retries": 0}) as p:
        p.b.set_fault("status=503")
        await p.ask(timeout_s=10)
        await nc.flush()
    kinds = {e.kind for e in seen}
    assert {"retry", "failover", "circuit", "dead"} <= kinds, kinds
    circuit_events = [e for e in seen if e.kind == "circuit"]
    assert circuit_events[0].pool == "a"
    assert circuit_events[0].detail == "model gpt+status=503: closed -> open"


async def test_open_circuit_forwards_without_calling_upstream(pair: StartPair) -> None:
    circuit = {"consecutive_failures": 1, "cooldown_s": 60}
    async with pair(a_model="gpt+status=401", a={"circuit": circuit}) as p:
        await p.ask("trips the circuit")
        texts = await _ask_many(p, 5)
        a_n = len(_requests(p.a))
    assert texts == [BACKUP_ANSWER] * 5
    assert a_n == 1  # only the request that tripped it


async def test_poison_job_hitting_max_deliveries_is_dead_lettered(
    nc: NATS, pair: StartPair
) -> None:
    """A job whose workers die before acking: after max_deliver it goes to the DLQ."""
    streams = {"max_deliver": 2}
    backup = {"max_retries": 0, "ack_wait_s": 0.5}
    async with pair(a={"max_retries": 0}, b=backup, streams=streams, workers=["a"]) as p:
        # Pool b has no worker: we play a worker of b that dies twice.
        handle = await p.relay.submit("poison", route="chat", pool="b", timeout_s=20)
        for _ in range(2):
            taken = await _raw_pull(nc, "pool_b")
            assert taken is not None  # delivered, never acked
        await _raw_pull(nc, "pool_b", expires_s=2.0)  # a waiting pull makes the advisory fire
        events = [e async for e in handle.events()]
    assert isinstance(events[-1], Error) and events[-1].code == "internal"
    dead = await nc.jetstream().get_last_msg("LLM_DLQ", "llm.dlq.chat")
    assert decode_dead_letter(dead.data or b"").job.id == handle.id  # type: ignore[union-attr]
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


async def _raw_pull(nc: NATS, consumer: str, expires_s: float = 5.0) -> bytes | None:
    """One raw priority-group pull; the job's data, or None if the pull expired."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    body = {"batch": 1, "expires": int(expires_s * 1e9), "group": "workers"}
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.LLM_JOBS.{consumer}", json.dumps(body).encode(), reply=inbox
    )
    try:
        msg = await sub.next_msg(timeout=expires_s + 1)
    except nats.errors.TimeoutError:
        return None
    finally:
        await sub.unsubscribe()
    return None if msg.headers and msg.headers.get("Status") else msg.data


async def test_spill_on_saturation_sends_overflow_to_backup(pair: StartPair) -> None:
    slow = {"concurrency": 3}
    async with pair(a_model="gpt+token_delay_ms=40", a=slow) as p:
        texts = await _ask_many(p, 10)
        a_n, b_n = len(_requests(p.a)), len(_requests(p.b))
    assert len(texts) == 10 and a_n + b_n == 10
    assert a_n >= 2 and b_n >= 1  # the primary's 2 route slots full: the rest spilled


async def test_failover_only_route_keeps_backup_idle_while_primary_is_healthy(
    pair: StartPair,
) -> None:
    slow = {"concurrency": 3}
    route = {"spill": "failover"}
    async with pair(a_model="gpt+token_delay_ms=20", a=slow, route=route) as p:
        await _wait_peers(p.workers)
        texts = await _ask_many(p, 8)
        b_n = len(_requests(p.b))
        p.workers[0].stop()  # the primary goes away: its heartbeat is deleted
        await p.workers[0].wait_stopped()
        await _wait_until(
            lambda: all("a" not in {hb.pool for hb in w.peers.values()} for w in p.workers[1:])
        )
        after = await p.ask("primary is gone")
    assert texts == [expected_answer("mock-a", TOKENS)] * 8 and b_n == 0
    assert after[1] == BACKUP_ANSWER


async def test_backlog_route_spills_only_past_min_pending(pair: StartPair) -> None:
    slow = {"concurrency": 2}
    route = {"spill": "backlog", "min_pending": 20}
    async with pair(a_model="gpt+token_delay_ms=10", a=slow, route=route) as p:
        await _wait_peers(p.workers)
        texts = await _ask_many(p, 6)
        b_n = len(_requests(p.b))
    assert len(texts) == 6 and b_n == 0  # 6 waiting < min_pending: all on the primary


async def _wait_peers(workers: list[Any]) -> None:
    await _wait_until(lambda: all(len({hb.pool for hb in w.peers.values()}) >= 2 for w in workers))


async def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.02)


@pytest.mark.slow
async def test_flapping_primary_is_bypassed_then_trusted_again(pair: StartPair) -> None:
    """503 for a while, then healthy, with a request every 0.2 s."""
    circuit = {"consecutive_failures": 3, "cooldown_s": 1.0}
    async with pair(a={"circuit": circuit, "max_retries": 1}) as p:
        served: list[tuple[float, str, str]] = []  # (time, phase, pool)
        phase = "healthy"
        recovered_at = 0.0
        for i in range(40):
            if i == 5:
                p.a.set_fault("status=503")
                phase = "outage"
            if i == 20:
                p.a.set_fault(None)
                phase, recovered_at = "recovered", time.monotonic()
            handle = await p.relay.submit(f"q{i}", route="chat")
            await handle.text()
            assert handle.done is not None
            served.append((time.monotonic(), phase, handle.done.pool))
            await anyio.sleep(0.2)
    assert all(pool == "b" for _, phase_, pool in served if phase_ == "outage")
    back = [t for t, phase_, pool in served if phase_ == "recovered" and pool == "a"]
    assert back, "traffic never returned to the primary"
    assert back[0] - recovered_at < 30
    tail = [pool for _, phase_, pool in served[-5:]]
    assert tail == ["a"] * 5  # and it stays there


async def test_nothing_lost_under_a_mixed_outage(nc: NATS, pair: StartPair) -> None:
    """Primary fails every third request in several ways; every request gets one clean answer."""
    async with pair(a={"timeouts": {"ttft_s": 1.0, "idle_s": 0.5}}) as p:
        faults = ["status=503", "cut=2", "reset", None, "stall=2", "status=429+retry_after=0.1"]
        answers: list[str] = []
        for i, fault in enumerate(faults * 2):
            p.a.set_fault(fault)
            answers.append((await p.ask(f"q{i}"))[1])
        info = await api_request(nc, "$JS.API.STREAM.INFO.LLM_JOBS", {})
    assert all(a in (BACKUP_ANSWER, expected_answer("mock-a", TOKENS)) for a in answers), answers
    assert len(answers) == 12
    assert info["state"]["messages"] == 0  # nothing left behind in the queue
