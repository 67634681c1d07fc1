"""Cost accounting (issue 15, item 2): target prices, ``done.cost_usd``, failed attempts
costed apart, ``llmrelay_cost_usd_total``, spend in ``status``, and ``order: price``.

Exact costs: the prices below are short binary fractions, so every tokens x price
product is exact and the one division by a million is correctly rounded; the
expected value is ``float(Fraction(...))``, the double nearest the true cost, and
it is compared with ``==``, no tolerance.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from broker import ConfigError, Done
from broker._config import parse_config
from broker._cost import Price, attempt_cost, usage_cost
from broker._protocol import Attempt, Job, Message, Timings, Usage, encode
from broker._server import free_port
from broker._status import Status, collect_status
from devstack import MockProvider
from tests._builders import make_config
from tests._harness import StartStack, upstream
from tests.test_metrics import labels
from tests.test_monitor import scrape
from workers._decide import FailureContext, next_target
from workers._ratelimit import prompt_chars

PRICE = {"input_per_mtok": 2.5, "output_per_mtok": 10.0, "cached_input_per_mtok": 1.25}
TOKENS = 5


def exact(prompt: int, cached: int, completion: int, price: dict[str, float]) -> float:
    fr = Fraction
    micro = (
        (prompt - cached) * fr(price["input_per_mtok"])
        + cached * fr(price.get("cached_input_per_mtok", price["input_per_mtok"]))
        + completion * fr(price["output_per_mtok"])
    )
    return float(micro / 1_000_000)


# --- pure -------------------------------------------------------------------------------


def test_known_usage_at_known_prices_gives_the_exact_cost() -> None:
    price = Price(**PRICE)
    usage = Usage(prompt_tokens=1200, completion_tokens=345, cached_tokens=1000)
    assert usage_cost(price, usage) == exact(1200, 1000, 345, PRICE) == 0.0052
    # No cached count from the provider: the whole prompt at the input price.
    plain = Usage(prompt_tokens=1200, completion_tokens=345)
    assert usage_cost(price, plain) == exact(1200, 0, 345, PRICE)
    # No cached price: cached tokens cost what the rest of the prompt does.
    no_cached = Price(input_per_mtok=2.5, output_per_mtok=10.0)
    assert usage_cost(no_cached, usage) == usage_cost(price, plain)
    # Unknown price: no cost at all (never 0), and nothing on the wire.
    assert usage_cost(None, usage) is msgspec.UNSET
    done = Done(attempt=1, finish_reason="stop", usage=plain, pool="a", model="m",
                timings=Timings())  # fmt: skip
    assert b"cost_usd" not in encode(done)


def test_a_failed_attempt_costs_what_it_streamed_plus_its_prompt() -> None:
    price = Price(**PRICE)
    streamed = Attempt(pool="a", model="m", code="stream_cut", message="", completion_tokens=3)
    assert attempt_cost(price, streamed, prompt_tokens=40) == exact(40, 0, 3, PRICE)
    silent = Attempt(pool="a", model="m", code="upstream_unavailable", message="")
    assert attempt_cost(price, silent, prompt_tokens=40) is msgspec.UNSET
    assert attempt_cost(None, streamed, prompt_tokens=40) is msgspec.UNSET
    assert b"cost_usd" not in encode(silent)


# --- config -----------------------------------------------------------------------------

_POOLS = """
pools:
  a: {kind: openai, base_url: "http://127.0.0.1:1/v1"}
  b: {kind: openai, base_url: "http://127.0.0.1:2/v1"}
"""


def _routes(price_a: str, order: str = "") -> str:
    routes = f"""
routes:
  chat:
    {order}
    targets:
      - {{pool: a, model: gpt, price: {price_a}}}
      - {{pool: b, model: claude}}
"""
    return _POOLS + routes


def test_prices_are_validated_and_absent_means_unknown() -> None:
    cfg = parse_config(_routes("{input_per_mtok: 0.15, output_per_mtok: 0.6}"))
    assert cfg.price_for("chat", "a") == Price(input_per_mtok=0.15, output_per_mtok=0.6)
    assert cfg.price_for("chat", "b") is None  # unknown, not free
    assert cfg.price_for("nope", "a") is None
    bad = {
        "{input_per_mtok: -1, output_per_mtok: 1}": "input_per_mtok: Expected `float` >= 0",
        "{input_per_mtok: 1}": "missing required field `output_per_mtok`",
        "{input_per_mtok: 1, output_per_mtok: 1, cached_input_per_mtok: -0.5}": ">= 0",
        "{input_per_mtok: .inf, output_per_mtok: 1}": "finite",
        "{input_per_mtok: 1, output_per_mtok: 1, output: 2}": "unknown field `output`",
    }
    for price, message in bad.items():
        with pytest.raises(ConfigError, match=r"routes\.chat") as info:
            parse_config(_routes(price))
        assert message in str(info.value), (price, str(info.value))


def test_config_check_shows_prices(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    path = tmp_path / "llmrelay.yaml"
    path.write_text(_routes("{input_per_mtok: 0.15, output_per_mtok: 0.6}", "order: price"))
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "a/gpt [$0.15/$0.6 per Mtok] -> b/claude [price unknown]" in result.output
    assert "order=price" in result.output


# --- cost-based routing -----------------------------------------------------------------


def _chat(order: str, prices: list[float | None], ranks: list[int] | None = None) -> Any:
    targets: list[dict[str, Any]] = []
    for i, p in enumerate(prices):
        t: dict[str, Any] = {"pool": "abcd"[i], "model": f"m{i}"}
        if p is not None:
            t["price"] = {"input_per_mtok": p, "output_per_mtok": p}
        if ranks is not None:
            t["rank"] = ranks[i]
        targets.append(t)
    pools = {name: {} for name in "abcd"[: len(prices)]}
    return make_config(pools, {"chat": {"targets": targets, "order": order}})


def test_order_price_ranks_equal_targets_cheapest_first_unknown_last() -> None:
    # a, b, c share rank 0; d is the backup. By price: c (1), a (3), b (unknown).
    cfg = _chat("price", [3.0, None, 1.0, 0.5], ranks=[0, 0, 0, 1])
    ranks = {t.pool: r for r, t in cfg.routes["chat"].ranks()}
    assert ranks == {"c": 0, "a": 1, "b": 2, "d": 3}  # d stays behind its betters
    # A worker pulls a route at the priority of its rank (workers/_scheduler.py):
    pulls = {pool: [rank for _, rank, _ in cfg.routes_of_pool(pool)] for pool in "abcd"}
    assert pulls == {"c": [0], "a": [1], "b": [2], "d": [3]}
    # ... and failover goes to the cheapest untried target:
    job = Job(id="j", route="chat", messages=[], reply_to="r", deadline_ms=0)
    seen = []
    for pool in ("c", "a", "b"):
        ctx = FailureContext(
            job=job, pool_name=pool, deliveries=1, chunks_sent=0, remaining_s=9, pinned=False
        )
        nxt = next_target(ctx, cfg)
        assert nxt is not None
        seen.append((nxt.pool, nxt.rank))
        job = msgspec.structs.replace(
            job, attempts=[*job.attempts, Attempt(pool=pool, model="", code="x", message="")]
        )
    assert seen == [("a", 1), ("b", 2), ("d", 3)]
    # Equal prices still share their rank; the default order is the ranks as given.
    assert [r for r, _ in _chat("price", [2.0, 2.0], ranks=[0, 0]).routes["chat"].ranks()] == [0, 0]
    assert [r for r, _ in _chat("rank", [3.0, 1.0], ranks=[0, 0]).routes["chat"].ranks()] == [0, 0]


# --- the real stack ---------------------------------------------------------------------


async def _spend(nc: NATS, s: Any, route: str) -> Status:
    """The status once the workers' heartbeats carry spend on ``route``."""
    with anyio.fail_after(10):
        while True:
            status = await collect_status(nc, s.config)
            if status.route(route).spend_usd is not None:
                return status
            await anyio.sleep(0.2)


async def test_done_cost_is_exact_and_the_metric_and_status_match(
    relay_stack: StartStack, nc: NATS
) -> None:
    mock = MockProvider(name="mock-a", tokens=TOKENS)
    routes: dict[str, Any] = {
        "chat": [{"pool": "a", "model": "gpt+cached=4", "price": PRICE}],
        "free": [("a", "gpt")],
    }
    port = free_port()
    pools = {"a": upstream(mock, concurrency=3)}
    async with relay_stack(
        pools, routes, relay="broker", pool_options={"a": {"metrics_port": port}},
        streams={"heartbeat_ttl_s": 1.5},
    ) as s:  # fmt: skip
        priced = await s.relay.submit("what does this cost?", route="chat")
        await priced.text()
        unpriced = await s.relay.submit("and this?", route="free")
        await unpriced.text()
        metrics = await scrape(f"http://127.0.0.1:{port}/metrics")
        status = await _spend(nc, s, "chat")
    done = priced.done
    assert done is not None and done.usage.cached_tokens == 4
    assert done.usage.completion_tokens == TOKENS and done.usage.prompt_tokens > 4
    cost = exact(done.usage.prompt_tokens, 4, TOKENS, PRICE)
    assert done.cost_usd == cost
    key = labels(route="chat", pool="a", model="gpt+cached=4")
    assert metrics["llmrelay_cost_usd_total", key] == cost
    assert unpriced.done is not None and unpriced.done.cost_usd is msgspec.UNSET
    assert not any(name == "llmrelay_cost_usd_total" and ("route", "free") in lbls
                   for name, lbls in metrics)  # fmt: skip
    assert status.route("chat").spend_usd == cost
    assert status.route("free").spend_usd is None


async def test_a_failed_attempt_that_streamed_is_costed_apart(relay_stack: StartStack) -> None:
    a, b = MockProvider(name="mock-a", tokens=TOKENS), MockProvider(name="mock-b", tokens=TOKENS)
    price_b = {"input_per_mtok": 0.5, "output_per_mtok": 4.0}
    routes: dict[str, Any] = {
        "chat": [
            {"pool": "a", "model": "gpt+cut=3", "price": PRICE},
            {"pool": "b", "model": "claude", "price": price_b},
        ]
    }
    port_a, port_b = free_port(), free_port()
    pools = {"a": upstream(a, timeouts={"idle_s": 0.5}), "b": upstream(b)}
    ports = {"a": {"metrics_port": port_a}, "b": {"metrics_port": port_b}}
    async with relay_stack(pools, routes, relay="broker", pool_options=ports) as s:
        handle = await s.relay.submit("tell me a story", route="chat")
        await handle.text()
        on_a = await scrape(f"http://127.0.0.1:{port_a}/metrics")
        on_b = await scrape(f"http://127.0.0.1:{port_b}/metrics")
    done = handle.done
    assert done is not None and done.pool == "b"
    [failed] = done.attempts
    assert failed.pool == "a" and 1 <= failed.completion_tokens <= 3
    prompt_estimate = max(1, prompt_chars(_asked("tell me a story")) // 4)
    failed_cost = exact(prompt_estimate, 0, failed.completion_tokens, PRICE)
    assert failed.cost_usd == failed_cost
    # The answer is billed for its own attempt only: b's usage at b's price. Its
    # usage's completion tokens include what a wrote (the continuation carries them).
    own = msgspec.structs.replace(
        done.usage, completion_tokens=done.usage.completion_tokens - failed.completion_tokens
    )
    assert done.cost_usd == exact(own.prompt_tokens, 0, own.completion_tokens, price_b)
    assert on_a["llmrelay_cost_usd_total", labels(route="chat", pool="a", model="gpt+cut=3")] == (
        failed_cost
    )
    key_b = labels(route="chat", pool="b", model="claude")
    assert on_b["llmrelay_cost_usd_total", key_b] == done.cost_usd


def _asked(text: str) -> Job:
    return Job(id="x", route="chat", messages=[Message(role="user", content=text)],
               reply_to="r", deadline_ms=0)  # fmt: skip


async def test_order_price_sends_jobs_to_the_cheapest_equal_target(
    relay_stack: StartStack,
) -> None:
    a, b = MockProvider(name="mock-a", tokens=2), MockProvider(name="mock-b", tokens=2)
    dear = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
    cheap = {"input_per_mtok": 0.5, "output_per_mtok": 1.5}
    targets = [
        {"pool": "a", "model": "gpt", "rank": 0, "price": dear},
        {"pool": "b", "model": "claude", "rank": 0, "price": cheap},
    ]
    routes: dict[str, Any] = {"chat": {"targets": targets, "order": "price"}}
    async with relay_stack({"a": upstream(a), "b": upstream(b)}, routes) as s:
        answered = []
        for i in range(4):  # one at a time: the cheap pool always has a pull waiting
            handle = await s.relay.submit(f"question {i}", route="chat")
            await handle.text()
            assert handle.done is not None
            answered.append(handle.done.pool)
    assert answered == ["b"] * 4
    assert a.stats()["requests"] == 0
