"""The operator's commands: `tail`, `status`, `workers`, `dlq`, against the real thing."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from broker import RelayClient, ensure_topology
from broker._protocol import Heartbeat, encode, now_ms
from broker._server import free_port
from devstack import MockProvider, expected_answer
from tests._harness import StartStack, mock_pool, relay_config, running_workers, upstream
from tests.test_cli_submit import (
    CLI_TIMEOUT_S,
    LLMRELAY,
    invoke,
    llmrelay,
    one_error_line,
    write_config,
)

ROUTES = {"chat": [("a", "gpt")]}


async def status_json(*args: str) -> dict[str, Any]:
    result = await invoke("status", "--json", *args)
    assert result.code == 0, result.stderr
    snapshot: dict[str, Any] = msgspec.json.decode(result.stdout)
    return snapshot


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(i for i in items if i["name"] == name)


async def test_tail_after_completion_replays_the_whole_answer(
    relay_stack: StartStack, client_url: str
) -> None:
    mock = MockProvider(name="mock-a", tokens=6)
    async with relay_stack({"a": upstream(mock)}, ROUTES, relay="broker") as s:
        handle = await s.relay.submit("hi", route="chat")
        answer = await handle.text()
    # The request is over and its worker gone: tail replays it from LLM_REPLIES.
    result = await llmrelay("tail", handle.id, "--nats-url", client_url)
    assert answer == expected_answer("mock-a", 6)
    assert result.code == 0, result.stderr
    assert result.stdout == answer + "\n"
    # The provider sent the 6 tokens and the finish at once: one message, the done
    # carrying the text (Done.final).
    assert result.stderr.splitlines()[0] == f"request {handle.id}: replaying 1 stored message(s)"
    assert result.stderr.splitlines()[-1].startswith("done: a/gpt (stop), ")


async def test_tail_started_before_the_request_runs_follows_it_to_the_end(
    nc: NATS, relay_stack: StartStack, worker_url: str, client_url: str
) -> None:
    mock = MockProvider(name="mock-a", tokens=5)
    async with relay_stack({"a": upstream(mock)}, ROUTES, workers=[], relay="broker") as s:
        await ensure_topology(nc, s.config)
        handle = await s.relay.submit("hi", route="chat")  # queued: no worker yet
        tail = await asyncio.create_subprocess_exec(
            str(LLMRELAY), "tail", handle.id, "--nats-url", client_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert tail.stderr is not None and tail.stdout is not None
        async with asyncio.timeout(CLI_TIMEOUT_S):
            waiting = await tail.stderr.readline()  # tail is subscribed and waiting
            async with running_workers(s.config, ["a"], worker_url):
                out, err = await tail.communicate()
                answer = await handle.text()
    assert b"no events yet; waiting" in waiting
    assert tail.returncode == 0, err
    assert out.decode() == answer + "\n" == expected_answer("mock-a", 5) + "\n"


async def test_tail_of_a_failed_request_exits_1(relay_stack: StartStack, client_url: str) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a", tokens=5), max_retries=0)}
    async with relay_stack(pools, {"chat": [("a", "gpt+status=400")]}, relay="broker") as s:
        handle = await s.relay.submit("hi", route="chat")
        events = [e async for e in handle.events()]
    result = await invoke("tail", handle.id, "--nats-url", client_url)
    assert events[-1].code == "bad_request"  # type: ignore[union-attr]
    assert result.code == 1
    assert one_error_line(result.stderr).startswith("error: bad_request: ")


async def wait_for_status(check: Any, *args: str) -> dict[str, Any]:
    """Poll `status --json` until ``check(snapshot)``: heartbeats have no event to await."""
    with anyio.fail_after(10):
        while not check(snapshot := await status_json(*args)):
            await anyio.sleep(0.05)
    return snapshot


async def test_status_reports_the_backlog_then_live_workers(
    nc: NATS, relay_stack: StartStack, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a", tokens=2), concurrency=3)}
    streams = {"heartbeat_ttl_s": 1.5}  # a beat per 0.5 s
    async with relay_stack(pools, ROUTES, streams=streams, workers=[], relay="broker") as stack:
        cfg_file = write_config(tmp_path, stack.pools, ROUTES)
        await ensure_topology(nc, stack.config)
        handles = [await stack.relay.submit(f"q{i}", route="chat") for i in range(4)]
        # No worker runs: the four jobs wait. The operator's user sees their age.
        backlog = await status_json("-c", str(cfg_file), "--nats-url", worker_url)
        as_client = await status_json("--nats-url", client_url)
        table = await invoke("status", "-c", str(cfg_file), "--nats-url", worker_url)
        async with running_workers(stack.config, ["a"], worker_url):
            for h in handles:
                await h.text()
            tokens = sum(_tokens(h.done) for h in handles)  # as the provider reported
            used = (4, tokens)  # requests, tokens: the pool's rate budget used
            live = await wait_for_status(  # a heartbeat written after the four jobs
                lambda s: _rate_used(by_name(s["pools"], "a")) == used,
                "--nats-url",
                client_url,
            )
    chat = by_name(backlog["routes"], "chat")
    assert (chat["queue_depth"], chat["in_flight"], chat["dlq_depth"]) == (4, 0, 0)
    assert 0 < chat["oldest_job_age_s"] < 10
    assert chat["targets"] == ["a/gpt"]
    assert by_name(backlog["pools"], "a")["live_workers"] == 0
    # The client user may not read jobs: the age is unknown, not wrong.
    assert as_client["oldest_age_known"] is False
    assert by_name(as_client["routes"], "chat")["queue_depth"] == 4
    assert by_name(as_client["routes"], "chat")["oldest_job_age_s"] is None
    assert table.code == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("chat "))
    assert row.split()[:2] == ["chat", "4"]
    pool = by_name(live["pools"], "a")
    assert (pool["live_workers"], pool["slots_total"], pool["circuit"]) == (1, 3, {"closed": 1})
    assert tokens >= 4 * 3
    assert by_name(live["routes"], "chat")["queue_depth"] == 0


def _rate_used(pool: dict[str, Any]) -> tuple[int, int]:
    return pool["rpm_used"], pool["tpm_used"]


def _tokens(done: Any) -> int:
    return int(done.usage.prompt_tokens + done.usage.completion_tokens)


async def test_workers_lists_live_workers(relay_stack: StartStack, client_url: str) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a", tokens=2), concurrency=2)}
    async with relay_stack(pools, ROUTES, relay=None, metrics_port=free_port()) as stack:
        await wait_for_status(lambda s: len(s["workers"]) == 1, "--nats-url", client_url)
        listed = await invoke("workers", "--nats-url", client_url)
        as_json = await invoke("workers", "--json", "--nats-url", client_url)
    row = next(line for line in listed.stdout.splitlines() if stack.workers[0].worker_id in line)
    assert row.split()[:4] == ["a", stack.workers[0].worker_id, "0/2", "closed"]
    assert row.split()[-1] == f":{stack.workers[0].metrics_port}"
    [worker] = msgspec.json.decode(as_json.stdout)
    assert (worker["pool"], worker["slots"], worker["busy"]) == ("a", 2, 0)


async def test_status_and_workers_show_each_models_circuit(
    nc: NATS, client_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers of pool a: one sees model gpt open; the other its pool-level circuit
    open, gpt open and gpt-mini half-open (the heartbeats as workers write them)."""
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap the table at 80
    await ensure_topology(nc, relay_config({"a": mock_pool("http://127.0.0.1:9")}, ROUTES))
    kv = await nc.jetstream().key_value("llm_workers")
    beats = [
        Heartbeat(pool="a", worker_id="w1", slots=2, busy=0, circuits={"gpt": "open"}),
        Heartbeat(
            pool="a",
            worker_id="w2",
            slots=2,
            busy=1,
            circuit="open",
            circuits={"gpt": "open", "gpt-mini": "half_open"},
        ),
    ]
    for hb in beats:
        hb.at_ms = now_ms()
        await kv.put(f"a.{hb.worker_id}", encode(hb))
    snapshot = await status_json("--nats-url", client_url)
    table = await invoke("status", "--nats-url", client_url)
    listed = await invoke("workers", "--nats-url", client_url)
    pool = by_name(snapshot["pools"], "a")
    assert pool["circuit"] == {"closed": 1, "open": 1}
    assert pool["model_circuits"] == {"gpt": {"open": 2}, "gpt-mini": {"half_open": 1}}
    workers = {w["worker_id"]: w for w in snapshot["workers"]}
    assert (workers["w1"]["circuit"], workers["w1"]["circuits"]) == ("closed", {"gpt": "open"})
    row = next(line for line in table.stdout.splitlines() if line.startswith("a "))
    assert "closed 1, open 1; gpt open 2/2, gpt-mini half_open 1/2" in row
    rows = {line.split()[1]: line for line in listed.stdout.splitlines() if line.startswith("a ")}
    assert "open (gpt)" in rows["w1"] and "closed" not in rows["w1"]
    assert "open (pool), open (gpt), half_open (gpt-mini)" in rows["w2"]


async def test_dlq_list_show_and_replay(
    nc: NATS, relay_stack: StartStack, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    mock = MockProvider(name="mock-a", tokens=3, fault="status=503")
    async with relay_stack({"a": upstream(mock, max_retries=0)}, ROUTES, relay="broker") as s:
        cfg_file = write_config(tmp_path, s.pools, ROUTES)
        ops = ("-c", str(cfg_file), "--nats-url", worker_url)
        dead = [await s.relay.submit(f"q{i}", route="chat") for i in range(3)]
        for h in dead:
            assert (await _last_event(h)).code == "all_providers_failed"
        ids = [h.id for h in dead]
        listed = await invoke("dlq", "list", *ops)
        shown = await invoke("dlq", "show", ids[0], *ops)
        mock.set_fault(None)  # the provider is back: replay one, then the rest
        answers = [await nc.subscribe(f"llm.reply.{i}") for i in ids]
        one = await invoke("dlq", "replay", "#1", *ops)
        rest = await invoke("dlq", "replay", "--all", *ops)
        for sub in answers:  # the replayed runs end before `tail` looks at them
            while b'"type":"done"' not in (await sub.next_msg(timeout=10)).data:
                pass
        tail = await invoke("tail", ids[2], "--nats-url", client_url)
    empty = await invoke("dlq", "list", *ops)
    firsts = listed.stdout.splitlines()[0:6:2]
    assert [line.split()[0] for line in firsts] == ["#1", "#2", "#3"]
    assert [line.split()[-2:] for line in firsts] == [["all_providers_failed", i] for i in ids]
    assert listed.stdout.splitlines()[-1] == "3 dead letter(s)"
    assert shown.stdout.splitlines()[1] == "  code:     all_providers_failed"
    assert "  attempt 1: a/gpt upstream_unavailable HTTP 503: " in shown.stdout
    assert "  user:     q0" in shown.stdout
    assert one.stdout == f"#1: request {ids[0]} -> llm.jobs.chat\n"
    assert rest.stdout.splitlines()[-1] == "replayed 2 of 2 dead letter(s)"
    assert tail.code == 0 and tail.stdout == expected_answer("mock-a", 3) + "\n"
    assert "an earlier run ended (error all_providers_failed)" in tail.stderr
    assert empty.stdout == "no dead letters\n"


async def _last_event(handle: Any) -> Any:
    return [e async for e in handle.events()][-1]


async def test_dlq_purge_asks_first(nc: NATS, worker_url: str, tmp_path: Path) -> None:
    cfg_file = write_config(tmp_path, {"a": mock_pool("http://127.0.0.1:9")}, ROUTES)
    await ensure_topology(nc, relay_config({"a": mock_pool("http://127.0.0.1:9")}, ROUTES))
    js = nc.jetstream()
    for route in ("chat", "chat", "other"):
        await js.publish(
            f"llm.dlq.{route}", b'{"code":"internal","message":"m","at_ms":1,"route":"x"}'
        )
    ops = ("-c", str(cfg_file), "--nats-url", worker_url)
    declined = await invoke("dlq", "purge", *ops, stdin="n\n")
    chat_only = await invoke("dlq", "purge", "--route", "chat", "--yes", *ops)
    left = await invoke("dlq", "list", *ops)
    assert declined.code == 1
    assert chat_only.stdout == "purged 2 dead letter(s)\n"
    assert left.stdout.splitlines()[-1] == "1 dead letter(s)"


async def test_tail_without_id_follows_lifecycle_events_of_one_route(
    relay_stack: StartStack, client_url: str
) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a", tokens=2))}
    routes = {"chat": [("a", "gpt")], "other": [("a", "gpt")]}
    async with relay_stack(pools, routes, relay="broker") as s:
        tail = await asyncio.create_subprocess_exec(
            str(LLMRELAY), "tail", "--route", "chat", "--nats-url", client_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert tail.stdout is not None and tail.stderr is not None
        async with asyncio.timeout(CLI_TIMEOUT_S):
            assert b"following lifecycle events" in await tail.stderr.readline()
            other = await s.relay.submit("x", route="other")
            await other.text()
            chat = await s.relay.submit("y", route="chat")
            await chat.text()
            line = (await tail.stdout.readline()).decode()
        tail.send_signal(signal.SIGINT)
        await tail.wait()
    fields = line.split()
    assert fields[1:5] == ["done", chat.id, "route=chat", "pool=a"]
    assert tail.returncode == 0


async def test_ops_commands_fail_in_one_line(client_url: str) -> None:
    port = free_port()
    no_server, no_streams = await asyncio.gather(
        llmrelay("status", "--nats-url", f"nats://127.0.0.1:{port}"),
        llmrelay("status", "--nats-url", client_url),  # JetStream wiped for each test
    )
    assert no_server.code == no_streams.code == 2
    assert one_error_line(no_server.stderr).startswith("error: connect_failed: no NATS server")
    assert one_error_line(no_streams.stderr) == (
        "error: jetstream_error: no LLM_JOBS stream on this server: start `llmrelay up "
        "--config FILE` or a worker, which create the streams"
    )


async def test_dlq_as_the_client_user_says_which_user_it_needs(nc: NATS, client_url: str) -> None:
    await ensure_topology(nc, relay_config({"a": mock_pool("http://127.0.0.1:9")}, ROUTES))
    dlq_as_client = await llmrelay("dlq", "list", "--nats-url", client_url)
    assert dlq_as_client.code == 2
    assert one_error_line(dlq_as_client.stderr).startswith("error: dlq_unavailable: ")
    assert "the client user may not read it" in dlq_as_client.stderr


async def test_worker_json_logs_carry_request_fields_and_no_secrets(
    nc: NATS, worker_url: str, client_url: str, tmp_path: Path
) -> None:
    async with MockProvider(name="mock-a", tokens=2) as mock:
        pools = {"a": mock_pool(mock.url, api_key="sk-very-secret")}
        routes = {"chat": [("a", "gpt+status=400")]}
        cfg_file = write_config(tmp_path, pools, routes)
        await ensure_topology(nc, relay_config(pools, routes))
        worker = await asyncio.create_subprocess_exec(
            str(LLMRELAY), "worker", "--pool", "a", "-c", str(cfg_file), "--nats-url", worker_url,
            "--json-logs", stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert worker.stderr is not None
        lines: list[dict[str, Any]] = []
        async with asyncio.timeout(CLI_TIMEOUT_S), RelayClient(client_url) as relay:
            lines.append(msgspec.json.decode(await worker.stderr.readline()))  # serving...
            handle = await relay.submit("hi", route="chat")
            await _last_event(handle)
            while "request_id" not in lines[-1]:
                lines.append(msgspec.json.decode(await worker.stderr.readline()))
            worker.send_signal(signal.SIGTERM)
            rest = (await worker.stderr.read()).decode()
            await worker.wait()
    failed = lines[-1]
    assert failed["level"] == "info" and failed["logger"] == "llmrelay.worker"
    assert (failed["request_id"], failed["route"], failed["pool"], failed["attempt"]) == (
        handle.id,
        "chat",
        "a",
        1,
    )
    assert "bad_request" in failed["msg"]
    everything = "".join(map(str, lines)) + rest
    assert "sk-very-secret" not in everything and "worker-secret" not in everything
    assert worker.returncode == 0
