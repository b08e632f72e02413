"""MiniLM BitStack package (built and cached by bench/runtime_budgets.py): peak RSS vs plan.

Skipped unless the cached package exists (``.venv/bin/python bench/runtime_budgets.py
--build-only`` builds it in about 2 minutes); then it runs in about 20 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgestack.package import Package
from edgestack.runtime import plan_tier
from runtime_helpers import peak_rss

PKG = Path(__file__).resolve().parents[2] / ".cache" / "runtime_bench" / "minilm-bitstack-6.pkg"


@pytest.mark.skipif(not PKG.exists(), reason="run bench/runtime_budgets.py --build-only first")
def test_minilm_peak_rss_within_budget_and_plan():
    pkg = Package.open(PKG)
    n, layers = len(pkg.tiers), len(pkg.layers)

    def best(t: int) -> int:
        return min(plan_tier(pkg, t, materialize=j).total for j in range(layers + 1))

    base = peak_rss("base")["hwm"]
    lo, hi = best(0), plan_tier(pkg, n - 1, materialize=layers).total
    for budget in (lo + 2**20, (lo + hi) // 2, hi + 2**20):
        run = peak_rss("run", str(PKG), str(budget))
        increase = run["hwm"] - base
        assert run["tier"] == max(t for t in range(n) if best(t) <= budget)
        assert increase <= budget
        assert abs(increase / run["plan"] - 1) <= 0.10
