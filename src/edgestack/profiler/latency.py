"""Latency of an ONNX Runtime session: warm-up, then timed iterations."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass
class LatencyStats:
    """Latency statistics in milliseconds over ``iterations`` timed calls."""

    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _percentile(sorted_ms: list[float], q: float) -> float:
    idx = min(len(sorted_ms) - 1, max(0, int(round(q * (len(sorted_ms) - 1)))))
    return sorted_ms[idx]


def time_calls(fn: Callable[[], Any], warmup: int = 3, iterations: int = 20,
               min_seconds: float = 0.0) -> LatencyStats:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``iterations`` timed calls
    (and at least ``min_seconds`` of them)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    s = sorted(times)
    return LatencyStats(
        iterations=len(times), p50_ms=statistics.median(s), p90_ms=_percentile(s, 0.9),
        p99_ms=_percentile(s, 0.99), mean_ms=statistics.fmean(s),
        std_ms=statistics.pstdev(s), min_ms=s[0],
    )


def ort_session(path: str, threads: int = 2, optimization: str = "all") -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    from edgestack.targets.ort_cpu import session_options

    return ort.InferenceSession(str(path), session_options(threads, optimization),
                                providers=["CPUExecutionProvider"])
