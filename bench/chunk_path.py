"""The worker's CPU per relayed chunk, in one process, without NATS.

    python -m bench.chunk_path                          # this tree, 5 rounds
    python -m bench.chunk_path --trees /tmp/base,$PWD   # two trees, alternating
    python -m bench.chunk_path --trees A,B --rounds 8 --stages provider,socket

A long stream's chunk (one OpenAI SSE event per HTTP chunk, one chunk per read,
as a provider sending tokens 100 ms apart delivers them) goes through the real
code. Stages, each timed on its own:

- ``dechunk``, ``sse``, ``adapter``: the chunked decoder, the SSE parser, the
  OpenAI adapter's ``on_event``, called directly;
- ``provider``: all of it as a run reads it, ``OpenAIProvider.stream`` item by
  item (``answer_items``, ``UpstreamBody``, the lean transport's ``_Body`` on an
  ``asyncio.StreamReader`` given each read just before it is asked for);
- ``socket``: the same on a real loopback connection, one read at a time, so each
  chunk also costs its wake-up (the sending side's ``send`` counts too);
- ``job``: ``JobRun._handle_item`` for each text item, on a stub pool context
  whose ``reply`` only encodes the event.

The NATS publish is not here (``llmrelay bench --preset long-streams`` measures
the whole worker). Each round runs in a fresh subprocess with the tree's modules
first on ``sys.path``; with two trees the rounds alternate, so a shared machine's
drift falls on both. Printed: CPU µs per chunk (process time, the best of 5 runs
in a round) per stage, the median over rounds, every round's figure (so the noise
shows), and each tree's median against the first tree's. Nothing here imports the
product at module level, so the module loads without the worker's packages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_PREFIX = (
    b'data: {"id":"chatcmpl-AbC123xyz","object":"chat.completion.chunk","created":1733150000,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":'
)
_WORDS = (" the", " quick", " brown", " fox", " jumps", " über", " lazy", " dog", ",", " 🙂")
STAGES = ("dechunk", "sse", "adapter", "provider", "socket", "job")
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunked(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def _token(i: int) -> bytes:
    text = json.dumps(_WORDS[i % len(_WORDS)]).encode()
    choice = b'[{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]}\n\n'
    return _PREFIX + choice % text


def stream_reads(tokens: int) -> list[bytes]:
    """The reads of one streamed answer: the role and first token, one token per read,
    then the finish, the usage, ``[DONE]`` and the last chunk together."""
    role = _PREFIX + b'[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    finish = _PREFIX + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    usage = _PREFIX + b'[],"usage":{"prompt_tokens":12,"completion_tokens":%d}}\n\n' % tokens
    reads = [_chunked(role) + _chunked(_token(0))]
    reads += [_chunked(_token(i)) for i in range(1, tokens)]
    reads.append(_chunked(finish) + _chunked(usage) + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return reads


def _cpu_us_per_chunk(run: Any, chunks: int, repeat: int = 5) -> float:
    """The best of ``repeat`` runs (a preempted or throttled run only ever adds time)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best * 1e6 / chunks


def _parse_stages(reads: list[bytes], streams: int) -> dict[str, float]:
    """The transport's decoder, the SSE parser and the adapter, each on its own."""
    from workers._transport import _Dechunker
    from workers.providers._sse import SSEParser
    from workers.providers.openai import _StreamState

    chunks = streams * len(reads)
    datas = [_Dechunker().feed(read) for read in reads]
    events = [SSEParser().feed(data) for data in datas]

    def dechunk() -> None:
        for _ in range(streams):
            feed = _Dechunker().feed
            for read in reads:
                feed(read)

    def sse() -> None:
        for _ in range(streams):
            feed = SSEParser().feed
            for data in datas:
                feed(data)

    def adapter() -> None:
        for _ in range(streams):
            on_event = _StreamState().on_event
            for read_events in events:
                for event in read_events:
                    on_event(event)

    return {name: _cpu_us_per_chunk(f, chunks) for name, f in
            (("dechunk", dechunk), ("sse", sse), ("adapter", adapter))}  # fmt: skip


class _FeedingReader:
    """A StreamReader given the next read just before each ``read`` (so it never waits)."""

    def __init__(self, reads: list[bytes]) -> None:
        self._real = asyncio.StreamReader()
        self._reads = iter(reads)

    async def read(self, n: int) -> bytes:
        self._real.feed_data(next(self._reads, b""))
        return await self._real.read(n)

    def at_eof(self) -> bool:
        return False


def _stub_client(reads: list[bytes]) -> Any:
    """A ``LeanClient`` whose every post answers ``reads`` as a chunked 200."""
    from workers import _transport as t

    pool = SimpleNamespace(_release=lambda origin, conn, reuse: None)

    class Client(t.LeanClient):
        async def post_stream(self, url: str, headers: Any, body: bytes) -> t.LeanResponse:
            conn = t._Connection(_FeedingReader(reads), None)  # type: ignore[arg-type]
            framing = t._Framing(None, True, True)
            body_ = t._Body(pool, (b"http", b"x", 80), conn, framing)  # type: ignore[arg-type]
            return t.LeanResponse(200, [(b"content-type", b"text/event-stream")], body_)

    lean = t.LeanTransport(max_connections=1, ssl_context=None)  # type: ignore[arg-type]
    return Client(lean, None)


def _provider_stage(reads: list[bytes], streams: int) -> float:
    """The whole adapter path: ``OpenAIProvider.stream``, item by item, as a run reads it."""
    from broker._config import PoolConfig
    from broker._protocol import Job, Message
    from workers.providers.openai import OpenAIProvider

    pool = PoolConfig(kind="openai", base_url="http://x/v1")
    provider = OpenAIProvider(pool, _stub_client(reads))
    job = Job(id="j1", route="chat", messages=[Message(role="user", content="hi")],
              reply_to="llm.reply.j1", deadline_ms=0)  # fmt: skip

    async def all_streams() -> None:
        for _ in range(streams):
            items = provider.stream(job, "gpt-4o-mini").__aiter__()
            async for _item in items:
                pass

    return _cpu_us_per_chunk(lambda: asyncio.run(all_streams()), streams * len(reads))


async def _serve_request(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Read one request (head and its content-length body) off ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await loop.sock_recv(conn, 65_536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await loop.sock_recv(conn, 65_536)


async def _socket_streams(reads: list[bytes], streams: int) -> None:
    from broker._config import PoolConfig
    from broker._protocol import Job, Message
    from workers._transport import LeanClient, LeanTransport
    from workers.providers.openai import OpenAIProvider

    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    lean = LeanTransport(max_connections=1, ssl_context=ssl.create_default_context())
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    provider = OpenAIProvider(PoolConfig(kind="openai", base_url=url), LeanClient(lean, None))
    job = Job(id="j1", route="chat", messages=[Message(role="user", content="hi")],
              reply_to="llm.reply.j1", deadline_ms=0)  # fmt: skip
    conn: socket.socket | None = None
    for _ in range(streams):
        items = provider.stream(job, "gpt-4o-mini").__aiter__()
        first = asyncio.ensure_future(items.__anext__())  # sends the request
        if conn is None:
            conn, _ = await loop.sock_accept(listener)
        await _serve_request(loop, conn)
        conn.send(_HEAD + reads[0])
        await first
        for read in reads[1:]:
            conn.send(read)  # one read's bytes, then the worker's side wakes up for them
            await items.__anext__()
        async for _item in items:  # (none: after the finish, the drain)
            pass
    assert conn is not None
    conn.close()
    listener.close()


def _socket_stage(reads: list[bytes], streams: int) -> float:
    """The adapter path on a real loopback connection, one read at a time, so each chunk
    costs the wake-up a provider's token does (the sending side's ``send`` counts too)."""
    run = lambda: asyncio.run(_socket_streams(reads, streams))  # noqa: E731
    return _cpu_us_per_chunk(run, streams * len(reads))


def _stub_run() -> Any:
    """A ``JobRun`` on a stub pool context: ``reply`` encodes the event and drops it."""
    from broker._config import PoolConfig
    from broker._protocol import Job, Message, encode
    from workers import _job
    from workers._continuation import Continuation

    async def reply(subject: str, event: Any, deadline_ms: int) -> None:
        encode(event)

    pool = PoolConfig(kind="openai", base_url="http://x/v1")
    ctx = SimpleNamespace(
        pool=pool, pool_name="a", trace_delivery=lambda d: None, reply=reply,
        config=SimpleNamespace(streams=SimpleNamespace(replicas=1)),
        metrics=SimpleNamespace(first_token=lambda model, s: None),
    )  # fmt: skip
    delivery = SimpleNamespace(job_seq=7, attempt="a1", deliveries=1, hold=lambda: None)
    vars(_job)["Delivery"] = lambda msg, ack_wait_s: delivery  # (JobRun builds its own)
    run = _job.JobRun(ctx, None, "chat")  # type: ignore[arg-type]
    run.job = Job(id="j1", route="chat", messages=[Message(role="user", content="hi")],
                  reply_to="llm.reply.j1", deadline_ms=0)  # fmt: skip
    run.model = "gpt-4o-mini"
    run.cont = Continuation(run.job, pool, run.model, set())
    return run


def _job_stage(tokens: int, streams: int) -> float:
    """``JobRun._handle_item`` for each text item (driven without an event loop: the
    stub's ``reply`` never waits)."""
    from workers.providers._base import TextDelta

    texts = [TextDelta(w) for w in _WORDS] * (tokens // len(_WORDS) + 1)
    texts = texts[:tokens]

    def run() -> None:
        for _ in range(streams):
            job_run = _stub_run()
            for item in texts:
                with contextlib.suppress(StopIteration):
                    job_run._handle_item(item).send(None)

    return _cpu_us_per_chunk(run, streams * tokens)


def child(tree: str, tokens: int, streams: int, stages: list[str]) -> dict[str, float]:
    """One round in this process, with ``tree``'s modules first on ``sys.path``."""
    sys.path.insert(0, tree)
    reads = stream_reads(tokens)
    figures = _parse_stages(reads, streams) if {"dechunk", "sse", "adapter"} & set(stages) else {}
    if "provider" in stages:
        figures["provider"] = _provider_stage(reads, streams)
    if "socket" in stages:
        figures["socket"] = _socket_stage(reads, streams)
    if "job" in stages:
        figures["job"] = _job_stage(tokens, streams)
    return {stage: figures[stage] for stage in stages}


def _round(tree: str, tokens: int, streams: int, stages: list[str]) -> dict[str, float]:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", tree, "--tokens",
            str(tokens), "--streams", str(streams), "--stages", ",".join(stages)]  # fmt: skip
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def report(trees: list[str], results: dict[str, list[dict[str, float]]], stages: list[str]) -> None:
    """Median µs per chunk per stage and tree, every round's figure, ratios to the first."""
    base = trees[0]
    for stage in stages:
        print(f"{stage}:")
        for tree in trees:
            values = [r[stage] for r in results[tree]]
            med = statistics.median(values)
            ratio = med / statistics.median([r[stage] for r in results[base]])
            rounds = " ".join(f"{v:.2f}" for v in values)
            print(f"  {tree:<28} median {med:7.2f} µs/chunk  x{ratio:.2f}  rounds: {rounds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--stages", default=",".join(STAGES), help="of " + ",".join(STAGES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    stages = [s for s in STAGES if s in args.stages.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.streams, stages)))
        return
    trees = args.trees.split(",")
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    for r in range(args.rounds):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            results[tree].append(_round(tree, args.tokens, args.streams, stages))
    report(trees, results, stages)


if __name__ == "__main__":
    main()
