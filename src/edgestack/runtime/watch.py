"""Follow live memory: re-tier a :class:`~edgestack.runtime.Runtime` as free memory changes.

Every ``interval`` seconds the watcher computes the budget this process could use now: the
``--auto`` budget (:func:`~edgestack.runtime.budget.available_memory`, available memory and the
cgroup limit minus the safety margin) **plus** what the runtime's current plan already holds
(that memory is ours to re-use). When the plan for that budget has another tier than the one
served, it calls :meth:`Runtime.retier`. With ``hysteresis`` it grows only when the larger
tier fits with that many spare bytes, so it does not flap at a tier boundary. A budget below
the smallest tier keeps the smallest tier (the event is recorded). Events are kept in
``watcher.events`` (time, old tier, new tier, budget).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edgestack.errors import BudgetError
from edgestack.runtime.budget import available_memory


class Watcher:
    """A daemon thread that re-tiers ``runtime`` to follow live memory (see module doc)."""

    def __init__(self, runtime: Any, interval: float = 1.0, *, hysteresis: int = 8 * 2**20,
                 source: Callable[[], int] | None = None) -> None:
        self.runtime = runtime
        self.interval = float(interval)
        self.hysteresis = int(hysteresis)
        self.source = source or (lambda: int(available_memory()["budget"]))
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgestack-watcher",
                                        daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=max(5.0, 2 * self.interval))

    def check(self) -> dict[str, Any] | None:
        """One step: re-tier when the live budget calls for another tier; the event or None."""
        rt = self.runtime
        current = rt.plan
        budget = self.source() + current.total
        try:
            plan = rt.plan_for(budget)  # with the runtime's settings, as retier plans
        except BudgetError as exc:
            event = {"time": time.time(), "old_tier": rt.tier, "new_tier": rt.tier,
                     "budget": budget, "note": str(exc)}
            self.events.append(event)
            if rt.tier > 0:
                rt.retier(tier=0)
                event["new_tier"] = 0
            return event
        if plan.tier == rt.tier:
            return None
        if plan.tier > rt.tier and plan.total + self.hysteresis > budget:
            return None
        old = rt.tier
        rt.retier(budget)
        event = {"time": time.time(), "old_tier": old, "new_tier": rt.tier, "budget": budget}
        self.events.append(event)
        return event

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # keep serving; record the problem
                self.events.append({"time": time.time(), "error": repr(exc)})


__all__ = ["Watcher"]
