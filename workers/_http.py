"""A pool's HTTP connections: ``slots`` keep-alive connections to its provider.

They are an httpx client on ``LeanTransport`` (``_transport.py``): one write per
request, and an O(1) pick of an idle connection, where httpcore's pool costs
two syscalls per pooled connection per request. An injected transport (tests)
gets httpx's own pool, whose per-request scan of every connection (about O(size²)
work: measured with 1,024 slots, 77% of the CPU and 4.5 req/s, bench/RESULTS.md)
is kept flat by shards of at most ``SHARD_SIZE`` connections; a job takes the
least busy shard. Either way the pool holds exactly ``slots`` connections and
one TLS context (one per client would cost ~100 MB at 1,024 slots).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import certifi  # httpx's own CA bundle (a dependency of httpx)
import httpx

from broker._config import PoolConfig
from workers._transport import LeanClient, LeanTransport
from workers.providers import make_provider
from workers.providers._base import Provider

SHARD_SIZE = 8
KEEPALIVE_EXPIRY_S = 60.0


class HttpShards:
    """``slots`` keep-alive connections to one provider, in shards of <= SHARD_SIZE."""

    def __init__(
        self,
        pool: PoolConfig,
        slots: int,
        *,
        on_connect: Callable[[], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        shards = -(-slots // SHARD_SIZE) if transport is not None else 1
        tls = ssl.create_default_context(cafile=certifi.where())
        sizes = [slots // shards + (1 if i < slots % shards else 0) for i in range(shards)]
        self.clients = [_client(pool, n, tls, on_connect, transport) for n in sizes]
        self.providers: list[Provider] = [make_provider(pool, c) for c in self.clients]
        self.busy = [0] * shards

    def acquire(self) -> tuple[int, Provider]:
        """The least busy shard's index and provider; ``release(index)`` when done."""
        i = min(range(len(self.busy)), key=self.busy.__getitem__)
        self.busy[i] += 1
        return i, self.providers[i]

    def release(self, index: int) -> None:
        self.busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def _client(
    pool: PoolConfig,
    connections: int,
    tls: ssl.SSLContext,
    on_connect: Callable[[], None] | None,
    transport: httpx.AsyncBaseTransport | None,
) -> httpx.AsyncClient:
    t = pool.timeouts
    # pool=None: slots bound concurrency; the job's own limits bound any wait.
    timeout = httpx.Timeout(connect=t.connect_s, read=None, write=t.connect_s, pool=None)
    if transport is None:
        lean = LeanTransport(
            max_connections=connections,
            ssl_context=tls,
            keepalive_expiry_s=KEEPALIVE_EXPIRY_S,
            on_connect=on_connect,
        )
        return LeanClient(lean, t.connect_s, timeout=timeout)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)  # fmt: skip
    return httpx.AsyncClient(verify=tls, limits=limits, timeout=timeout, transport=transport)
