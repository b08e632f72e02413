"""The live-memory watcher: follows a (fake) free-memory source up and down."""

from __future__ import annotations

import time

from edgestack.package import Package
from edgestack.runtime import Runtime, plan_tier
from edgestack.runtime.watch import Watcher


def test_watcher_grows_and_shrinks_with_free_memory(big_pkg):
    pkg = Package.open(big_pkg)
    n = len(pkg.tiers)
    small = min(plan_tier(pkg, 0, materialize=j).total for j in range(5))
    large = min(plan_tier(pkg, n - 1, materialize=j).total for j in range(5))
    with Runtime(big_pkg, budget=small) as rt:
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
    assert rt.watcher is not None and rt.watcher._thread.is_alive()
    rt.close()
    assert rt.watcher is None
