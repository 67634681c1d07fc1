"""The processes of one benchmark run, and their clean-up.

``Cluster`` is devstack's ``Stack`` (nats-server with a temp store dir, fake
providers, worker processes from a generated config file) plus what only the
bench runs: load generators, py-spy samplers, and worker metrics ports to read.
With ``nats_nodes=3`` (``llmrelay bench --cluster 3``) the one nats-server is a
local 3-node cluster instead (``broker._cluster.NatsCluster``, as ``llmrelay up
--cluster 3`` runs it), every process is given every node's URL, and the config
it writes asks for ``streams.replicas: 3``. ``nats_conf`` (``--nats-conf``) runs
the server(s) from another config file, e.g. one with ``sync_interval: always``.
``close()`` ends every child: on success, on error and on Ctrl-C (it is
synchronous, so it also runs while the event loop is being torn down), load
generators and samplers first, then the stack (workers, providers, nats-server).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import anyio
import httpx
import msgspec
from nats.aio.client import Client as NATS

from bench._loadgen import LoadResult, LoadSpec
from bench._procstat import ProcWatch
from bench.presets import ProviderSpec
from broker._cluster import NatsCluster
from broker._config import load_config
from broker._errors import BenchError
from broker._jsapi import consumer_info
from broker._nats import connect_nats
from broker._server import CLIENT_USER, WORKER_USER, NatsServer, free_port
from broker._subjects import JOBS_STREAM, route_consumer
from broker._topology import ensure_topology
from devstack import (
    ChildProcess,
    ConfigDoc,
    MockProviderProcess,
    MockSpec,
    Stack,
    WorkerProcess,
    stop_process,
)

READY_TIMEOUT_S = 30.0


class WorkerProc(WorkerProcess):
    """A worker process with its metrics port, sampled by the bench."""

    def __init__(self, pool: str, index: int, config: Path, nats_url: str, log_dir: Path) -> None:
        super().__init__(
            pool, config, nats_url, log_dir,
            name=f"worker-{pool}-{index}", metrics_port=free_port(), drain_s=2,
        )  # fmt: skip

    def watch(self) -> ProcWatch:
        return ProcWatch(self.name, "worker", self.pid)

    def metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples as ``name{labels} -> value`` (empty if down)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out


class LoadProc:
    """One load-generator child process (``bench._loadgen.main``)."""

    def __init__(self, spec: LoadSpec, log_dir: Path) -> None:
        self.spec = spec
        self.name = f"loadgen-{spec.target}-{spec.index}"
        self.log_path = log_dir / f"{self.name}-{time.time_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [sys.executable, "-c", "from bench._loadgen import main; main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self._send(msgspec.json.encode(spec))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def watch(self) -> ProcWatch:
        return ProcWatch(self.name, "loadgen", self.pid)

    def _send(self, line: bytes) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line + b"\n")
        stdin.flush()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        line = self._read_line(timeout_s)
        if line.strip() != b"ready":
            raise BenchError(f"{self.name} did not start: {line!r} {self.log_tail()}")

    def go(self) -> None:
        self._send(b"go")

    def stop_sending(self) -> None:
        """Ask the generator to stop sending now (SIGUSR1; it still waits for answers)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGUSR1)

    def result(self, timeout_s: float) -> LoadResult:
        line = self._read_line(timeout_s)
        if not line and self.proc.poll() is None:
            raise BenchError(f"{self.name}: no result within {timeout_s:.0f} s")
        if not line:
            raise BenchError(f"{self.name} ended without a result: {self.log_tail()}")
        return msgspec.json.decode(line, type=LoadResult)

    def _read_line(self, timeout_s: float) -> bytes:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        return stdout.readline() if ready else b""

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        return ""

    def stop(self) -> None:
        stop_process(self.proc, 2.0)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class Cluster(Stack[WorkerProc]):
    """Everything one benchmark run started; ``close()`` ends all of it."""

    def __init__(
        self, work_dir: Path, *, nats_nodes: int = 1, nats_conf: Path | None = None
    ) -> None:
        """``nats_conf``: the nats-server config (nats.conf, or a cluster's nats-cluster.conf)."""
        super().__init__(work_dir)
        if nats_conf is not None:
            self.server = NatsServer(store_dir=work_dir / "nats", config_file=nats_conf)
        self.loadgens: list[LoadProc] = []
        self.config_path = work_dir / "llmrelay-bench.yaml"
        self.profile_dir: Path | None = None
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.nats: NatsCluster | None = None
        if nats_nodes > 1:
            self.nats = NatsCluster(
                size=nats_nodes, store_dir=work_dir / "nats-cluster", config_file=nats_conf
            )

    # --- nats-server: one, or a cluster ----------------------------------------------

    @property
    def nats_nodes(self) -> int:
        return self.nats.size if self.nats is not None else 1

    @property
    def client_url(self) -> str:
        return self.nats.urls_for(CLIENT_USER) if self.nats is not None else super().client_url

    @property
    def worker_url(self) -> str:
        return self.nats.urls_for(WORKER_USER) if self.nats is not None else super().worker_url

    def start_nats(self) -> NatsServer:
        """The one nats-server, or every node of the cluster (then the first is returned)."""
        if self.nats is None:
            return super().start_nats()
        self.nats.start()
        return self.nats.nodes[0]

    def nats_watches(self) -> list[ProcWatch]:
        """A CPU and memory watch on each running nats-server."""
        if self.nats is None:
            servers = [("nats-server", self.server)]
        else:
            servers = [(f"nats-server-{n.server_name}", n) for n in self.nats.nodes]
        return [ProcWatch(name, "nats", s.pid) for name, s in servers if s.pid is not None]

    # --- providers, config and workers -----------------------------------------------

    def start_provider(self, name: str, spec: ProviderSpec, fault: str = "") -> MockProviderProcess:
        return self.start_mock(
            MockSpec(
                name=name,
                tokens=spec.tokens,
                ttft_ms=spec.ttft_ms,
                token_delay_ms=spec.token_delay_ms,
                fault=fault,
            )
        )

    def write_config(self, doc: ConfigDoc) -> Path:
        if self.nats is not None:
            doc.streams(replicas=self.nats.size)
        return doc.write(self.config_path)

    def start_worker(self, pool: str, index: int) -> WorkerProc:
        return self.add_worker(
            WorkerProc(pool, index, self.config_path, self.worker_url, self.work_dir)
        )

    async def wait_ready(self, nc: NATS, workers: list[WorkerProc]) -> None:
        """Until every one of ``workers`` beats (their pulls are in place by then)."""
        await self.wait_for_workers(workers, nc=nc, timeout_s=READY_TIMEOUT_S)

    def profile(self, proc: ChildProcess) -> None:
        """Sample a worker or gateway with py-spy (``--profile DIR``) until the run ends."""
        if self.profile_dir is None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        # One sampler per process at 100 Hz: py-spy takes CPU from the two cores too.
        # Collapsed stacks: `python -m bench._profile`, or open them in speedscope.
        out = self.profile_dir / f"{proc.name}-{proc.pid}"
        cmd = [spy, "record", "--pid", str(proc.pid), "--rate", "100", "--nonblocking"]
        cmd += ["--format", "raw", "--output", f"{out}.collapsed.txt"]
        with open(f"{out}.py-spy.log", "wb") as log:
            self.profilers.append(
                subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
            )

    async def purge_jobs(self, nc: NATS, route: str, timeout_s: float = 15.0) -> None:
        """Drop jobs left queued by abandoned requests; let the in-flight ones finish.

        After an overloaded phase the queue still holds jobs whose clients gave up
        (they are counted as errors already); left there, they would load the
        workers during the next phase.
        """
        await nc.jetstream().purge_stream(JOBS_STREAM)
        with anyio.move_on_after(timeout_s):
            while True:
                info = await consumer_info(nc, JOBS_STREAM, route_consumer(route))
                if not info["num_ack_pending"] and not info["num_pending"]:
                    return
                await anyio.sleep(0.1)

    # --- load generators -----------------------------------------------------------

    def start_loadgens(self, specs: list[LoadSpec]) -> list[LoadProc]:
        procs = [LoadProc(spec, self.work_dir) for spec in specs]
        self.loadgens.extend(procs)
        for p in procs:
            p.wait_ready()
        return procs

    def end_loadgens(self, procs: list[LoadProc]) -> None:
        for p in procs:
            p.stop()
            if p in self.loadgens:
                self.loadgens.remove(p)

    # --- clean-up ------------------------------------------------------------------

    def close(self) -> None:
        """Stop every child, newest kind first. Safe to call twice."""
        for lg in self.loadgens:
            lg.stop()
        self.loadgens.clear()
        for spy in self.profilers:  # SIGINT: py-spy writes its profile and exits
            with contextlib.suppress(OSError):
                spy.send_signal(signal.SIGINT)
        for spy in self.profilers:
            try:
                spy.wait(30.0)
            except subprocess.TimeoutExpired:
                stop_process(spy, 5.0)
        self.profilers.clear()
        super().close()
        if self.nats is not None:
            self.nats.stop()

    async def connect(self) -> NATS:
        """A worker-privileged connection, with the topology of the written config in place."""
        nc = await connect_nats(self.worker_url, name="llmrelay-bench")
        await ensure_topology(nc, load_config(self.config_path))
        return nc
