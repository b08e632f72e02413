"""MiniLM BitStack package: peak RSS vs budget and plan, in fresh processes.

The package is built here (3 blocks, no activation-aware scaling: about a minute on 2
cores); bench/runtime_budgets.py measures the 6-block package the README cites.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgestack.package import Package
from edgestack.runtime import plan_tier
from runtime_helpers import peak_rss



@pytest.fixture(scope="module")
def minilm_package(tmp_path_factory) -> Path:
    from edgestack.package.pack import pack

    out = tmp_path_factory.mktemp("minilm") / "minilm-bitstack-3.pkg"
    return pack("minilm", out, method="bitstack",
                options={"n_blocks": 3, "act_aware": False, "skip": ["pooler"]},
                log=lambda m: None).path


@pytest.mark.slow
def test_minilm_peak_rss_within_budget_and_plan(minilm_package: Path):
    PKG = minilm_package
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
