"""The durability modes of nats.conf (RELIABILITY.md's table), on real nats-servers.

nats.conf ships nats-server's default fsync interval (2 minutes) and documents one
line to uncomment for an fsync before every PubAck. These tests take that line as
it is written, uncomment it in a copy, and run llmrelay on a server, and on a
3-node cluster, started from the copy. A host crash cannot be staged here: what
they show is that the server runs in the mode (it says so in ``/varz``) and that
jobs are answered in it, also jobs queued across a SIGKILL of the server.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from broker._cluster import NatsCluster
from broker._server import CLIENT_USER, WORKER_USER, NatsServer
from devstack import MockProvider, expected_answer
from tests._cluster import R3
from tests._harness import NatsUrls, queued_across_a_server_kill, start_stack, upstream

REPO = Path(__file__).resolve().parent.parent
SYNC_ALWAYS_LINE = "  # sync_interval: always\n"


def sync_always_confs(into: Path) -> tuple[Path, Path]:
    """nats.conf with its documented sync line uncommented, and nats-cluster.conf
    beside it (it includes nats.conf): (nats.conf, nats-cluster.conf)."""
    text = (REPO / "nats.conf").read_text()
    assert text.count(SYNC_ALWAYS_LINE) == 1, "nats.conf documents the line once"
    (into / "nats.conf").write_text(text.replace(SYNC_ALWAYS_LINE, "  sync_interval: always\n"))
    shutil.copy(REPO / "nats-cluster.conf", into / "nats-cluster.conf")
    return into / "nats.conf", into / "nats-cluster.conf"


def jetstream_config(server: NatsServer) -> dict[str, Any]:
    url = f"http://{server.host}:{server.monitor_port}/varz"
    with urllib.request.urlopen(url, timeout=2.0) as resp:
        config: dict[str, Any] = json.load(resp)["jetstream"]["config"]
    return config


def test_the_shipped_nats_conf_fsyncs_every_two_minutes(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path) as server:
        config = jetstream_config(server)
    assert not config.get("sync_always")
    assert config["sync_interval"] == 120 * 10**9  # nanoseconds: nats-server's default


async def test_sync_always_as_documented_fsyncs_and_jobs_queued_across_a_kill_are_answered(
    tmp_path: Path,
) -> None:
    conf, _ = sync_always_confs(tmp_path)

    def fsyncs(server: NatsServer) -> None:
        assert jetstream_config(server)["sync_always"] is True

    async with MockProvider(name="p", tokens=3) as mock:
        texts = await queued_across_a_server_kill(
            tmp_path / "store", mock, config_file=conf, more_after=5, check=fsyncs
        )
    assert texts == [expected_answer("p", 3)] * 10


@pytest.mark.slow
async def test_sync_always_on_every_node_of_an_r3_cluster_answers_jobs(tmp_path: Path) -> None:
    _, cluster_conf = sync_always_confs(tmp_path)
    with NatsCluster(size=3, store_dir=tmp_path / "cluster", config_file=cluster_conf) as cluster:
        assert all(jetstream_config(node)["sync_always"] is True for node in cluster.nodes)
        mock = MockProvider(name="p", tokens=3)
        urls = NatsUrls(cluster.urls_for(WORKER_USER), cluster.urls_for(CLIENT_USER))
        pools = {"a": upstream(mock)}
        async with start_stack(urls, pools, {"chat": [("a", "m")]}, streams=R3) as stack:
            handles = [await stack.relay.submit(f"q{i}", route="chat") for i in range(10)]
            texts = [await handle.text() for handle in handles]
            info = await stack.workers[0].nc.jetstream().stream_info("LLM_JOBS")
    assert texts == [expected_answer("p", 3)] * 10
    assert info.config.num_replicas == 3
