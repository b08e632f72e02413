"""tensorrt-gpu: the lowered graph, Q/DQ form, shapes and build settings, without TensorRT.

Only the engine build and run need the ``tensorrt`` package and a GPU; those tests skip with
the reason when it cannot be imported (it cannot be installed on the dev/CI machines).
"""

from __future__ import annotations

import json
import py_compile
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import numpy_helper

from edgestack.errors import TargetError
from edgestack.formats import ShiftCodes
from edgestack.profiles import load_profile
from edgestack.targets import get_target
from edgestack.targets.tensorrt_gpu.support import SUPPORTED, check_graph

from targets_cases import conv_case, linear_case, random_stack

RNG = np.random.default_rng(7)


def _save(case, path: Path) -> Path:
    onnx.save(case[0], path)
    return path


@pytest.fixture(scope="module")
def lowered(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trt")
    shift = ShiftCodes.encode(RNG.standard_normal((11, 13)).astype(np.float32), 4, True)
    conv = ShiftCodes.encode(RNG.standard_normal((6, 3, 3, 3)).astype(np.float32), 3, False)
    cases = {"linear_shift": linear_case(shift, 2, 3, rng=RNG),
             "conv_shift": conv_case(conv, 1, (9, 7), 2, 2, 1, rng=RNG),
             "linear_bitstack": linear_case(random_stack(RNG, (9, 13), 2, 3), 1, 5, rng=RNG)}
    t = get_target("tensorrt-gpu")
    out = {}
    for name, case in cases.items():
        src = _save(case, root / f"{name}.onnx")
        out[name] = (t.lower(src, root / name, "jetson-orin-nano-8gb"), case)
    return out


def test_lowered_graph_has_only_tensorrt_ops_and_dtypes(lowered) -> None:
    import onnx_ir as ir

    for name, (art, _) in lowered.items():
        model = ir.load(art.path())
        assert check_graph(model) == [], name
        for node in model.graph:
            assert node.domain in ("", "ai.onnx") and node.op_type in SUPPORTED, node
        assert art.report["rejected"] == []


def test_qdq_is_symmetric_int8(lowered) -> None:
    art, _ = lowered["linear_shift"]
    model = onnx.load(str(art.path()))
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs, "shift weights should stay int8 behind a DequantizeLinear"
    inits = {i.name: i for i in model.graph.initializer}
    for dq in dqs:
        assert len(dq.input) == 2 or not numpy_helper.to_array(inits[dq.input[2]]).any()
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        assert not any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger")
                       for n in model.graph.node)


def test_lowered_graph_matches_reference_on_ort(lowered) -> None:
    """The graph TensorRT gets computes the same function (checked on ORT x86)."""
    import onnxruntime as ort

    for name, (art, case) in lowered.items():
        sess = ort.InferenceSession(str(art.path()), providers=["CPUExecutionProvider"])
        got = sess.run(None, case[1])[0]
        want = case[2]["y"]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(),
                                   err_msg=name)


def test_build_settings_and_script(lowered, tmp_path) -> None:
    art, _ = lowered["linear_shift"]
    build = art.report["build"]
    prof = load_profile("jetson-orin-nano-8gb")
    assert build["precision"] == prof.precision
    if prof.precision == "fp16":
        assert "FP16" in build["flags"]
    assert build["profile"] == {}           # static shapes: no optimization profile needed
    py_compile.compile(str(art.path("build_script")), doraise=True)
    assert json.loads(art.path("report").read_text())["rejected"] == []
    assert art.report["engine_built"] is False or "engine" in art.files


def test_weight_streaming_from_memory_budget_and_dynamic_shapes(tmp_path) -> None:
    import dataclasses

    import onnx_ir as ir

    from edgestack.targets.tensorrt_gpu import build_settings

    case = linear_case(random_stack(RNG, (9, 13), 1, 2), 1, 5, rng=RNG)
    model = case[0]
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    src = _save((model,), tmp_path / "dyn.onnx")
    m = ir.load(src)
    prof = dataclasses.replace(load_profile("jetson-orin-nano-8gb"), memory_budget=64,
                               precision="fp16")
    s = build_settings(m, prof, tmp_path)
    assert "WEIGHT_STREAMING" in s["flags"] and "FP16" in s["flags"]
    assert s["weight_streaming_budget"] == 32
    assert s["profile"]["x"][0] == [1, 5, 13]


def test_rejects_nodes_tensorrt_cannot_run(tmp_path) -> None:
    """Dynamic int8 (MatMulInteger) and uint8 bit ops are named with node and op."""
    from edgestack.targets import get_target as gt

    shift = ShiftCodes.encode(RNG.standard_normal((11, 13)).astype(np.float32), 4, True)
    src = _save(linear_case(shift, 1, 3, rng=RNG), tmp_path / "m.onnx")
    ort_art = gt("ort-cpu").lower(src, tmp_path / "ort", int8="dynamic")
    with pytest.raises(TargetError, match=r"node .* op (MatMulInteger|DynamicQuantizeLinear)"):
        gt("tensorrt-gpu").lower(ort_art.path(), tmp_path / "trt")
    report = json.loads((tmp_path / "trt" / "report.json").read_text())
    assert {r["op"] for r in report["rejected"]} >= {"MatMulInteger", "DynamicQuantizeLinear"}

    import onnx_ir as ir

    inlined = onnx.inliner.inline_local_functions(onnx.load(str(src)))
    problems = check_graph(ir.from_proto(inlined))
    assert any(p["op"] == "BitShift" for p in problems)


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt cannot be imported ({exc}); it cannot be installed on this machine"
    return None


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_engine_builds_and_matches(lowered) -> None:  # pragma: no cover - needs a GPU
    t = get_target("tensorrt-gpu")
    ok, why = t.available()
    assert ok, why
    art, case = lowered["linear_shift"]
    assert "engine" in art.files
    with t.runner(art) as r:
        got = r.infer(case[1])["y"]
    np.testing.assert_allclose(got, case[2]["y"], rtol=2e-2, atol=2e-2)
