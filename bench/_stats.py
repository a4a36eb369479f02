"""What every benchmark here prints beside a median: its quartiles."""

from __future__ import annotations

import statistics


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``xs`` (inclusive method); one value gives it three times."""
    xs = list(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3
