"""Summaries of latency samples, shared by `bench latency` and `bench serve`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(slots=True, frozen=True)
class Summary:
    """Mean and percentiles of one kind of sample; p50 is the median."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, interpolated linearly between the two
    nearest ranks (numpy's default), so that p50 <= p90 <= p99 always holds."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> Summary | None:
    """None when there is nothing to summarize (e.g. every request failed): JSON then says
    null instead of a NaN that strict parsers reject."""
    if not values:
        return None
    ordered = sorted(values)
    return Summary(len(ordered), math.fsum(ordered) / len(ordered), percentile(ordered, 50),
                   percentile(ordered, 90), percentile(ordered, 99))


def summary_dict(values: Sequence[float]) -> dict[str, float] | None:
    summary = summarize(values)
    return summary.as_dict() if summary else None
