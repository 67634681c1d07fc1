"""Where a worker's or gateway's time goes, from a py-spy collapsed-stack profile.

    llmrelay bench --preset ceiling --profile prof/        (py-spy record per worker)
    python -m bench._profile prof/worker-a-0-1234.collapsed.txt
    llmrelay bench --preset gateway-ceiling --rate 500 --no-direct --profile prof/
    python -m bench._profile prof/gateway-1234.collapsed.txt

Prints the share of samples spent in each package, the same charged to the
nearest non-stdlib caller, a few cost centres of the hot path (exclusive), and
the functions with the most self time.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# Cost centres, by path prefix; a sample goes to the innermost frame that matches
# one (standard library and anyio frames are skipped: charged to their caller).
CENTRES = (
    ("HTTP client (httpx, httpcore, h11)", ("httpx/", "httpcore/", "h11/")),
    ("HTTP server (uvicorn, starlette)", ("uvicorn/", "starlette/")),
    ("NATS client (nats-py)", ("nats/",)),
    ("provider adapter + SSE parsing", ("workers/providers/",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("job, pump, pulls (workers/, broker/)", ("workers/", "broker/")),
    ("the gateway's own (gateway/)", ("gateway/",)),
)


def _path(frame: str) -> str:
    """'fn (pkg/mod.py:12)' -> 'pkg/mod.py' (py-spy names files relative to sys.path)."""
    if "(" not in frame:
        return ""
    return frame.rsplit("(", 1)[1].rstrip(")").rsplit(":", 1)[0]


def _package(frame: str) -> str:
    path = _path(frame)
    top = path.split("/")[0].removesuffix(".py")
    return top or frame or "?"


def _is_stdlib(frame: str) -> bool:
    path = _path(frame)
    top = path.split("/")[0].removesuffix(".py")
    return path.startswith("<frozen") or top in sys.stdlib_module_names


def _owner(frames: list[str]) -> str:
    """The package of the innermost frame outside the standard library.

    Standard-library time (a socket write, a context manager, the selector) is
    charged to the library or module that called it; time with no such caller
    is the event loop itself.
    """
    for frame in reversed(frames):
        if not _path(frame) or _is_stdlib(frame):
            continue
        pkg = _package(frame)
        if pkg in ("workers", "broker", "gateway", "bench", "cli"):
            return _path(frame)
        return pkg
    return "event loop (asyncio, no caller)"


def _centre(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = _path(frame)
        for name, prefixes in CENTRES:
            if path.startswith(prefixes):
                return name
    return "event loop, task scheduling (asyncio, anyio)"


def summarize(path: Path, top: int = 20) -> str:
    own: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    centres: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        owners[_owner(frames)] += n
        packages[_package(frames[-1])] += n
        centres[_centre(frames)] += n
    if not total:
        return f"{path}: no samples"
    pct = 100.0 / total
    out = [f"{path.name}: {total} samples (busy time only)", "", "self time by package:"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in packages.most_common(12)]
    out += ["", "time charged to the nearest non-stdlib caller (exclusive):"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in owners.most_common(16)]
    out += ["", "cost centres (exclusive; stdlib and anyio time charged to the caller):"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in centres.most_common()]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(out)


def main() -> None:
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
        print()


if __name__ == "__main__":
    main()
