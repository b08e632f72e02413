"""The runtime serving packages with OpenVINO (engine="openvino", target openvino-cpu)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgestack.errors import TargetError
from edgestack.package import Package
from edgestack.runtime import Runtime, calibrate, plan_memory

from runtime_helpers import peak_rss, small_model, small_pkg  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def ov_pkg(tmp_path_factory, small_model):  # noqa: F811 - the fixture above
    """``small_model`` packed for the openvino-cpu target."""
    from edgestack.packer.pack import pack

    out = tmp_path_factory.mktemp("ov_pkg") / "mlp.pkg"
    pack(small_model[0], out, target="openvino-cpu")
    return out


def _x(pkg):
    return Package.open(pkg).golden()[0]


@pytest.mark.parametrize("form", ["fp32", "nbits8", "int8"])
def test_openvino_serves_each_dense_form_as_onnxruntime_does(small_pkg, form):  # noqa: F811
    x = _x(small_pkg)
    with Runtime(small_pkg, form=form, materialize=3, verify=False) as ort_rt:
        ref = ort_rt.infer(x)
        assert ort_rt.plan.graph == form and ort_rt.engine == "onnxruntime"
    with Runtime(small_pkg, form=form, engine="openvino", precision="f32") as rt:
        assert rt.engine == "openvino" and rt.plan.graph == form
        assert len(rt.plan.materialized) == len(rt.package.layers)
        got = rt.infer(x)
    assert set(got) == set(ref)
    for name in ref:
        # int8: ORT quantizes activations per call, OpenVINO its own way; the rest in f32
        tol = 0.05 if form == "int8" else 1e-4
        peak = float(np.abs(ref[name]).max())
        assert float(np.abs(got[name] - ref[name]).max()) <= tol * peak, (form, name)


def test_openvino_self_test_judged_in_f32_only(small_pkg):  # noqa: F811
    with Runtime(small_pkg, engine="openvino", precision="f32", form="fp32") as rt:
        report = rt.self_test()
    assert report["judged"] and report["passed"] is True
    with Runtime(small_pkg, engine="openvino", precision="bf16", form="fp32") as rt:
        report = rt.self_test()
    assert not report["judged"] and report["passed"] is None
    assert "bf16" in report["reason"]


def test_openvino_retier_rebuilds_the_dense_graph_at_the_new_tier(small_pkg, small_model):  # noqa: F811
    x = _x(small_pkg)
    top = len(Package.open(small_pkg).tiers) - 1
    with Runtime(small_pkg, tier=0, form="fp32", verify=False) as ort_rt:
        ref0 = ort_rt.infer(x)
    with Runtime(small_pkg, engine="openvino", precision="f32", form="fp32") as rt:
        assert rt.tier == top
        top_out = rt.infer(x)
        res = rt.retier(tier=0)
        assert res.new_tier == 0 and res.session_rebuilt
        low = rt.infer(x)
    for name in ref0:
        assert np.allclose(low[name], ref0[name], rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(low[n], top_out[n]) for n in top_out)


def test_openvino_engine_errors(small_pkg):  # noqa: F811
    with pytest.raises(TargetError, match="engine must be"):
        Runtime(small_pkg, engine="tvm")
    with pytest.raises(TargetError, match="precision"):
        Runtime(small_pkg, precision="bf16")              # onnxruntime has no precision
    with pytest.raises(TargetError, match="precision"):
        Runtime(small_pkg, engine="openvino", precision="int4")
    with pytest.raises(TargetError, match="dense graphs only"):
        Runtime(small_pkg, engine="openvino", graph="mixed")
    with pytest.raises(TargetError, match="dense graphs only"):
        Runtime(small_pkg, engine="openvino", materialize=0)


def test_openvino_cpu_package_defaults_to_openvino_and_verifies(ov_pkg, capsys):
    from edgestack.cli import main

    assert json.loads((ov_pkg / "manifest.json").read_text())["target"] == "openvino-cpu"
    with Runtime(ov_pkg) as rt:
        assert rt.engine == "openvino"
        assert rt.plan.graph == "fp32"             # no budget: the most exact dense form
    assert main(["verify", str(ov_pkg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["self_test"]["judged"]
    assert main(["plan", str(ov_pkg), "--json", "--no-calibrate"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "openvino"
    assert main(["run", str(ov_pkg), "--json", "--engine", "onnxruntime"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "onnxruntime"


def test_openvino_plans_hold_in_fresh_processes(big_pkg, calib_cache):
    """An OpenVINO package's budgets, planned with OpenVINO's calibrated costs, hold: three
    budgets (each dense form's plan + 1 MiB) in fresh processes over a baseline that has
    imported openvino."""
    pkg = Package.open(big_pkg)
    costs = calibrate(pkg, engine="openvino")
    assert costs.source.startswith("calibrated") and costs.overhead_fp32 is not None
    base = peak_rss("base", engine="openvino")["hwm"]
    plans = {form: plan_memory(pkg, None, form=form, dense=True, costs=costs)
             for form in ("int8", "nbits8", "fp32")}
    assert plans["int8"].total < plans["nbits8"].total < plans["fp32"].total
    for form, plan in plans.items():
        budget = plan.total + 2**20
        chosen = plan_memory(pkg, budget, dense=True, costs=costs)
        # auto: the most exact form that fits (the fp32 plan may fit nbits8's budget: in bf16
        # OpenVINO keeps its weights as float16)
        exact = next(f for f in ("fp32", "nbits8", "int8") if plans[f].total <= budget)
        assert chosen.graph == exact, (form, chosen.graph)
        run = peak_rss("run", str(big_pkg), str(budget), engine="openvino")
        increase = run["hwm"] - base
        assert increase <= budget, (form, increase, budget, run)
        assert increase >= 0.5 * run["plan"], (form, increase, run)
