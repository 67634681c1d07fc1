"""A real 3-node JetStream cluster for tests, and what tests wait for on it.

``local_cluster`` starts the cluster runner that `llmrelay up --cluster 3` uses
(``broker/_cluster.py``) on free ports with temporary stores. The waits poll
JetStream state under a deadline; none of them sleeps a fixed time.
``node_serving`` finds the node a named connection is on (monitoring ``/connz``),
``lead_elsewhere`` moves every leader off one node (a stepdown naming the node
to prefer), so that a test can kill a node that leads nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker._cluster import NatsCluster
from broker._nats import connect_nats
from broker._server import WORKER_USER

REPO = Path(__file__).resolve().parent.parent
LLMRELAY_STREAMS = ("LLM_JOBS", "LLM_REPLIES", "LLM_EVENTS", "LLM_DLQ", "KV_llm_workers")
R3 = {"replicas": 3}


@contextlib.contextmanager
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    store = tmp_path_factory.mktemp("cluster")
    with NatsCluster(size=3, store_dir=store, config_file=REPO / "nats-cluster.conf") as cluster:
        yield cluster


@contextlib.contextmanager
def paused(cluster: NatsCluster, name: str) -> Iterator[None]:
    """SIGSTOP one node (alive, its sockets open, silent: a partition, not a crash);
    SIGCONT it on leaving, also when the test fails, so the cluster can stop."""
    pid = cluster.node(name).pid
    assert pid is not None, f"node {name} is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def leaders_seen(cluster: NatsCluster, stream: str) -> dict[str, str]:
    """Each node's view of ``stream``'s leader (monitoring ``/jsz``): one value when
    the nodes agree, "" from a node that sees none."""
    views = {}
    for node in cluster.nodes:
        url = f"http://{node.host}:{node.monitor_port}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            jsz = json.load(resp)
        streams = [
            s for a in jsz.get("account_details") or [] for s in a.get("stream_detail") or []
        ]
        views[node.server_name or ""] = next(
            ((s.get("cluster") or {}).get("leader") or "" for s in streams if s["name"] == stream),
            "",
        )
    return views


def node_serving(cluster: NatsCluster, connection: str) -> str:
    """The one node that serves a client connection named ``connection`` (``/connz``)."""
    serving = []
    for node in cluster.nodes:
        url = f"http://{node.host}:{node.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            names = [c.get("name") for c in json.load(resp).get("connections") or []]
        serving += [node.server_name or ""] * names.count(connection)
    assert len(serving) == 1, f"{connection!r} is connected to {serving or 'no node'}"
    return serving[0]


async def lead_elsewhere(nc: NATS, node: str, to: str) -> list[str]:
    """Move the leader of each llmrelay stream, and of each consumer of LLM_JOBS, that
    ``node`` holds to ``to``; return what was moved, once ``to`` leads each of them."""
    js = nc.jetstream()
    moved = []
    for stream in await js.streams_info():
        name = stream.config.name or ""
        if name in LLMRELAY_STREAMS and stream.cluster and stream.cluster.leader == node:
            await _step_down(nc, f"STREAM.LEADER.STEPDOWN.{name}", to)
            moved.append(name)
    for consumer in await js.consumers_info("LLM_JOBS"):
        if consumer.cluster and consumer.cluster.leader == node:
            await _step_down(nc, f"CONSUMER.LEADER.STEPDOWN.LLM_JOBS.{consumer.name}", to)
            moved.append(f"LLM_JOBS/{consumer.name}")
    with anyio.fail_after(10):
        while not await _all_led_by(js, moved, to):
            await anyio.sleep(0.05)
    return moved


async def _step_down(nc: NATS, api: str, preferred: str) -> None:
    body = json.dumps({"placement": {"preferred": preferred}}).encode()
    reply = json.loads((await nc.request(f"$JS.API.{api}", body, timeout=5.0)).data)
    assert reply.get("success"), reply


async def _all_led_by(js: JetStreamContext, names: Sequence[str], leader: str) -> bool:
    for name in names:
        stream, _, consumer = name.partition("/")
        try:
            if consumer:
                cluster = (await js.consumer_info(stream, consumer)).cluster
            else:
                cluster = (await js.stream_info(stream)).cluster
        except NatsError:
            return False
        if cluster is None or cluster.leader != leader:
            return False
    return True


async def connect_worker(cluster: NatsCluster, *nodes: str) -> NATS:
    """A worker-user connection to ``nodes`` (default: every node)."""
    urls = [cluster.node(n).url_for(WORKER_USER) for n in nodes] if nodes else None
    url = ",".join(urls) if urls else cluster.urls_for(WORKER_USER)
    return await connect_nats(url, name="llmrelay-test")


def connected_port(nc: NATS) -> int | None:
    """The client port of the node ``nc`` is connected to now."""
    return nc.connected_url.port if nc.connected_url is not None else None


async def wipe(nc: NATS, cluster: NatsCluster) -> None:
    """Delete llmrelay's streams, so a test starts from nothing; return once every node
    has let go of them (the storage they reserved too: until then, the meta leader
    refuses new R3 streams as "insufficient storage")."""
    js = nc.jetstream()
    for stream in LLMRELAY_STREAMS:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    with anyio.fail_after(10):
        while not await anyio.to_thread.run_sync(_all_released, cluster):
            await anyio.sleep(0.05)


def _all_released(cluster: NatsCluster) -> bool:
    for node in cluster.nodes:
        jsz = node.jsz()
        if jsz["streams"] or jsz["reserved_memory"] or jsz["reserved_storage"]:
            return False
    return True


async def stream_leader(nc: NATS, stream: str) -> str:
    """The stream's leader now; "" while none is elected (or the answer timed out)."""
    try:
        # A short timeout: a stream without a leader does not answer, and the poll
        # measures how long that lasts.
        info = await nc.jetstream(timeout=0.25).stream_info(stream)
    except NatsError:
        return ""
    return (info.cluster.leader or "") if info.cluster else ""


async def wait_for_new_leader(
    nc: NATS, stream: str, old: str, *, timeout_s: float = 30.0
) -> tuple[str, float]:
    """Poll until ``stream`` has a leader other than ``old``: (leader, seconds waited)."""
    start = time.monotonic()
    with anyio.fail_after(timeout_s):
        while True:
            leader = await stream_leader(nc, stream)
            if leader and leader != old:
                return leader, time.monotonic() - start
            await anyio.sleep(0.02)


async def wait_until_current(
    nc: NATS, streams: Sequence[str] = LLMRELAY_STREAMS, *, timeout_s: float = 30.0
) -> None:
    """Until every stream that exists has a leader and all its followers current."""
    with anyio.fail_after(timeout_s):
        for stream in streams:
            while not await _all_current(nc, stream):
                await anyio.sleep(0.05)


async def _all_current(nc: NATS, stream: str) -> bool:
    try:
        info = await nc.jetstream().stream_info(stream)
    except NotFoundError:
        return True
    except NatsError:
        return False
    cluster = info.cluster
    if cluster is None or not cluster.leader:
        return False
    return all(peer.current and not peer.offline for peer in cluster.replicas or [])
