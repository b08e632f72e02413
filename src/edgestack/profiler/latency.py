"""Latency statistics of timed calls."""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np


def latency_stats(times_ms: Sequence[float], batch: int = 1) -> dict[str, float]:
    """p10/p50/p90/p99/mean/std/min of call times in milliseconds, ``spread_ms`` (half the
    p10..p90 range: the band two runs of the same subject should agree within) and
    ``throughput`` (items per second, ``batch`` items per call)."""
    q = np.quantile(np.asarray(times_ms, dtype=np.float64), [0.1, 0.5, 0.9, 0.99])
    mean = statistics.fmean(times_ms)
    return {"iterations": len(times_ms), "p10_ms": float(q[0]), "p50_ms": float(q[1]),
            "p90_ms": float(q[2]), "p99_ms": float(q[3]), "mean_ms": mean,
            "std_ms": statistics.pstdev(times_ms) if len(times_ms) > 1 else 0.0,
            "min_ms": min(times_ms), "spread_ms": float(q[2] - q[0]) / 2,
            "throughput": 1e3 * batch / mean}
