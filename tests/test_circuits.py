"""Circuits per (pool, upstream model): one model's outage is that model's alone.

One pool serves several models, as an operator sets llmrelay up with one pool
per provider account. Real workers, real NATS, fake providers over HTTP; the
faults ride on the upstream model names (``m1+status=503``), so one provider
answers one model badly and the others well.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from broker import RequestFailed
from devstack import MockProvider, expected_answer
from tests._harness import StartStack, upstream

TOKENS = 5
CIRCUIT: dict[str, Any] = {"consecutive_failures": 2, "cooldown_s": 30.0}
# More slots than routes: every route has a pull of pool a waiting, so no job spills
# to the backup for want of a free primary slot (spill: saturation).
FAST: dict[str, Any] = {"max_retries": 1, "backoff_base_s": 0.05, "concurrency": 8}


def _routes(models: dict[str, str]) -> dict[str, Any]:
    """route -> [pool a (model), pool b (mb)]."""
    return {route: [("a", model), ("b", "mb")] for route, model in models.items()}


async def test_one_failing_model_leaves_the_pools_other_models_alone(
    relay_stack: StartStack,
) -> None:
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), circuit=CIRCUIT, **FAST),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), **FAST),
    }
    routes = _routes(
        {
            "broken": "m1+status=503",
            "fine": "m2",
            "also": "m3",
            "filtered": "m4+error=content_filter",
            "toolong": "m5+error=context_length_exceeded",
        }
    )
    async with relay_stack(pools, routes) as s:
        [worker_a, _] = s.workers
        for i in range(4):  # m1 fails: its circuit opens, and its jobs go to b
            handle = await s.relay.submit(f"q{i}", route="broken")
            assert await handle.text() == expected_answer("mock-b", TOKENS)
        # The caller's own faults, however many, never open a circuit.
        for route, code in [
            ("filtered", "content_filtered"),
            ("toolong", "context_length_exceeded"),
        ]:
            for i in range(3):
                with pytest.raises(RequestFailed) as caught:
                    await (await s.relay.submit(f"x{i}", route=route)).text()
                assert caught.value.code == code
        calls_to_m1 = _calls(s.providers["a"], "m1+status=503")
        answers = []
        for route in ["fine", "also"] * 3:
            handle = await s.relay.submit("hello", route=route)
            answers.append(await handle.text())
            assert handle.done is not None and handle.done.pool == "a"
            assert handle.done.attempts == []  # no failover, not even a retry
        await (await s.relay.submit("once more", route="broken")).text()
        circuits = worker_a.circuits
        states = {m: circuits.state(m) for m in ["m1+status=503", "m2", "m3"]}
        assert _calls(s.providers["a"], "m1+status=503") == calls_to_m1  # open: not called
    assert answers == [expected_answer("mock-a", TOKENS)] * 6
    assert states == {"m1+status=503": "open", "m2": "closed", "m3": "closed"}
    assert circuits.state(None) == "closed"  # the pool itself is fine
    assert circuits.snapshot() == {"m1+status=503": "open"}
    assert circuits.state("m4+error=content_filter") == "closed"
    assert circuits.state("m5+error=context_length_exceeded") == "closed"


def _calls(mock: MockProvider, model: str) -> int:
    return sum(1 for entry in mock.stats()["log"] if entry["model"] == model)


@pytest.mark.slow
async def test_a_flapping_primary_is_probed_not_hammered_and_serves_again_soon(
    relay_stack: StartStack,
) -> None:
    """An outage of 3 s with a request every 0.1 s: callers never wait for the primary
    (the backup answers them), a few probes find out when it is back, and soon after
    the recovery the primary serves again."""
    circuit = {"consecutive_failures": 2, "cooldown_s": 1.0}
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=TOKENS), circuit=circuit, **FAST),
        "b": upstream(MockProvider(name="mock-b", tokens=TOKENS), **FAST),
    }
    async with relay_stack(pools, _routes({"chat": "gpt"})) as s:
        primary = s.providers["a"]
        served: list[tuple[float, str, str, list[str]]] = []  # (time, phase, pool, notices)
        phase, outage_calls, recovered_at = "healthy", 0, 0.0
        started = time.monotonic()
        while time.monotonic() - started < 9.0:
            now = time.monotonic() - started
            if phase == "healthy" and now >= 1.0:
                primary.set_fault("status=503")
                primary.reset_stats()
                phase = "outage"
            elif phase == "outage" and now >= 4.0:
                outage_calls = primary.stats()["requests"]
                primary.set_fault(None)
                phase, recovered_at = "recovered", time.monotonic()
            handle = await s.relay.submit("q", route="chat")
            await handle.text()
            assert handle.done is not None
            kinds = [n.kind for n in handle.notices]
            served.append((time.monotonic(), phase, handle.done.pool, kinds))
            await anyio.sleep(0.1)
    outage = [x for x in served if x[1] == "outage"]
    assert outage and all(pool == "b" for _, _, pool, _ in outage[2:])
    # Two failures open the circuit (each job tries the primary twice, at once); then
    # only probes, one per cooldown: about three in a 3 s outage.
    assert outage_calls <= 4 + 4, outage_calls
    back = [t for t, phase_, pool, _ in served if phase_ == "recovered" and pool == "a"]
    assert back and back[0] - recovered_at < 10, "the primary did not serve again"
    assert [pool for _, _, pool, _ in served[-5:]] == ["a"] * 5
    # Nobody waited out a backoff: no job was handed back for a delayed redelivery,
    # at most retried once in place before it moved to the healthy backup.
    assert all("redelivered" not in kinds for _, _, _, kinds in outage)
    assert all(kinds.count("retry") <= 1 for _, _, _, kinds in outage)
