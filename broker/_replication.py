"""Where each stream's replicas are, read from stream info's ``cluster`` field.

On a cluster every stream (and the heartbeat bucket's stream) has a leader,
which takes every write, and followers, which the server reports as
``current`` (caught up) or not, with ``lag`` (operations behind the leader),
``active`` (nanoseconds since the leader heard from it) and ``offline``. A
stream whose leader died has none until the others elect one (seconds): its
``leader`` is empty meanwhile and writes to it wait. `llmrelay status` and the
monitor show this per stream; on a single server a stream is its own leader,
with no followers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from broker._errors import JetStreamApiError
from broker._jsapi import api_request
from broker._subjects import js_api

_NS = 1_000_000_000
_ERR_STREAM_NOT_FOUND = 10059
# A stream without a leader does not answer; do not hold a snapshot for long.
INFO_TIMEOUT_S = 2.0


class Follower(msgspec.Struct, kw_only=True):
    """One replica of a stream that is not its leader."""

    name: str
    current: bool
    lag: int = 0
    seen_s: float | None = None  # since the leader last heard from it
    offline: bool = False


class StreamReplication(msgspec.Struct, kw_only=True):
    """A stream's configured replicas, its leader ("" while none) and its followers."""

    name: str
    replicas: int
    leader: str = ""
    followers: list[Follower] = msgspec.field(default_factory=list)
    error: str = ""  # why the stream could not be read now (no leader, ...)

    @property
    def current_replicas(self) -> int:
        """Replicas that hold everything: the leader and the current followers."""
        if not self.leader:
            return 0
        return 1 + sum(1 for f in self.followers if f.current and not f.offline)


def stream_replication(info: dict[str, Any]) -> StreamReplication:
    """The replication of one stream from its raw stream info."""
    config = info.get("config") or {}
    cluster = info.get("cluster") or {}
    return StreamReplication(
        name=str(config.get("name", "")),
        replicas=int(config.get("num_replicas") or 1),
        leader=str(cluster.get("leader") or ""),
        followers=[_follower(peer) for peer in cluster.get("replicas") or []],
    )


def _follower(peer: dict[str, Any]) -> Follower:
    active = peer.get("active")
    return Follower(
        name=str(peer.get("name", "")),
        current=bool(peer.get("current")),
        lag=int(peer.get("lag") or 0),
        seen_s=round(int(active) / _NS, 3) if active is not None else None,
        offline=bool(peer.get("offline")),
    )


async def read_replication(nc: NATS, streams: Sequence[str]) -> list[StreamReplication]:
    """Each existing stream of ``streams``; one that does not answer says why."""
    out: list[StreamReplication] = []
    for name in streams:
        try:
            info = await api_request(nc, js_api("STREAM", "INFO", name), {}, INFO_TIMEOUT_S)
        except JetStreamApiError as exc:
            if exc.err_code == _ERR_STREAM_NOT_FOUND:
                continue
            out.append(StreamReplication(name=name, replicas=0, error=exc.message))
            continue
        out.append(stream_replication(info))
    return out
