"""The packer (edgestack.packer.pack) and runtime-level checks of bad packages."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgestack.errors import EdgestackError, PackageError
from edgestack.package import Package, extract_archive
from edgestack.packer.pack import TABLE_MIN_BYTES, choose_tiers, pack

# runtime_helpers: tests/runtime, put on sys.path by conftest.py (which also brings in the
# small_model and small_pkg fixtures)
from runtime_helpers import CREATED, flip_byte, importance_order, synthetic_onnx


def copy_pkg(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy.pkg"
    shutil.copytree(src, dest)
    return dest


def test_manifest_blocks_in_importance_order(small_pkg, small_model):
    _path, stacks = small_model
    with Package.open(small_pkg) as pkg:
        pkg.verify()
        man = pkg.manifest
        assert man.target == "ort-cpu"
        assert [(r.layer, r.block) for r in pkg.block_index] == importance_order(stacks)
        assert set(pkg.files) == {"model.onnx", "model.mixed.onnx", "model.int8.onnx",
                                  "model.fp32.onnx", "model.nbits8.onnx",
                                  "model.data", "blocks.bin", "golden/inputs.npz",
                                  "golden/outputs.npz"}
        assert pkg.files["model.mixed.onnx"].role == pkg.files["model.int8.onnx"].role == (
            "variant")
        views = pkg.views_of(pkg.read_prefix(0, pkg.block_file_size), 0)
        for name, st in stacks.items():
            mine = [v for v in views if v.layer == name]
            np.testing.assert_array_equal(np.stack([v.signs for v in mine]), st.signs)
            np.testing.assert_array_equal(np.stack([v.u for v in mine]), st.u)
            np.testing.assert_array_equal(np.stack([v.v for v in mine]), st.v)
            graph = pkg.layers[name].graph
            assert graph.signs == f"{name}.weight_module.signs"
            assert graph.output == f"w_{name}" and graph.torch_layer == name
            assert graph.site.kind == "gemm" and graph.site.int8  # Gemm transB=1
            assert set(graph.site.files) == {"int8", "nbits8", "fp32"}
        # tiers: block 0 of every layer first, then every level boundary is a tier
        counts = [t.n_records for t in pkg.tiers]
        assert counts[0] == len(stacks) and counts[-1] == sum(s.n_blocks for s in stacks.values())
        assert {3, 6, 9} <= set(counts)
        assert man.golden is not None and man.golden.tier == len(pkg.tiers) - 1
        assert man.runtime.order_source == "model" and man.runtime.activation_bytes > 0
        assert man.runtime.weights_file == "model.data" and man.metadata["profile"] is None
        graph = onnx.load_from_string(pkg.read_file("model.onnx"))
    inputs = {vi.name: vi for vi in graph.graph.input}
    dim = inputs["fc0.weight_module.signs"].type.tensor_type.shape.dim[0]
    assert dim.dim_param.startswith("nb_")
    assert not any(t.name.endswith(("signs", ".u", ".v")) for t in graph.graph.initializer)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)


def test_archive_form_holds_the_same_files(tmp_path, small_model, small_pkg):
    tar = tmp_path / "mlp.tar"
    pack(small_model[0], tar, created=CREATED)
    with Package.open(tar) as a, Package.open(small_pkg) as d:
        assert a.is_archive
        assert a.manifest.files == d.manifest.files
    from edgestack.runtime import Runtime

    with Runtime(tar, form="fp32") as rt:
        assert rt.self_test()["passed"]


def test_pack_is_deterministic_and_refuses_existing(tmp_path, small_model, small_pkg):
    again = tmp_path / "again.pkg"
    pack(small_model[0], again, created=CREATED)
    for name in ("manifest.json", "blocks.bin", "model.onnx", "model.data"):
        assert (again / name).read_bytes() == (small_pkg / name).read_bytes()
    with pytest.raises(PackageError, match="already exists"):
        pack(small_model[0], again)


def test_missing_order_falls_back_to_level_major(tmp_path, caplog):
    path = tmp_path / "noorder.onnx"
    stacks = synthetic_onnx(path, order=False)
    result = pack(path, tmp_path / "p.pkg")
    assert result.order_source == "level-major" and result.warnings
    assert "level-major" in caplog.text
    with Package.open(tmp_path / "p.pkg") as pkg:
        order = [(r.layer, r.block) for r in pkg.block_index]
    assert order == [(n, b) for b in range(3) for n in stacks]


def test_unsupported_target_and_bad_source(tmp_path, small_model, monkeypatch):
    import tempfile

    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))   # pack's work folder goes here
    with pytest.raises(PackageError, match="ort-cpu"):
        pack(small_model[0], tmp_path / "x.pkg", target="tensorrt-gpu")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(PackageError, match="ONNX"):
        pack(bad, tmp_path / "y.pkg")
    assert not (tmp_path / "x.pkg").exists() and not (tmp_path / "y.pkg").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    assert not list(work.iterdir())                        # nothing left half-written
    # a failure after the package writer has begun leaves nothing behind either
    from edgestack.package.writer import PackageWriter

    def broken(*_a, **_k):
        raise PackageError("golden files cannot be written")

    monkeypatch.setattr(PackageWriter, "add_golden", broken)
    with pytest.raises(PackageError, match="golden files"):
        pack(small_model[0], tmp_path / "z.pkg")
    assert not (tmp_path / "z.pkg").exists()
    assert not list(tmp_path.glob(".*tmp*")) and not list(work.iterdir())


def test_non_bitstack_model_gives_one_tier(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 8), np.float32) * 0.5, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "dense",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              initializer=[w])
    path = tmp_path / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    pack(path, tmp_path / "d.pkg")
    from edgestack.runtime import Runtime

    with Runtime(tmp_path / "d.pkg") as rt:
        assert len(rt.package.tiers) == 1 and not rt.plan.layers
        assert rt.self_test()["passed"]


@pytest.mark.parametrize("vocab,dim", [(128, 1), (8192, 16)])   # 512 B inline; 512 KiB
@pytest.mark.parametrize("tied", ["float", "int8"])
def test_a_tied_table_is_one_copy_float_or_int8(tmp_path, vocab, dim, tied):
    """A table read by a Gather and as a Gemm's B (a tied LM head), inline or in the weights
    file: ``tied_tables="float"`` packs it as an overridable initializer (ONNX Runtime does
    not prepack it into a second copy); ``"int8"`` stores it int8 per row, the lookups
    pre-gathered by the runtime and the head on DynamicQuantizeMatMul, with the source
    model's outputs within the int8 error."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgestack.runtime import Runtime

    table = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
             helper.make_node("Reshape", ["e", "shape"], ["h"]),
             helper.make_node("Gemm", ["h", "table"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, vocab])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([4, dim], np.int64), "shape")])
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    pack(path, tmp_path / "t.pkg", tied_tables=tied)
    so = ort.SessionOptions()
    so.log_severity_level = 3   # ORT warns about every overridable initializer
    ids = np.array([[1, 7, 42, 99]], np.int64)
    want = ort.InferenceSession(str(path), so).run(None, {"ids": ids})[0]
    with Runtime(tmp_path / "t.pkg") as rt, rt.pinned() as st:
        got = rt.infer({"ids": ids})["logits"]
        shared = [v.name for v in st.session.get_overridable_initializers()]
        assert rt.self_test()["passed"]
        gathered = set(rt.package.manifest.runtime.gathered)
    inits = {t.name for t in onnx.load(str(tmp_path / "t.pkg" / "model.onnx"),
                                       load_external_data=False).graph.initializer}
    if tied == "float":
        assert shared == ["table"] and not gathered and "table" in inits
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:   # int8 weights and activations: a few percent of the largest logit at most
        assert shared == [] and "table" not in inits
        assert {"table.head_q", "table.head_scale", "table.row_scale"} <= inits
        # the row codes: read by lookups only, so pre-gathered where large enough
        assert ("table.int8" in gathered) == (vocab * dim >= TABLE_MIN_BYTES) != (
            "table.int8" in inits)
        assert 0 < np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    with pytest.raises(PackageError, match="tied_tables must be 'int8' or 'float'"):
        pack(path, tmp_path / "u.pkg", tied_tables="fp16")
    if tied == "int8" and dim == 1:   # a compiled package keeps the table as lowered
        from edgestack.pipeline import compile_model

        compile_model(path, "ort-cpu", tmp_path / "c.pkg", tied_tables=tied)
        assert "table" in {t.name for t in onnx.load(str(tmp_path / "c.pkg" / "model.onnx"),
                                                     load_external_data=False).graph.initializer}
        with Runtime(tmp_path / "c.pkg") as rt:
            assert rt.self_test()["passed"]


def test_external_weights_stay_lazy_and_a_missing_data_file_is_named(tmp_path, small_model):
    import onnx_ir as ir

    from edgestack.packer.pack import read_onnx

    src = tmp_path / "ext" / "mlp.onnx"
    src.parent.mkdir()
    ir.save(ir.load(small_model[0]), src, external_data="mlp.onnx.data")
    model = read_onnx(src, lambda _m: None)   # weights stay in their file until written
    assert all(isinstance(v.const_value, ir.ExternalTensor)
               for v in model.graph.initializers.values() if v.const_value.nbytes > 256)
    pack(src, tmp_path / "p.pkg", created=CREATED)
    with Package.open(tmp_path / "p.pkg") as pkg:
        from edgestack.packer.graphcheck import check_graphs

        pkg.verify()
        assert len(check_graphs(pkg)) == 5
    (src.parent / "mlp.onnx.data").unlink()
    with pytest.raises(PackageError, match=r"mlp\.onnx\.data.*missing next to it"):
        pack(src, tmp_path / "q.pkg")
    assert not (tmp_path / "q.pkg").exists()


def test_unnamed_and_repeated_node_names_get_unique_names(tmp_path, small_model):
    m = onnx.load(str(small_model[0]))
    for i, node in enumerate(m.graph.node):   # ONNX allows both
        node.name = "" if i % 2 else "same"
    path = tmp_path / "anon.onnx"
    onnx.save(m, path)
    pack(path, tmp_path / "p.pkg", created=CREATED)
    from edgestack.packer.graphcheck import check_graphs
    from edgestack.runtime import Runtime

    with Package.open(tmp_path / "p.pkg") as pkg:
        nodes = [info.graph.node for info in pkg.layers.values()]
        assert len(set(nodes)) == len(nodes) == 3 and all(nodes)
        check_graphs(pkg)       # each names its layer's BitStackWeight node, in every graph
    with Runtime(tmp_path / "p.pkg", form="fp32") as rt:
        assert rt.self_test()["passed"]


def test_choose_tiers_level_boundaries():
    layers = {"a": 2, "b": 2, "c": 2}
    order = [("c", 0), ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("c", 1)]
    counts = choose_tiers(order, layers, steps_per_level=3)
    assert counts[0] == 3 and counts[-1] == 6 and counts == sorted(set(counts))
    assert choose_tiers(order, layers, steps_per_level=1) == [3, 6]


# ---- runtime-level checks of damaged packages ------------------------------------------


@pytest.mark.parametrize("name", ["blocks.bin", "model.data", "model.onnx"])
def test_one_changed_byte_is_refused_naming_the_file(tmp_path, small_pkg, name):
    from edgestack.runtime import Runtime

    bad = copy_pkg(small_pkg, tmp_path)
    flip_byte(bad / name, 100)
    with pytest.raises(PackageError, match=name.replace(".", r"\.")) as err:
        Runtime(bad)
    assert "sha256" in str(err.value)


def test_truncated_block_file_is_refused(tmp_path, small_pkg):
    from edgestack.runtime import Runtime

    bad = copy_pkg(small_pkg, tmp_path)
    data = (bad / "blocks.bin").read_bytes()
    (bad / "blocks.bin").write_bytes(data[:-100])
    with pytest.raises(PackageError, match="blocks.bin"):
        Runtime(bad, verify=False)


def test_unknown_schema_version_is_refused(tmp_path, small_pkg):
    from edgestack.runtime import Runtime

    bad = copy_pkg(small_pkg, tmp_path)
    man = json.loads((bad / "manifest.json").read_text())
    man["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PackageError, match="schema"):
        Runtime(bad)


def test_archive_escaping_paths_is_refused(tmp_path, small_pkg):
    from edgestack.runtime import Runtime

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name in ["manifest.json", "model.onnx"]:
            data = (small_pkg / name).read_bytes()
            info = tarfile.TarInfo(name if name == "manifest.json" else "../" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(PackageError):
        Runtime(evil)
    with pytest.raises(PackageError):
        extract_archive(evil, tmp_path / "out")
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "out").exists()


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**60), st.text(max_size=8),
                    st.lists(st.integers(0, 9), max_size=3), st.dictionaries(
                        st.text(max_size=4), st.integers(0, 9), max_size=2))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(["tiers", "layers", "order", "files", "metadata",
                                      "golden", "0", "fc0", "graph", "runtime", "site",
                                      "files", "int8", "q", "activation_bytes", "size",
                                      "shape", "rank", "signs", "output", "kind", "prefix",
                                      "weights_file", "rows_per_call"]),
                     min_size=1, max_size=5),
       value=_VALUES)
def test_fuzz_manifest_runtime_raises_only_edgestack_errors(tmp_path_factory, small_pkg,
                                                            path, value):
    from edgestack.runtime import Runtime, plan_memory

    man = json.loads((small_pkg / "manifest.json").read_text())
    node = man
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            break
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    bad = tmp_path_factory.mktemp("fuzz") / "p"
    shutil.copytree(small_pkg, bad)
    (bad / "manifest.json").write_text(json.dumps(man))
    try:
        with Package.open(bad) as pkg:
            plan_memory(pkg, 10**10)
        with Runtime(bad) as rt:
            rt.infer(rt.package.golden()[0])
    except EdgestackError:
        pass
