"""Timed calls and their statistics: :func:`interleaved_latency` times runners round-robin,
:func:`latency_stats` summarises the times, :func:`cpu_extensions` names the CPU features
that decide int8/bf16 speed (reported next to every latency ratio). numpy and the standard
library; used by the bench, the demo and the pipeline's latency-targeted pruning."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgestack.core.runner import Runner


def cpu_extensions(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's int8 dot-product and matrix extensions that decide int8/bf16 speed
    (``avx512_vnni``, ``avx_vnni``, ``amx*``, ``avx512_bf16`` flags), comma-separated, or
    ``"none"``; ``"unknown"`` where ``cpuinfo`` cannot be read (not Linux). Latency ratios
    are reported next to it."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh
                          if line.startswith(("flags", "Features"))), [])
    except OSError:
        return "unknown"
    keep = sorted({f for f in flags
                   if f in ("avx512_vnni", "avx_vnni", "avx512_bf16") or f.startswith("amx")})
    return ",".join(keep) or "none"


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


def interleaved_latency(handles: Sequence[Runner], feeds: Mapping[str, np.ndarray], *,
                        iterations: int, warmup: int, per_round: int = 2,
                        seconds: float | None = None,
                        progress: Callable[[int, int], None] | None = None
                        ) -> list[list[float]]:
    """Call times (ms) per handle, measured round-robin: each round runs ``per_round`` calls
    of every handle, until each has ``iterations`` calls (and ``seconds`` have passed)."""
    for h in handles:
        for _ in range(warmup):
            h.infer(feeds)
    times: list[list[float]] = [[] for _ in handles]
    start = time.perf_counter()
    rounds = max(1, math.ceil(iterations / per_round))
    r = 0
    while r < rounds or (seconds is not None and time.perf_counter() - start < seconds):
        for i, h in enumerate(handles):
            for _ in range(per_round):
                t = time.perf_counter()
                h.infer(feeds)
                times[i].append((time.perf_counter() - t) * 1e3)
        r += 1
        if progress:
            progress(r, rounds)
    return times
