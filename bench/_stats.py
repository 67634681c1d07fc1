"""Percentiles and summaries of latency samples.

Percentiles are nearest-rank (the smallest sample with at least p% of the
samples at or below it), so p50 <= p90 <= p99 <= max always holds and every
figure is a latency that some request really had.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec


class Summary(msgspec.Struct, kw_only=True):
    """Milliseconds; all zero when there were no samples."""

    n: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    mean: float = 0.0


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        return Summary()
    ordered = sorted(samples)
    return Summary(
        n=len(ordered),
        p50=_r(percentile(ordered, 50)),
        p90=_r(percentile(ordered, 90)),
        p99=_r(percentile(ordered, 99)),
        max=_r(ordered[-1]),
        mean=_r(sum(ordered) / len(ordered)),
    )


def _r(value: float) -> float:
    return round(value, 3)
