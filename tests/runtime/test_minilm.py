"""MiniLM BitStack package: peak RSS vs budget and plan, in fresh processes.

The package is built here (3 blocks, no activation-aware scaling: about a minute on 2
cores); bench/runtime_budgets.py measures the 6-block package the README cites.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgestack.package import Package
from edgestack.runtime import plan_tier, smallest_plan

from runtime_helpers import peak_rss


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory) -> Path:
    """MiniLM (seq 128) with BitStack encoder layers, exported (3 blocks, plain signs)."""
    from edgestack import zoo
    from edgestack.compress import compress
    from edgestack.exporter import export

    model, inputs = zoo.minilm(seq=128)
    compress(model, "bitstack", calib=[inputs], n_blocks=3, act_aware=False, skip=["pooler"])
    out = tmp_path_factory.mktemp("minilm") / "minilm-bitstack-3.onnx"
    export(model, inputs, out, parity=False)
    return out


@pytest.fixture(scope="module")
def minilm_package(minilm_onnx: Path) -> Path:
    from edgestack.packer.pack import pack

    return pack(minilm_onnx, minilm_onnx.with_suffix(".pkg"), log=lambda m: None).path


@pytest.mark.slow
@pytest.mark.parametrize("materialize", [0, 100])
def test_minilm_top_tier_equals_the_exported_model(minilm_onnx: Path, minilm_package: Path,
                                                   materialize: int):
    """The runtime's session (weights handed over without a copy, BitStack inputs fed per
    call, ORT's fusions on) computes what ONNX Runtime computes on the exported file."""
    import numpy as np
    import onnxruntime as ort

    from edgestack.runtime import Runtime

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1000, 5000, (1, 128)).astype(np.int64),
             "attention_mask": np.ones((1, 128), np.int64)}
    ref = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"]
                               ).run(None, feeds)
    with Runtime(minilm_package, materialize=materialize, form="fp32") as rt:
        assert rt.tier == len(rt.package.tiers) - 1
        got = list(rt.infer(feeds).values())
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_minilm_dense_graphs_and_the_auto_form(minilm_package: Path):
    """The int8 graph is one DynamicQuantizeMatMul per layer, or per query/key/value group,
    with the Linear biases taken in (no bias Add left on its outputs); with memory for every
    layer float32 the planner serves the fp32 graph (the tier's exact weights), with less the
    8-bit weight-only graph, with less int8; each further from float32 than the one before, all
    close."""
    import numpy as np
    import onnx

    from edgestack.runtime import Runtime

    graph = onnx.load(str(minilm_package / "model.int8.onnx"), load_external_data=False).graph
    dq = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    with Package.open(minilm_package) as pkg:
        layers, top = len(pkg.layers), len(pkg.tiers) - 1
        exact = plan_tier(pkg, top, materialize=layers, form="fp32")
        weight_only = plan_tier(pkg, top, form="nbits8")
        x = pkg.golden()[0]
    # attention's query, key and value read one input: one fused matmul and a Split per block
    splits = [n for n in graph.node if n.op_type == "Split"]
    assert len(splits) == 6 and len(dq) == layers - 2 * len(splits)
    assert all(len(n.output) == 3 and n.input[0] in {o for d in dq for o in d.output}
               for n in splits)
    with Package.open(minilm_package) as pkg:
        fused = [f for f in (i.graph.site.files["int8"] for i in pkg.layers.values())
                 if "q_cols" in f]
    assert len(fused) == 18 and {tuple(f["q_cols"])[2] for f in fused} == {3 * 384}
    outs = {o for n in dq for o in n.output}
    biases = {t.name for t in graph.initializer if len(t.dims) == 1}
    assert not [n for n in graph.node if n.op_type == "Add" and set(n.input) & outs
                and set(n.input) & biases]
    assert sum(len(n.input) == 5 and bool(n.input[4]) for n in dq) == len(dq)
    assert exact.graph == "fp32" and weight_only.graph == "nbits8"
    assert weight_only.total < exact.total
    got = {}
    for budget, graph_name in ((exact.total + 2**20, "fp32"),
                               (weight_only.total + 2**20, "nbits8"),
                               (weight_only.total - 2**20, "int8")):
        with Runtime(minilm_package, budget, calibrate=False) as rt:
            assert rt.plan.graph == graph_name and rt.tier == top
            assert set(rt.plan.modes.values()) == {graph_name}
            got[graph_name] = rt.infer(x)["last_hidden_state"][0].mean(0)

    def cos(a: str, b: str) -> float:
        return float(got[a] @ got[b] / np.linalg.norm(got[a]) / np.linalg.norm(got[b]))

    assert 0.99 < cos("fp32", "int8") < cos("fp32", "nbits8") < 1.0


@pytest.mark.slow
def test_minilm_peak_rss_within_budget_and_plan(minilm_package: Path, calib_cache: Path):
    """Budgets planned with this machine's calibrated costs (as the runtime plans them) hold
    in fresh processes, 1 MiB above the plan (never exactly at it), within 10% of the plan."""
    from edgestack.runtime import calibrate

    PKG = minilm_package
    pkg = Package.open(PKG)
    n, layers = len(pkg.tiers), len(pkg.layers)
    costs = calibrate(pkg)
    assert costs.source.startswith("calibrated"), costs

    def best(t: int) -> int:
        return smallest_plan(pkg, t, costs).total

    base = peak_rss("base")["hwm"]
    lo, hi = best(0), plan_tier(pkg, n - 1, materialize=layers, costs=costs).total
    for budget in (lo + 2**20, (lo + hi) // 2, hi + 2**20):
        run = peak_rss("run", str(PKG), str(budget))
        increase = run["hwm"] - base
        assert run["tier"] == max(t for t in range(n) if best(t) <= budget)
        assert increase <= budget, (increase, budget, run)
        assert increase >= 0.9 * run["plan"], (increase, run)  # the promise is <= budget (above)
