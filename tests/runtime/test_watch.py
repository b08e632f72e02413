"""The live-memory watcher: follows a (fake) free-memory source up and down."""

from __future__ import annotations

import time

from edgestack.package import Package
from edgestack.runtime import Runtime, plan_memory, plan_tier, smallest_plan
from edgestack.runtime.watch import Watcher


def test_watcher_grows_and_shrinks_with_free_memory(big_pkg):
    pkg = Package.open(big_pkg)
    n = len(pkg.tiers)
    small = smallest_plan(pkg, 0).total
    large = smallest_plan(pkg, n - 1).total
    with Runtime(big_pkg, budget=small, calibrate=False) as rt:
        assert rt.tier == 0
        free = {"bytes": large + 64 * 2**20}
        w = Watcher(rt, interval=0.05, hysteresis=0, source=lambda: free["bytes"])
        event = w.check()  # plenty free: grow to the top
        assert event and rt.tier == n - 1
        free["bytes"] = 0  # memory pressure: only what the runtime holds is left
        assert w.check() is None  # the current plan still fits what it holds
        free["bytes"] = -(rt.plan.total - small)  # someone took memory: back to tier 0
        w.check()
        assert rt.tier == 0
        w.start()
        free["bytes"] = large + 64 * 2**20
        deadline = time.time() + 10
        while rt.tier != n - 1 and time.time() < deadline:
            rt.infer(rt.package.golden()[0])
            time.sleep(0.05)
        w.stop()
        assert rt.tier == n - 1
        assert [e for e in w.events if "error" in e] == []


def test_runtime_watch_flag_starts_and_stops(small_pkg):
    rt = Runtime(small_pkg, watch=0.05)
    watcher = rt.watcher
    assert watcher is not None and watcher._thread.is_alive()
    rt.close()
    assert rt.watcher is None
    assert not watcher._thread.is_alive()  # close() stopped the thread, not just dropped it


def test_watcher_plans_with_the_runtimes_forced_modes(big_pkg):
    """The watcher plans like retier: with the runtime's forced ``materialize`` (planning
    with the default modes, it saw a larger tier than retier can serve, and re-tiered in
    vain on every check)."""
    pkg = Package.open(big_pkg)
    forced = plan_tier(pkg, 0, materialize=0).total  # tier 0, every layer on the fly
    assert plan_memory(pkg, forced).tier > 0          # the default modes fit a larger tier
    with Runtime(big_pkg, budget=forced, materialize=0, calibrate=False) as rt:
        assert rt.tier == 0 and rt.plan.materialized == frozenset()
        assert rt.plan_for(forced).tier == 0
        w = Watcher(rt, interval=1.0, hysteresis=0, source=lambda: 0)  # only what it holds
        assert w.check() is None
        assert w.events == [] and rt.tier == 0
