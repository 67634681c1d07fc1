"""What a subscription per request costs: the case for one wildcard reply subscription.

    python -m bench.reply_subs [ROUNDS]

The gateway and ``RelayClient`` subscribe to each job's reply subject before they
publish the job, and unsubscribe after its answer (the ``UNSUB`` sent with the next
write, ``broker._replay.unsubscribe_soon``). One wildcard subscription per process
would save that ``SUB`` and ``UNSUB``, at the price of a protocol change (a reply
subject is exactly ``llm.reply.<id>`` today, so a wildcard over it would take every
client's replies). This measures what it would save: 20,000 publishes of a 300-byte
job, a flush every 4 (as requests overlap), with and without a ``SUB`` and a
deferred ``UNSUB`` around each, on a nats-server of its own. Printed: CPU µs per
request of this process and of nats-server, medians over the rounds, which
alternate the two ways.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from bench.nats_clients import nats_server, proc_cpu_s

REQUESTS = 20_000
JOB = b"x" * 300


async def one_run(url: str, server_pid: int, subscribed: bool) -> tuple[float, float]:
    """CPU µs per request of this process and of nats-server."""
    import nats  # here, so that importing the module needs no server

    from broker._replay import unsubscribe_soon

    nc = await nats.connect(url)
    await nc.flush()
    cpu_s, server_s = time.process_time(), proc_cpu_s(server_pid)
    for i in range(REQUESTS):
        sub = await nc.subscribe(f"llm.reply.job{i}") if subscribed else None
        await nc.publish("bench.job", JOB)
        if sub is not None:
            await unsubscribe_soon(sub)
        if i % 4 == 3:
            await nc.flush()
    await nc.flush()
    cpu_s, server_s = time.process_time() - cpu_s, proc_cpu_s(server_pid) - server_s
    await nc.close()
    return cpu_s / REQUESTS * 1e6, server_s / REQUESTS * 1e6


async def rounds(n: int) -> None:
    with nats_server() as (url, pid):
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(n):
            for subscribed in (False, True):
                runs[subscribed].append(await one_run(url, pid, subscribed))
    for subscribed, label in ((False, "publish only"), (True, "SUB + publish + UNSUB")):
        client = statistics.median(r[0] for r in runs[subscribed])
        server = statistics.median(r[1] for r in runs[subscribed])
        print(f"{label:22} client {client:6.1f} µs/request  nats-server {server:6.1f} µs/request")


def main() -> None:
    asyncio.run(rounds(int(sys.argv[1]) if len(sys.argv) > 1 else 4))


if __name__ == "__main__":
    main()
