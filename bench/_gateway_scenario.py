"""The gateway scenario: open loop through the HTTP gateway at rising rates.

For each phase the same load is sent twice from fresh load-generator processes:
straight at the fake provider (``direct``, the worker's own adapter), then as
streamed ``POST /v1/chat/completions`` to an ``llmrelay gateway`` process in
front of nats-server and the preset's workers (``gateway``). The report has,
per rate: what completed and what timed out, time to first token added over
the direct run (p50, p99), and CPU milliseconds per request of every process
(gateway, workers, nats-server, provider, generators) from /proc.
"""

from __future__ import annotations

from bench._cluster import Cluster
from bench._report import RunResult
from bench._scenario import GATEWAY_KEY, Log, Side, bench_config, load_shape, overhead
from bench.presets import Preset
from broker._server import free_port
from devstack import GatewayProcess

__all__ = ["gateway_scenario"]


async def gateway_scenario(cluster: Cluster, preset: Preset, log: Log) -> list[RunResult]:
    log(f"starting nats-server, fake provider, {preset.workers} worker(s) and the gateway")
    cluster.start_nats()
    mock = cluster.start_provider("mock-a", preset.provider)
    port = free_port()
    doc = bench_config(preset, {"a": mock.url}).gateway(port=port, api_keys=[GATEWAY_KEY])
    cluster.write_config(doc)
    nc = await cluster.connect()
    try:
        workers = [cluster.start_worker("a", i) for i in range(preset.workers)]
        gateway = cluster.add_gateway(
            GatewayProcess(cluster.config_path, cluster.client_url, cluster.work_dir, port=port)
        )
        await cluster.wait_ready(nc, workers)
        await gateway.wait_ready()
        for w in workers:
            cluster.profile(w)
        runs = []
        for phase in preset.phases:
            direct = None
            if preset.direct:
                log(f"{phase.name}: direct to the fake provider")
                direct = (await Side(cluster, preset, phase, "direct").run()).result
            log(f"{phase.name}: through the gateway")
            through = (await Side(cluster, preset, phase, "gateway").run()).result
            await cluster.purge_jobs(nc, "chat")
            runs.append(
                RunResult(
                    name=phase.name,
                    load=load_shape(preset, phase),
                    broker=through,
                    direct=direct,
                    overhead=overhead(through, direct),
                    extra={},
                )
            )
        return runs
    finally:
        await nc.close()
