"""Memory against quality (and latency) over bench rows: the Pareto views of the report.

- :func:`memory_axis`: the memory rows are compared on: the measured peak RSS increase when
  every row has one, else the bytes each subject reads from disk (``--no-memory``: a
  baseline's files, a package tier's ``tier_bytes``, not the whole package); the tables and
  plots say which.
- :func:`pareto_table`: the rows sorted by memory, with quality and latency ratio; a row is
  **Pareto-optimal** when no other row has less or equal memory and higher or equal quality
  with at least one of the two strictly better, compared at the precision the table shows
  (0.01 MB, 5 decimals of quality), so float noise does not break ties and exact ties do
  not knock each other out.
- :func:`at_baseline_table`: for each baseline, edgestack's best subject within the
  baseline's memory (highest quality with memory <= the baseline's; a tie goes to the lower
  latency), its quality, and its latency ratio against that baseline (its p50 / the
  baseline's p50: below 1 is faster).

Rows are :class:`edgestack.profiler.bench.Row` (any object with ``label``, ``group``,
``peak_rss_increase``, ``disk_bytes``, ``tier_bytes`` (optional), ``cosine``, ``p50_ms`` and
``ratio``); rows without
timings (``iterations == 0``) or quality are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

BASELINE_GROUP = "baseline"
#: The precision rows are shown and compared at: MB and quality decimals.
MEMORY_DIGITS = 2
QUALITY_DIGITS = 5


def _usable(rows: Sequence[Any]) -> list[Any]:
    return [r for r in rows if r.iterations and r.cosine is not None]


READ_AXIS = "MB read from disk"
"""The memory axis without peak RSS: what each subject reads (a package tier: its tier MB)."""


def read_bytes(row: Any) -> int:
    """Bytes ``row``'s subject reads from disk: a package tier's ``tier_bytes``, else its
    ``disk_bytes`` (a baseline loads all its files)."""
    tier = getattr(row, "tier_bytes", None)
    return row.disk_bytes if tier is None else tier


def memory_axis(rows: Sequence[Any]) -> tuple[list[float], str]:
    """``(memory in MB per row, what it is)``: peak RSS increase when every row has it, else
    the bytes each subject reads from disk (:func:`read_bytes`)."""
    if rows and all(r.peak_rss_increase is not None for r in rows):
        return [r.peak_rss_increase / 1e6 for r in rows], "peak RSS increase MB"
    return [read_bytes(r) / 1e6 for r in rows], READ_AXIS


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each ``(memory, quality)``: whether no other point dominates it (<= memory and
    >= quality, one of them strictly)."""
    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dominates(q, p) for q in points) for p in points]


def _r(v: float | None, digits: int) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, digits)


def _points(rows: Sequence[Any]) -> tuple[list[Any], list[tuple[float, float]], str]:
    """Usable rows and their ``(memory MB, quality)`` at the compared precision."""
    usable = _usable(rows)
    mem, axis = memory_axis(usable)
    return usable, [(round(m, MEMORY_DIGITS), round(r.cosine, QUALITY_DIGITS))
                    for m, r in zip(mem, usable, strict=True)], axis


def pareto_table(rows: Sequence[Any]) -> dict[str, Any]:
    """``{"memory": axis name, "rows": [...]}``: rows sorted by memory (then quality,
    descending), each ``{label, group, memory_mb, cosine, p50_ms, ratio, pareto}``."""
    usable, points, axis = _points(rows)
    flags = pareto_flags(points)
    order = sorted(range(len(usable)), key=lambda i: (points[i][0], -points[i][1]))
    return {"memory": axis, "rows": [
        {"label": usable[i].label, "group": usable[i].group, "memory_mb": points[i][0],
         "cosine": points[i][1], "p50_ms": _r(usable[i].p50_ms, 3),
         "ratio": _r(usable[i].ratio, 3), "pareto": flags[i]} for i in order]}


def at_baseline_table(rows: Sequence[Any]) -> dict[str, Any]:
    """``{"memory": axis name, "rows": [...]}``, one row per baseline: ``baseline``,
    ``memory_mb``, ``cosine``, ``p50_ms``, and edgestack's ``best`` subject within that
    memory with its ``best_memory_mb``, ``best_cosine`` and ``latency_ratio`` (its p50 / the
    baseline's); ``best`` is ``None`` when no edgestack subject fits."""
    usable, points, axis = _points(rows)
    ours = [i for i, r in enumerate(usable) if r.group != BASELINE_GROUP]
    out = []
    for b, (mem, quality) in zip(usable, points, strict=True):
        if b.group != BASELINE_GROUP:
            continue
        fits = [i for i in ours if points[i][0] <= mem]
        best = max(fits, key=lambda i: (points[i][1], -usable[i].p50_ms), default=None)
        entry: dict[str, Any] = {"baseline": b.label, "memory_mb": mem, "cosine": quality,
                                 "p50_ms": _r(b.p50_ms, 3), "best": None,
                                 "best_memory_mb": None, "best_cosine": None,
                                 "latency_ratio": None}
        if best is not None:
            ratio = usable[best].p50_ms / b.p50_ms if b.p50_ms else math.nan
            entry.update(best=usable[best].label, best_memory_mb=points[best][0],
                         best_cosine=points[best][1], latency_ratio=_r(ratio, 3))
        out.append(entry)
    return {"memory": axis, "rows": out}


def _cell(v: Any, fmt: str = "") -> str:
    return "" if v is None else format(v, fmt)


def pareto_markdown(table: dict[str, Any]) -> str:
    """:func:`pareto_table` as markdown."""
    lines = [f"| subject | group | {table['memory']} | quality | p50 ms | latency ratio | "
             f"Pareto |", "| --- | --- | ---: | ---: | ---: | ---: | :---: |"]
    for r in table["rows"]:
        lines.append(f"| {r['label']} | {r['group']} | {_cell(r['memory_mb'], '.2f')} | "
                     f"{_cell(r['cosine'], '.5f')} | {_cell(r['p50_ms'], '.2f')} | "
                     f"{_cell(r['ratio'], '.3f')} | {'yes' if r['pareto'] else ''} |")
    return "\n".join(lines)


def at_baseline_markdown(table: dict[str, Any]) -> str:
    """:func:`at_baseline_table` as markdown."""
    lines = [f"| baseline | {table['memory']} | quality | edgestack's best within it | "
             f"its {table['memory']} | its quality | latency ratio vs baseline |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in table["rows"]:
        lines.append(f"| {r['baseline']} | {_cell(r['memory_mb'], '.2f')} | "
                     f"{_cell(r['cosine'], '.5f')} | {r['best'] or '(none fits)'} | "
                     f"{_cell(r['best_memory_mb'], '.2f')} | {_cell(r['best_cosine'], '.5f')} | "
                     f"{_cell(r['latency_ratio'], '.3f')} |")
    return "\n".join(lines)


__all__ = ["READ_AXIS", "at_baseline_markdown", "at_baseline_table", "memory_axis",
           "pareto_flags", "pareto_markdown", "pareto_table", "read_bytes"]
