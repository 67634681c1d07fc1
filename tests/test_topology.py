"""ensure_topology against a real nats-server: idempotent, updates limits."""

from __future__ import annotations

import json

import msgspec
from nats.aio.client import Client as NATS

from broker import ensure_topology
from broker._jsapi import consumer_info
from tests._builders import make_config

POOLS = {"p1": {}, "p2": {}}
ROUTES = {
    "chat": [("p1", "m1"), ("p2", "m2")],
    "spill": {
        "targets": [{"pool": "p1", "model": "m"}, {"pool": "p2", "model": "m"}],
        "spill": "backlog",
        "min_pending": 5,
    },
}


async def test_topology_is_idempotent(nc: NATS) -> None:
    cfg = make_config(POOLS, ROUTES)
    await ensure_topology(nc, cfg)
    js = nc.jetstream()
    before = {
        s: await js.stream_info(s) for s in ("LLM_JOBS", "LLM_REPLIES", "LLM_EVENTS", "LLM_DLQ")
    }
    consumers = ("route_chat", "route_spill", "pool_p1", "pool_p2")
    c_before = {c: await consumer_info(nc, "LLM_JOBS", c) for c in consumers}

    await ensure_topology(nc, cfg)

    for name, info in before.items():
        after = await js.stream_info(name)
        assert after.config == info.config
        assert after.created == info.created
    for name, info in c_before.items():
        after_c = await consumer_info(nc, "LLM_JOBS", name)
        assert after_c["config"] == info["config"]
        assert after_c["created"] == info["created"]
    assert c_before["route_chat"]["config"]["priority_policy"] == "prioritized"
    assert c_before["route_spill"]["config"]["priority_policy"] == "overflow"
    # A pool's consumer reads pinned jobs and the re-queues only workers may publish.
    # And each tenant's subjects (the tenant last): `llm.pool.p1.<tenant>`.
    assert c_before["pool_p1"]["config"]["filter_subjects"] == [
        "llm.pool.p1",
        "llm.pool.p1.*",
        "llm.requeue.p1",
    ]
    kv = await js.key_value("llm_workers")
    assert (await kv.status()).bucket == "llm_workers"


async def test_changing_capacity_updates_the_stream(nc: NATS) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES, streams={"queue_capacity": 100}))
    js = nc.jetstream()
    assert (await js.stream_info("LLM_JOBS")).config.max_msgs_per_subject == 100
    await ensure_topology(nc, make_config(POOLS, ROUTES, streams={"queue_capacity": 250}))
    info = await js.stream_info("LLM_JOBS")
    assert info.config.max_msgs_per_subject == 250
    assert info.config.discard_new_per_subject is True
    assert info.config.retention == "workqueue"


async def test_raw_json_job_from_plain_nats_lands_on_route_subject(nc: NATS) -> None:
    await ensure_topology(nc, make_config(POOLS, ROUTES))
    js = nc.jetstream()
    job = {
        "id": "raw-1",
        "route": "chat",
        "messages": [{"role": "user", "content": "hello from any client"}],
        "reply_to": "llm.reply.raw-1",
        "deadline_ms": 9_999_999_999_999,
    }
    ack = await js.publish(
        "llm.jobs.chat", json.dumps(job).encode(), headers={"Nats-Msg-Id": "raw-1"}
    )
    stored = await js.get_msg("LLM_JOBS", ack.seq)
    assert stored.subject == "llm.jobs.chat"
    assert msgspec.json.decode(stored.data)["messages"][0]["content"] == "hello from any client"
    info = await consumer_info(nc, "LLM_JOBS", "route_chat")
    assert info["num_pending"] == 1
