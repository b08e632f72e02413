"""Runtime: plans, loading exactly the plan, outputs per tier, re-tiering, concurrency."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from edgestack.errors import BudgetError, TargetError
from edgestack.package import Package
from edgestack.runtime import Runtime, plan_memory, plan_tier, smallest_plan

from runtime_helpers import flip_byte, peak_rss, reference_output, resident_bytes


def test_runtime_imports_no_torch_and_no_onnx(small_pkg):
    """Serving every form (mixed graph, int8 and fp32 layers, a re-tier, the plain graph)
    imports neither torch nor onnx (12.6 MiB on import)."""
    code = (
        "import sys\n"
        "import edgestack.runtime as R\n"
        f"rt = R.Runtime({str(small_pkg)!r})\n"
        "rt.infer(rt.package.golden()[0]); rt.retier(tier=0)\n"
        f"rt2 = R.Runtime({str(small_pkg)!r}, materialize=['fc1'], form='fp32')\n"
        "rt2.infer(rt.package.golden()[0])\n"
        f"rt3 = R.Runtime({str(small_pkg)!r}, materialize=0)\n"
        "rt3.infer(rt.package.golden()[0])\n"
        "print('torch' in sys.modules, 'onnx' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("materialize", [0, None])
def test_every_tier_matches_numpy_reference(small_pkg, small_model, materialize):
    """Exact forms (on the fly, fp32) compute the tier's decoded weights."""
    path, stacks = small_model
    with Runtime(small_pkg, materialize=materialize, form="fp32") as rt:
        if materialize == 0:
            assert rt.plan.materialized == frozenset()
        x = rt.package.golden()[0]["x"]
        for t, tier in enumerate(rt.package.tiers):
            rt.retier(tier=t)
            assert rt.tier == t
            ref = reference_output(stacks, dict(tier.blocks), x, path)
            got = rt.infer({"x": x})["output"]
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_modes_agree_and_self_test(small_pkg):
    x = Package.open(small_pkg).golden()[0]
    with Runtime(small_pkg, materialize=0) as a, \
            Runtime(small_pkg, materialize=3, form="fp32") as b:
        assert a.plan.materialized == frozenset() and len(b.plan.materialized) == 3
        assert set(b.plan.modes.values()) == {"fp32"} and set(a.plan.modes.values()) == {
            "on-the-fly"}
        np.testing.assert_allclose(a.infer(x)["output"], b.infer(x)["output"], rtol=1e-5,
                                   atol=1e-6)
        report = a.self_test()
        assert report["judged"] and report["passed"]
        assert all(r["ok"] and not r["missing"] and isinstance(r["max_abs"], float)
                   for r in report["outputs"].values())


def test_self_test_missing_output_is_a_failed_entry(small_pkg, monkeypatch):
    """An output the graph does not produce fails the self-test with an entry of the same
    shape as the others (a dict: callers such as ``edgestack verify`` read its keys)."""
    with Runtime(small_pkg, form="fp32") as rt:
        inputs, outputs = rt.package.golden()
        ghost = {**outputs, "ghost": np.zeros(3, np.float32)}
        monkeypatch.setattr(rt.package, "golden", lambda: (inputs, ghost))
        report = rt.self_test()
    assert report["judged"] and report["passed"] is False
    assert report["outputs"]["ghost"] == {"max_abs": None, "max_rel": None, "ok": False,
                                         "missing": True}
    assert report["outputs"]["output"]["ok"] and not report["outputs"]["output"]["missing"]
    assert all(set(r) == {"max_abs", "max_rel", "ok", "missing"}
               for r in report["outputs"].values())


def test_int8_form_is_close_and_not_judged_by_the_self_test(small_pkg):
    """int8 layers (DynamicQuantizeMatMul over the runtime's per-channel quantization of the
    tier's weight) stay within int8 error of the exact forms, mix with the other forms in one
    session, and the self-test reports them without judging (the golden outputs are exact)."""
    x = Package.open(small_pkg).golden()[0]
    with Runtime(small_pkg, materialize=0) as exact, Runtime(small_pkg) as rt:
        assert set(rt.plan.modes.values()) == {"int8"}    # the default: the fastest plan
        ref = exact.infer(x)["output"]
        got = rt.infer(x)["output"]
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert 0 < err < 0.05, err
        report = rt.self_test()
        assert report["ran"] and not report["judged"] and report["passed"] is None
        assert "int8" in report["reason"]
        res = rt.retier(tier=0)   # the int8 graph holds its weights: a new tier, a new session
        assert res.session_rebuilt and rt.tier == 0 and rt.plan.graph == "int8"
        assert not np.allclose(rt.infer(x)["output"], got)
        assert not rt.retier(tier=0).session_rebuilt      # the same blocks: the same session
    with Runtime(small_pkg, materialize=["fc1"]) as mixed:
        assert mixed.plan.modes == {"fc0": "on-the-fly", "fc1": "int8", "fc2": "on-the-fly"}
        got = mixed.infer(x)["output"]
        assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_nbits8_form_serves_every_layer_in_its_dense_graph(small_pkg):
    """The 8-bit weight-only form: the whole-graph MatMulNBits variant, close to the exact
    output (closer than int8, which also quantizes the activations); it exists only for
    every layer at once, and the package's files do not change (the weights go to a
    temporary data file)."""
    from edgestack.errors import PackageError

    x = Package.open(small_pkg).golden()[0]
    before = sorted(p.name for p in small_pkg.iterdir())
    with Runtime(small_pkg, materialize=0) as exact, Runtime(small_pkg, form="nbits8") as nb, \
            Runtime(small_pkg, form="int8") as i8:
        assert nb.plan.graph == "nbits8" and set(nb.plan.modes.values()) == {"nbits8"}
        ref = exact.infer(x)["output"]
        err = np.abs(nb.infer(x)["output"] - ref).max() / np.abs(ref).max()
        err8 = np.abs(i8.infer(x)["output"] - ref).max() / np.abs(ref).max()
        assert 0 < err < min(0.01, err8), (err, err8)
        report = nb.self_test()
        assert report["ran"] and report["passed"] is None and "nbits8" in report["reason"]
        with pytest.raises(PackageError, match="every layer"):
            plan_memory(nb.package.manifest, None, materialize=1, form="nbits8")
    assert sorted(p.name for p in small_pkg.iterdir()) == before


def test_damaged_weights_file_is_refused(small_pkg, tmp_path):
    """The weights file is hash-checked while it is read into the runtime's buffers."""
    import shutil

    from edgestack.errors import PackageError

    bad = tmp_path / "bad.pkg"
    shutil.copytree(small_pkg, bad)
    flip_byte(bad / "model.data", 5)
    with pytest.raises(PackageError, match=r"file 'model.data' is damaged: sha256 expected"):
        Runtime(bad)
    with Runtime(bad, verify=False) as rt:  # read without the check: it still serves
        assert rt.infer(rt.package.golden()[0])["output"].shape


def test_unknown_optimization_level_is_refused_before_loading(tmp_path):
    # checked first: the (missing) package is never opened
    with pytest.raises(TargetError, match="optimization must be one of"):
        Runtime(tmp_path / "no-such-package", optimization="fastest")


def test_planner_picks_largest_fitting_tier(big_pkg):
    pkg = Package.open(big_pkg)
    n = len(pkg.tiers)
    minimum = smallest_plan(pkg, 0).total
    for t in range(n):
        need = smallest_plan(pkg, t).total
        plan = plan_memory(pkg, need)
        assert plan.tier >= t and plan.total <= need
        bigger = [u for u in range(plan.tier + 1, n)
                  if smallest_plan(pkg, u).total <= need]
        assert not bigger
    assert plan_memory(pkg, minimum).tier == 0
    # more budget at the same tier: more layers materialised (less latency)
    top = plan_memory(pkg, 10**12)
    assert top.tier == n - 1 and len(top.materialized) == 4


def test_budget_below_smallest_tier(small_pkg):
    minimum = smallest_plan(Package.open(small_pkg), 0).total
    with pytest.raises(BudgetError) as err:
        Runtime(small_pkg, budget=minimum - 1, calibrate=False)
    msg = str(err.value)
    assert f"{minimum / 2**20:.1f}" in msg or f"{np.ceil(minimum / 2**20 * 10) / 10:.1f}" in msg
    assert "MiB" in msg and "--budget" in msg


def test_load_reads_exactly_the_tier_and_grow_reads_only_new(big_pkg):
    """On-the-fly layers: loading reads the tier's prefix, growing only the new records."""
    pkg = Package.open(big_pkg)
    tiers = pkg.tiers
    with Runtime(pkg, tier=0, verify=False, materialize=0) as rt:
        assert pkg.counter.bytes_read == tiers[0].bytes == rt.bytes_read
        for t in range(1, len(tiers)):
            pkg.counter.reset()
            res = rt.retier(tier=t)
            assert res.bytes_read == tiers[t].bytes - tiers[t - 1].bytes
            assert pkg.counter.ranges == [(tiers[t - 1].bytes, tiers[t].bytes)]
        pkg.counter.reset()
        rt.retier(tier=1)  # shrinking reads nothing
        assert pkg.counter.bytes_read == 0


def test_shrink_gives_memory_back(big_pkg):
    """A shrink hands the rows it drops back to the kernel: the stores' pages are no longer
    resident (counted exactly with ``mincore``), ``released_bytes`` is that count, and the
    process's RSS falls by most of it (read right after the shrink, before anything else in
    this busy test process can allocate)."""
    import psutil

    proc = psutil.Process()
    with Runtime(big_pkg, materialize=0) as rt:
        x = rt.package.golden()[0]
        ref = rt.infer(x)
        maps = [mm for st in rt._stores.values() for mm in st.maps]
        held = sum(resident_bytes(mm) for mm in maps)
        before = proc.memory_info().rss
        res = rt.retier(tier=0)
        after = proc.memory_info().rss
        left = sum(resident_bytes(mm) for mm in maps)
        out = rt.infer(x)
    # 3 of 4 block rows of every on-the-fly layer released
    assert res.released_bytes > 1.5 * 2**20
    assert held - left == res.released_bytes
    assert before - after > 0.75 * res.released_bytes
    assert set(out) == set(ref)


def test_materialised_layers_keep_no_blocks(big_pkg, small_pkg, small_model):
    """A materialised layer decodes from the mapped block file (nothing read into its store,
    nothing counted); switching it to on the fly reads its blocks then, and the weights
    decoded either way are the same."""
    pkg = Package.open(big_pkg)
    top = len(pkg.tiers) - 1
    with Runtime(pkg, verify=False, form="fp32") as rt:       # every layer fp32
        assert rt.bytes_read == 0 and pkg.counter.bytes_read == 0
        assert all(s.loaded == 0 for s in rt._stores.values())
        assert all(lp.block_bytes < 2**20 for lp in rt.plan.layers)
        out_mat = rt.infer(pkg.golden()[0])["output"]
        rt._materialize = 0                                   # now every layer on the fly
        res = rt.retier(tier=top)
        assert res.bytes_read == pkg.block_file_size and res.session_rebuilt
        np.testing.assert_allclose(rt.infer(pkg.golden()[0])["output"], out_mat, rtol=1e-4,
                                   atol=1e-4)
    path, stacks = small_model
    with Runtime(small_pkg, form="fp32", tier=1) as rt:
        for name, st in rt._stores.items():
            nb = rt.plan.blocks[name]
            np.testing.assert_allclose(rt._decode(name, nb, transposed=False, flat=True),
                                       stacks[name].decode(nb).reshape(st.info.matrix_shape),
                                       rtol=1e-5, atol=1e-6)


def test_retier_while_serving(big_pkg):
    with Runtime(big_pkg, materialize=2) as rt:
        x = rt.package.golden()[0]
        n = len(rt.package.tiers)
        refs = {}
        for t in range(n):
            rt.retier(tier=t)
            refs[t] = rt.infer(x)["output"]
        results: list[tuple[int, np.ndarray]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def serve() -> None:
            try:
                while not stop.is_set():
                    results.append(rt.infer_with_tier(x))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=serve) for _ in range(2)]
        for th in threads:
            th.start()
        seq = [0, n - 1, 1, n // 2, 0, n - 1, 2, 0]
        for t in seq * 2:
            rt.retier(tier=t)
        stop.set()
        for th in threads:
            th.join()
    assert not errors
    assert len(results) > 0
    for tier, out in results:
        np.testing.assert_array_equal(out["output"], refs[tier])
    assert len({t for t, _ in results}) >= 2


def test_budget_error_keeps_serving(small_pkg):
    with Runtime(small_pkg) as rt:
        tier = rt.tier
        with pytest.raises(BudgetError):
            rt.retier("1MB")
        assert rt.tier == tier
        rt.infer(rt.package.golden()[0])


def test_infer_input_errors(small_pkg):
    with Runtime(small_pkg) as rt:
        with pytest.raises(TargetError, match="missing"):
            rt.infer({})
        with pytest.raises(TargetError):
            rt.infer({"x": np.zeros((3, 3), np.float32)})


def test_peak_rss_within_budget_and_plan(big_pkg, calib_cache):
    """Budgets planned with this machine's calibrated costs hold in fresh processes.

    The calibration measures the top tier with every layer materialised and tier 0 with every
    layer on the fly; the budgets checked here are other plans (a middle tier, mixed modes),
    each with 1 MiB above its plan (never exactly the plan).
    """
    from edgestack.runtime import calibrate

    base = peak_rss("base")
    assert base["torch"] is False
    pkg = Package.open(big_pkg)
    costs = calibrate(pkg)
    assert costs.source.startswith("calibrated"), costs
    assert list(calib_cache.glob("*.json")), "the calibration was not cached"
    n = len(pkg.tiers)
    plans = [smallest_plan(pkg, 0, costs), plan_tier(pkg, n // 2, materialize=2, costs=costs),
             plan_tier(pkg, n - 1, materialize=1, costs=costs)]
    for plan in plans:
        budget = plan.total + 2**20
        run = peak_rss("run", str(big_pkg), str(budget))
        assert run["plan"] == plan.total or run["tier"] >= plan.tier, (run, plan.tier)
        increase = run["hwm"] - base["hwm"]
        assert increase <= budget, (increase, budget, run)
        # within 15% of the plan on this 20 MiB model, whose 3 MiB minimum margin alone is
        # 13% of it (MiniLM's test and bench hold 0.9)
        assert increase >= 0.85 * run["plan"], (increase, run["plan"], run)


def test_table_metadata_outside_the_weights_file_is_refused(tmp_path):
    """A table entry the packer did not write (offset past the weights file, a missing
    field) is refused with a PackageError naming the table, before anything is served."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgestack.errors import PackageError
    from edgestack.package import Package
    from edgestack.packer.pack import pack

    table = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),
         helper.make_node("Identity", ["e"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])],
        initializer=[numpy_helper.from_array(table, "emb")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]),
              tmp_path / "g.onnx")
    pkg = pack(tmp_path / "g.onnx", tmp_path / "g.pkg").path
    man = json.loads((pkg / "manifest.json").read_text())
    spec = man["runtime"]["gathered"]
    assert list(spec) == ["emb"] and spec["emb"]["lookups"] == [["ids", "e"]]
    ids = np.array([[299, 0, 5, 5, 17, 200, 1, 2]])
    with Runtime(pkg) as rt:
        np.testing.assert_array_equal(rt.infer({"ids": ids})["y"], table[ids])
        with pytest.raises(TargetError, match=r"ids must be in \[0, 300\)"):
            rt.infer({"ids": ids + 1})
    size = (pkg / "model.data").stat().st_size
    good = spec["emb"]
    for bad, match in (({**good, "offset": size}, "a table inside the weights file"),
                       ({k: v for k, v in good.items() if k != "dtype"}, "key 'dtype'"),
                       ({**good, "shape": [300, 65]}, "a table inside the weights file")):
        man["runtime"]["gathered"]["emb"] = bad
        (pkg / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(PackageError, match=rf"runtime.gathered\['emb'\].*{match}"):
            Package.open(pkg)


def test_dense_plan_without_its_data_layout_is_refused(small_pkg, tmp_path):
    """A manifest whose site lacks the dense graph's data layout (an older packer, an edit)
    is refused with the layer and the field, and nothing is served."""
    import json
    import shutil

    from edgestack.errors import PackageError

    pkg = tmp_path / "p"
    shutil.copytree(small_pkg, pkg)
    man = json.loads((pkg / "manifest.json").read_text())
    del man["layers"]["fc1"]["graph"]["site"]["files"]["int8"]
    (pkg / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PackageError, match=r"'fc1'.*site\.files\.int8"):
        Runtime(pkg, form="int8", verify=False)
    with Runtime(pkg, form="fp32", verify=False) as rt:    # the other dense graphs still serve
        assert rt.plan.graph == "fp32" and rt.infer(rt.package.golden()[0])["output"].size


def test_dense_data_file_on_a_memory_filesystem_warns(small_pkg, tmp_path, monkeypatch):
    """The dense graph's data file belongs on a disk: on a tmpfs its bytes would sit in memory
    outside the plan, so the runtime says so (and still serves)."""
    import edgestack.runtime.runtime as R

    assert R.fs_type("/") != "" and R.fs_type("/nonexistent/deeper") == R.fs_type("/")
    monkeypatch.setattr(R, "fs_type", lambda path: "tmpfs")
    with pytest.warns(RuntimeWarning, match="TMPDIR"), Runtime(small_pkg, form="int8") as rt:
        assert rt.plan.graph == "int8"
