"""What a fake provider counts, so tests see attempts, their timing and socket reuse.

``/stats`` (and ``MockProvider.stats()``) is how a test tells "the worker
retried twice" or "one connection carried 500 requests" from the outside,
without looking into the worker.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

__all__ = ["LOG_SIZE", "Stats"]

LOG_SIZE = 10_000


class Stats:
    """Counters a test reads to see how many attempts arrived, when, and on how many sockets."""

    __slots__ = (
        "active",
        "by_model",
        "by_path",
        "connections",
        "log",
        "peak",
        "prefills",
        "prefills_refused",
        "requests",
    )

    def __init__(self) -> None:
        self.active = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.connections = 0
        self.peak = self.active
        self.prefills = 0
        self.prefills_refused = 0
        self.by_path: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.log: deque[tuple[float, str, str, int, dict[str, Any] | None]] = deque(maxlen=LOG_SIZE)

    def begin(
        self, path: str, model: str, status: int, options: dict[str, Any] | None = None
    ) -> None:
        """One chat request; ``options``: what it asked beyond text (``_structured.py``)."""
        self.requests += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.by_path[path] += 1
        self.by_model[model] += 1
        self.log.append((time.time(), model, path, status, options))

    def prefill(self, *, refused: bool) -> None:
        """A request carried an assistant prefill, which was continued or refused."""
        if refused:
            self.prefills_refused += 1
        else:
            self.prefills += 1

    def end(self) -> None:
        self.active -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "connections": self.connections,
            "active": self.active,
            "peak_concurrency": self.peak,
            "prefills": self.prefills,
            "prefills_refused": self.prefills_refused,
            "by_path": dict(self.by_path),
            "by_model": dict(self.by_model),
            "log": [_entry(*logged) for logged in self.log],
        }


def _entry(
    t: float, model: str, path: str, status: int, options: dict[str, Any] | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"t": t, "model": model, "path": path, "status": status}
    if options:
        entry["options"] = options
    return entry
