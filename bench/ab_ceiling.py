"""Alternate ceiling runs of two source trees; print CPU ms per request and req/s.

    git worktree add /tmp/base <commit>
    python -m bench.ab_ceiling /tmp/base,$PWD 2 [extra bench options]

Each tree runs ``llmrelay bench --preset ceiling --no-direct --duration 10`` from its
own directory (its modules come first on ``sys.path``), in turns, so that the drift of
a shared machine falls on both alike. Per process kind: CPU ms per completed request.
Extra options go last, so ``--preset gateway-ceiling --rate 250`` measures the
gateway instead (both trees need that preset).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = ["bench", "--preset", "ceiling", "--no-direct", "--duration", "10", "--warmup", "2"]


def run(tree: Path, extra: list[str], out: Path) -> dict[str, Any]:
    """One broker-side ceiling run of ``tree``; its report's broker side."""
    command = [sys.executable, "-c", "from cli.main import main; main()", *BENCH, *extra]
    subprocess.run([*command, "--out", str(out)], cwd=tree, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    broker: dict[str, Any] = json.loads(out.read_text())["runs"][0]["broker"]
    return broker


def summary(broker: dict[str, Any]) -> str:
    procs: dict[str, float] = {p["name"]: p["cpu_ms_per_request"] for p in broker["processes"]}

    def total(prefix: str) -> float:
        return sum(v for name, v in procs.items() if name.startswith(prefix))

    gateway = f"gateway {total('gateway'):.2f}  " if total("gateway") else ""
    return (
        f"rate {broker['achieved_rate']:7.1f} req/s  CPU ms/request: {gateway}workers "
        f"{total('worker'):.2f}  nats-server {total('nats-server'):.2f}  client "
        f"{total('loadgen'):.2f}  provider {total('mock'):.2f}  (other processes "
        f"{broker.get('others_cpu_pct', '?')} %)"
    )


def main() -> None:
    trees = [Path(t) for t in sys.argv[1].split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, tree in enumerate(trees):
                broker = run(tree, sys.argv[3:], Path(tmp) / f"{i}-{r}.json")
                print(f"{tree} round {r}: {summary(broker)}", flush=True)


if __name__ == "__main__":
    main()
