"""PNG plots of bench results (matplotlib, headless ``Agg`` backend).

- ``latency_vs_memory.png``: p50 latency (with the p10-p90 band) against memory, one point
  per subject; memory is the measured peak RSS increase, or the bytes each subject reads
  from disk when memory was not measured (the axis label says which).
- ``quality_vs_memory.png``: quality (the bench's ``metric``) against the same memory axis;
  package tiers are joined by a line so the tier curve shows.
- ``pareto.png``: peak RSS increase (x) against quality (y), each point labelled with its
  p50 latency; the Pareto-optimal subjects (:mod:`edgestack.profiler.pareto`) are joined
  by a step line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgestack.errors import EdgestackError
from edgestack.profiler.pareto import memory_axis, pareto_flags


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise EdgestackError(f"plots need matplotlib, which cannot be imported ({exc}). "
                             f"To fix: pip install 'edgestack[bench]', or pass --no-plots."
                             ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _memory(rows: list[Any]) -> tuple[list[float], str]:
    mem, axis = memory_axis(rows)
    return mem, ("peak RSS increase (MB)" if axis.startswith("peak")
                 else "read from disk (MB; a package tier: its blocks, graph, weights)")


def plot_bench(report: Any, out_dir: str | Path) -> dict[str, str]:
    """Write the bench plots into ``out_dir``; returns ``{name: path}``."""
    plt = _pyplot()
    out = Path(out_dir)
    rows = [r for r in report.rows if r.iterations]
    files: dict[str, str] = {}
    if not rows:
        return files
    mem, xlabel = _memory(rows)
    cmap = plt.get_cmap("tab10")
    style = {r.label: (cmap(i % 10), "s" if r.group == "baseline" else "o")
             for i, r in enumerate(rows)}

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r, x in zip(rows, mem, strict=True):
        color, marker = style[r.label]
        ax.errorbar([x], [r.p50_ms], yerr=[[r.p50_ms - r.p10_ms], [r.p90_ms - r.p50_ms]],
                    fmt=marker, color=color, capsize=3, label=r.label)
    ax.legend(fontsize=7, loc="best", title="square: baseline", title_fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency p50 (ms), bars: p10..p90")
    ax.set_title("Latency vs memory (lower left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "latency_vs_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["latency_plot"] = str(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tiers = [(x, r.cosine) for r, x in zip(rows, mem, strict=True)
             if r.tier is not None and r.cosine]
    if len(tiers) > 1:
        xs, ys = zip(*sorted(tiers), strict=True)
        ax.plot(xs, ys, "-", color="tab:blue", alpha=0.6, label="package tiers")
    for r, x in zip(rows, mem, strict=True):
        if r.cosine is None:
            continue
        color, marker = style[r.label]
        ax.plot([x], [r.cosine], marker, color=color,
                label=None if r.tier is not None else r.label)
    ax.set_xlabel(xlabel)
    metric = next((r.metric for r in rows if getattr(r, "metric", "")), "")
    ax.set_ylabel("sentence-embedding cosine vs reference" if "sentence" in metric
                  else "cosine vs reference")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("Quality vs memory (upper left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "quality_vs_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["quality_plot"] = str(path)
    files["pareto_plot"] = _plot_pareto(plt, rows, style, out / "pareto.png")
    return files


def _plot_pareto(plt: Any, rows: list[Any], style: dict[str, Any], path: Path) -> str:
    """Memory against quality, each point labelled with its p50 latency; the Pareto front
    joined by a step line."""
    rows = [r for r in rows if r.cosine is not None]
    mem, xlabel = _memory(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    flags = pareto_flags([(x, r.cosine) for r, x in zip(rows, mem, strict=True)])
    front = sorted((x, r.cosine) for r, x, ok in zip(rows, mem, flags, strict=True) if ok)
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="gray", alpha=0.6, label="Pareto front")
    for r, x, ok in zip(rows, mem, flags, strict=True):
        color, marker = style[r.label]
        ax.plot([x], [r.cosine], marker, color=color, label=r.label,
                markeredgecolor="black" if ok else color)
        ax.annotate(f"{r.p50_ms:.1f} ms", (x, r.cosine), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("quality vs reference (the bench's metric)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("Memory vs quality, labels: p50 latency (upper left is better; "
                 "black edge: Pareto-optimal)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", title="square: baseline", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_quality_vs_bits(points: list[tuple[str, float, float]],
                         tiers: list[tuple[str, float, float]], path: str | Path) -> str:
    """Quality (cosine vs fp32) against bits per weight: one point per ``(label, bits,
    cosine)`` in ``points``; ``tiers`` (a package's tiers) are joined by a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (label, bits, cos) in enumerate(points):
        ax.plot([bits], [cos], "o", color=cmap(i % 10), label=label)
    if tiers:
        xs, ys = zip(*sorted((b, c) for _, b, c in tiers), strict=True)
        ax.plot(xs, ys, "s--", color="black", alpha=0.6, label="BitStack package tiers (runtime)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight of the compressed layers (log2 scale)")
    ax.set_ylabel("sentence-embedding cosine vs fp32")
    ax.set_title("Quality vs bits per weight (upper left is better)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
