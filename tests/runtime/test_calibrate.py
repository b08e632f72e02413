"""Calibrated plan costs: the cache, the fallback, and how costs enter a plan."""

from __future__ import annotations

import importlib
import json

import pytest

from edgestack.package import Package
from edgestack.runtime import DEFAULT_COSTS, Costs, calibrate, plan_tier
from edgestack.runtime.plan import SAFETY_FRACTION, SAFETY_MIN

cal = importlib.import_module("edgestack.runtime.calibrate")  # the module, not the function


def test_probe_failure_warns_and_uses_the_documented_constants(small_pkg, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("EDGESTACK_CACHE_DIR", str(tmp_path))

    def fail(*args):
        raise RuntimeError("probe base exited 1: boom")

    monkeypatch.setattr(cal, "_probe", fail)
    with Package.open(small_pkg) as pkg, pytest.warns(RuntimeWarning, match="boom"):
        assert calibrate(pkg) == DEFAULT_COSTS
    assert not list(tmp_path.glob("*.json"))  # nothing cached from a failed measurement


def test_measured_costs_are_cached_per_package(small_pkg, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTACK_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(package, **kw):
        calls.append(kw)
        return {"costs": {"overhead": 7 * 2**20, "decode_temp_bytes": 9.5}}

    monkeypatch.setattr(cal, "measure", fake)
    with Package.open(small_pkg) as pkg:
        first = calibrate(pkg)
        assert (first.overhead, first.decode_temp_bytes) == (7 * 2**20, 9.5)
        assert first.source.startswith("calibrated")
        files = list(tmp_path.glob("*.json"))
        assert len(files) == 1 and json.loads(files[0].read_text())["key"]["machine"]
        assert calibrate(pkg) == first and len(calls) == 1       # from the cache
        assert calibrate(pkg, threads=1).overhead == 7 * 2**20  # another setting: measured
        assert len(calls) == 2
        calibrate(pkg, refresh=True)
        assert len(calls) == 3


def test_costs_enter_the_plan_with_a_margin(small_pkg):
    with Package.open(small_pkg) as pkg:
        a = plan_tier(pkg, 0, materialize=0, costs=Costs(10 * 2**20, 8.0))
        b = plan_tier(pkg, 0, materialize=0, costs=Costs(30 * 2**20, 16.0))
    assert a.overhead_bytes == 10 * 2**20 and b.overhead_bytes == 30 * 2**20
    assert b.transient_bytes == 2 * a.transient_bytes > 0
    for p in (a, b):
        assert p.margin_bytes == max(SAFETY_MIN, int(SAFETY_FRACTION * p.expected_bytes))
        assert p.total == p.expected_bytes + p.margin_bytes
        assert p.to_dict()["costs"]["overhead"] == p.overhead_bytes
        assert "safety margin" in p.table()
