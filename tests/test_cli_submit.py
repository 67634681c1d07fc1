"""`llmrelay submit` as a user runs it: real nats-server, real workers, real HTTP.

The CLI runs both as a real process (what a terminal sees: streaming, exit
codes, one-line errors) and through typer's runner in a thread (fast, while the
workers run in this test's event loop). The helpers here are shared by the
other CLI test modules.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import typer
import yaml
from nats.aio.client import Client as NATS
from typer.testing import CliRunner

from broker import RelayClient, ensure_topology
from broker._protocol import decode_dead_letter
from broker._server import free_port
from cli import _commands
from devstack import MockProvider, expected_answer
from tests._harness import StartStack, mock_pool, relay_config, upstream

LLMRELAY = Path(sys.executable).parent / "llmrelay"
CLI_TIMEOUT_S = 30.0
CHAT = {"chat": [("a", "gpt")]}

APP = typer.Typer()
_commands.register(APP)


class Result(msgspec.Struct):
    code: int
    stdout: str
    stderr: str


def write_config(path: Path, pools: dict[str, Any], routes: dict[str, Any], **streams: Any) -> Path:
    """A config file as an operator writes it (routes: name -> [(pool, model), ...])."""
    doc = {
        "streams": streams,
        "pools": pools,
        "routes": {
            name: {"targets": [{"pool": p, "model": m} for p, m in targets], "deadline_s": 20}
            for name, targets in routes.items()
        },
    }
    file = path / "llmrelay.yaml"
    file.write_text(yaml.safe_dump(doc))
    return file


async def llmrelay(*args: str, stdin: str | None = None) -> Result:
    """Run the real `llmrelay` command; no environment settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMRELAY_")}
    proc = await asyncio.create_subprocess_exec(
        str(LLMRELAY),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def invoke(*args: str, stdin: str | None = None) -> Result:
    """Run a command through typer's runner, in a thread (the workers keep running here)."""
    runner = CliRunner(env={"LLMRELAY_CONFIG": None, "LLMRELAY_NATS_URL": None})

    def call() -> Any:
        return runner.invoke(APP, list(args), input=stdin)

    result = await anyio.to_thread.run_sync(call)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a failed command prints (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def request_id(stderr: str) -> str:
    first = stderr.splitlines()[0]
    assert first.startswith("request "), stderr
    return first.split()[1]


# --- tests -------------------------------------------------------------------------


async def test_submit_streams_the_exact_answer_as_it_arrives(
    relay_stack: StartStack, client_url: str, tmp_path: Path
) -> None:
    mock = MockProvider(name="mock-a", tokens=8, token_delay_ms=60)
    async with relay_stack({"a": upstream(mock)}, CHAT, relay=None) as s:
        cfg_file = write_config(tmp_path, s.pools, CHAT)
        proc = await asyncio.create_subprocess_exec(
            str(LLMRELAY),
            *("submit", "Hello", "--route", "chat", "--config", str(cfg_file)),
            *("--nats-url", client_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(CLI_TIMEOUT_S):
            first = await proc.stdout.read(len("Hello from mock-a."))
            # The first token is on the terminal while the provider still streams.
            running_when_first_token_arrived = proc.returncode is None
            rest, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
            code = await proc.wait()
    assert first == b"Hello from mock-a."
    assert running_when_first_token_arrived
    assert (first + rest).decode() == expected_answer("mock-a", 8) + "\n"
    assert code == 0
    lines = err.decode().splitlines()
    assert lines[0].startswith("request ") and lines[0].endswith(" on route chat")
    assert lines[-1].startswith("done: a/gpt (stop), ")
    assert "8 completion tokens" in lines[-1]
    assert lines[-1].endswith(f"; request {request_id(err.decode())}")


async def test_failover_is_shown_on_stderr_and_stdout_keeps_one_clean_answer(
    relay_stack: StartStack, client_url: str, tmp_path: Path
) -> None:
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=4), max_retries=0),
        "b": upstream(MockProvider(name="mock-b", tokens=4)),
    }
    routes = {"chat": [("a", "gpt+status=503"), ("b", "gpt")]}
    async with relay_stack(pools, routes, relay=None) as s:
        cfg_file = write_config(tmp_path, s.pools, routes)
        result = await invoke(
            "submit", "Hello", "--route", "chat", "-c", str(cfg_file), "--nats-url", client_url
        )
    assert result.code == 0, result.stderr
    assert result.stdout == expected_answer("mock-b", 4) + "\n"
    assert "failover a -> b (attempt 1): upstream_unavailable" in result.stderr
    assert "done: b/gpt (stop)" in result.stderr
    assert "after 1 failed attempt(s)" in result.stderr


async def test_all_providers_failed_exits_1_with_one_error_line(
    nc: NATS, relay_stack: StartStack, client_url: str, tmp_path: Path
) -> None:
    pools = {"a": upstream(MockProvider(name="mock-a", tokens=4), max_retries=0)}
    routes = {"chat": [("a", "gpt+status=503")]}
    async with relay_stack(pools, routes, relay=None) as s:
        cfg_file = write_config(tmp_path, s.pools, routes)
        result = await llmrelay(
            "submit", "Hello", "--route", "chat", "-c", str(cfg_file), "--nats-url", client_url
        )
    assert result.code == 1
    assert result.stdout == ""
    line = one_error_line(result.stderr)
    assert line.startswith("error: all_providers_failed: every target of route chat failed")
    assert line.endswith(f"(request {request_id(result.stderr)})")
    # ...and the job waits in the dead-letter queue.
    dlq = await nc.jetstream().get_msg("LLM_DLQ", subject="llm.dlq.chat")
    assert decode_dead_letter(dlq.data or b"").job.id == request_id(result.stderr)  # type: ignore[union-attr]


async def test_full_queue_exits_3(nc: NATS, client_url: str, tmp_path: Path) -> None:
    pools = {"a": mock_pool("http://127.0.0.1:9")}
    cfg_file = write_config(tmp_path, pools, {"chat": [("a", "gpt")]}, queue_capacity=2)
    cfg = relay_config(pools, {"chat": [("a", "gpt")]}, streams={"queue_capacity": 2})
    await ensure_topology(nc, cfg)
    async with RelayClient(client_url, config=cfg) as relay:  # no worker: the queue fills
        for i in range(2):
            await relay.submit(f"q{i}", route="chat")
    result = await llmrelay(
        "submit", "one too many", "-r", "chat", "-c", str(cfg_file), "--nats-url", client_url
    )
    assert result.code == 3
    assert one_error_line(result.stderr) == (
        "error: queue_full: route chat queue is full (2 jobs waiting); retry later"
    )


async def test_unknown_route_exits_4_and_sends_nothing(
    nc: NATS, client_url: str, tmp_path: Path
) -> None:
    pools = {"a": mock_pool("http://127.0.0.1:9")}
    cfg_file = write_config(tmp_path, pools, {"chat": [("a", "gpt")]})
    await ensure_topology(nc, relay_config(pools, {"chat": [("a", "gpt")]}))
    with_config = await invoke(
        "submit", "hi", "-r", "nope", "-c", str(cfg_file), "--nats-url", client_url
    )
    # Without a config the broker itself is asked.
    without = await invoke("submit", "hi", "-r", "nope", "--nats-url", client_url)
    assert with_config.code == without.code == 4
    assert one_error_line(with_config.stderr) == (
        "error: unknown_route: no route named 'nope' (routes: chat)"
    )
    assert one_error_line(without.stderr) == (
        "error: unknown_route: no route 'nope' is configured on this broker"
    )
    assert (await nc.jetstream().stream_info("LLM_JOBS")).state.messages == 0


async def test_no_answer_before_the_timeout_exits_5(
    nc: NATS, client_url: str, tmp_path: Path
) -> None:
    pools = {"a": mock_pool("http://127.0.0.1:9")}
    cfg_file = write_config(tmp_path, pools, {"chat": [("a", "gpt")]})
    await ensure_topology(nc, relay_config(pools, {"chat": [("a", "gpt")]}))
    started = time.monotonic()
    result = await invoke(
        "submit", "hi", "-r", "chat", "--timeout", "0.5", "-c", str(cfg_file),
        "--nats-url", client_url,
    )  # fmt: skip
    assert result.code == 5
    assert 0.5 <= time.monotonic() - started < 5
    assert one_error_line(result.stderr).startswith("error: deadline_exceeded: request ")


async def test_json_prints_every_event_and_the_prompt_comes_from_stdin(
    relay_stack: StartStack, client_url: str, tmp_path: Path
) -> None:
    mock = MockProvider(name="mock-a", tokens=3)
    async with relay_stack({"a": upstream(mock)}, CHAT, relay=None) as s:
        cfg_file = write_config(tmp_path, s.pools, CHAT)
        result = await invoke(
            "submit", "-", "-r", "chat", "--json", "--max-tokens", "2", "-c", str(cfg_file),
            "--nats-url", client_url, stdin="a prompt from a pipe\n",
        )  # fmt: skip
    prompt_seen = mock.stats()["log"][0]
    assert result.code == 0, result.stderr
    events = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert events[0]["type"] == "submitted" and events[0]["route"] == "chat"
    # The provider sends its tokens at once: one chunk (it came inside done, Done.final).
    assert [e["type"] for e in events[1:]] == ["chunk", "done"]
    assert events[1]["delta"] == expected_answer("mock-a", 2) and "final" not in events[2]
    assert events[-1]["finish_reason"] == "length"  # --max-tokens reached the provider
    assert events[-1]["usage"]["completion_tokens"] == 2
    assert prompt_seen["model"] == "gpt"


async def test_no_server_and_bad_config_are_one_line_each(tmp_path: Path) -> None:
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  a: {kind: openai, base_url: 'http://x', concurrency: 0}\n")
    no_server, bad_config, missing = await asyncio.gather(
        llmrelay("submit", "hi", "-r", "chat", "--nats-url", f"nats://127.0.0.1:{port}"),
        llmrelay("submit", "hi", "-r", "chat", "--config", str(bad)),
        llmrelay("submit", "hi", "-r", "chat", "--config", str(tmp_path / "no.yaml")),
    )
    assert no_server.code == bad_config.code == missing.code == 2
    assert one_error_line(no_server.stderr) == (
        f"error: connect_failed: no NATS server answered at nats://127.0.0.1:{port} "
        f"([Errno 111] Connect call failed ('127.0.0.1', {port}))"
    )
    assert one_error_line(bad_config.stderr) == (
        f"error: config_error: {bad}: pools.a.concurrency: Expected `int` >= 1"
    )
    assert one_error_line(missing.stderr).startswith("error: config_error: ")
    assert "no such config file" in missing.stderr


async def test_ctrl_c_cancels_the_request_and_exits_130(
    nc: NATS, relay_stack: StartStack, client_url: str
) -> None:
    mock = MockProvider(name="mock-a", tokens=50, token_delay_ms=50)
    async with relay_stack({"a": upstream(mock)}, CHAT, relay=None):
        events = await nc.subscribe("llm.events.failed")
        proc = await asyncio.create_subprocess_exec(
            str(LLMRELAY), "submit", "a long answer", "-r", "chat", "--nats-url", client_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        async with asyncio.timeout(CLI_TIMEOUT_S):
            first = await proc.stdout.read(len("Hello from mock-a."))
            proc.send_signal(signal.SIGINT)
            out, err = await proc.communicate()
            failed = msgspec.json.decode((await events.next_msg(timeout=10)).data)
    assert first == b"Hello from mock-a."
    assert proc.returncode == 130
    assert out.endswith(b"\n")  # the half-printed line is ended
    rid = request_id(err.decode())
    assert err.decode().splitlines()[-1] == f"cancelled: request {rid}"
    # The worker heard it and stopped the upstream call.
    assert (failed["request_id"], failed["detail"]) == (rid, "cancelled")


async def test_a_mid_answer_failover_is_marked_and_no_stream_prints_only_the_clean_answer(
    relay_stack: StartStack, client_url: str, tmp_path: Path
) -> None:
    pools = {
        "a": upstream(MockProvider(name="mock-a", tokens=6)),
        "b": upstream(MockProvider(name="mock-b", tokens=4)),
    }
    routes = {"chat": [("a", "gpt+cut=3"), ("b", "gpt")]}  # a breaks after 3 tokens
    async with relay_stack(pools, routes, relay=None) as s:
        cfg_file = write_config(tmp_path, s.pools, routes)
        ask = ("submit", "Hello", "-r", "chat", "-c", str(cfg_file), "--nats-url", client_url)
        streamed = await invoke(*ask)
        clean = await invoke(*ask, "--no-stream")
    # b continues a's first three tokens (an assistant prefill) up to its own four.
    answer = expected_answer("mock-a", 4)
    assert streamed.code == clean.code == 0
    assert streamed.stdout == f"{answer}\n"  # one line: the answer went on, never restarted
    notes = streamed.stderr.splitlines()
    assert notes[1].startswith("failover a -> b (attempt 1): stream_interrupted")
    assert notes[2].startswith("resumed (attempt 1025): continuing after 29 characters")
    assert notes[3].startswith("done: b/gpt")
    assert clean.stdout == answer + "\n"
