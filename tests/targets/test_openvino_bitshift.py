"""Regression: OpenVINO's wrong results on bit-unpack subgraphs over constants (DESIGN.md).

Found: OpenVINO 2026.4 CPU (f32 hint) miscomputes (a) the 3-D-broadcast BitShift unpack of
a constant (the probe in DESIGN.md) and (b) the edgestack ShiftWeight body (2-D broadcasts
only) once inlined, when its codes are an initializer and the decoded weight feeds a MatMul;
both are right when the packed bytes are a graph input, and ONNX Runtime is right in every
case. The openvino-cpu lowering therefore materializes every decode (no BitShift is left) and
refuses ``weights=keep``. If these reproductions start to match, OpenVINO fixed the bug and
``weights=keep`` could be allowed again.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import openvino as ov
import pytest
from onnx import numpy_helper

from edgestack.errors import TargetError
from edgestack.formats import ShiftCodes
from edgestack.targets import get_target
from edgestack.targets.openvino_cpu import OpenVinoCpuRunner

from targets_cases import linear_case


def _ov(model: onnx.ModelProto, feeds: dict) -> dict:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled.infer_new_request(feeds)
    return {o.get_any_name(): np.array(res[o]) for o in compiled.outputs}


def _unpack3d_on_constant() -> tuple[onnx.ModelProto, dict, np.ndarray]:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    k, n = 24, 5
    packed = rng.integers(0, 256, (k // 4, n), dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["packed", "axis1"], ["p3"]),
         helper.make_node("BitShift", ["p3", "shifts"], ["shifted"], direction="RIGHT"),
         helper.make_node("BitwiseAnd", ["shifted", "mask"], ["masked"]),
         helper.make_node("Reshape", ["masked", "kn"], ["codes"]),
         helper.make_node("Cast", ["codes"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "unpack3d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(packed, "packed"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1), "shifts"),
         numpy_helper.from_array(np.array(3, np.uint8), "mask"),
         numpy_helper.from_array(np.array([k, n], np.int64), "kn")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    x = rng.standard_normal((3, k)).astype(np.float32)
    codes = ((packed[:, None, :] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3)
    return model, {"x": x}, x @ codes.reshape(k, n).astype(np.float32)


def _shift_linear() -> tuple:
    rng = np.random.default_rng(1)
    fmt = ShiftCodes.encode(rng.standard_normal((11, 13)).astype(np.float32), 4, True)
    return linear_case(fmt, 1, 5, rng=rng)


def test_3d_bitshift_on_constant_is_wrong_on_openvino_right_on_ort() -> None:
    model, feeds, ref = _unpack3d_on_constant()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feeds)[0], ref, rtol=1e-5, atol=1e-5)
    got = _ov(model, feeds)["y"]
    assert np.abs(got - ref).max() > 1e-3, (
        "OpenVINO now computes the 3-D BitShift unpack on a constant correctly: the bug "
        "is fixed in this version; update docs/targets.md")


def test_inlined_shift_body_feeding_matmul_is_wrong_on_openvino() -> None:
    model, feeds, ref = _shift_linear()
    inlined = onnx.inliner.inline_local_functions(model)
    got = _ov(inlined, feeds)["y"]
    assert np.abs(got - ref["y"]).max() > 1e-3, (
        "OpenVINO now decodes the inlined ShiftWeight body correctly: weights=keep could be "
        "allowed for openvino-cpu again")


def test_openvino_lowering_avoids_it(tmp_path) -> None:
    model, feeds, ref = _shift_linear()
    onnx.save(model, tmp_path / "m.onnx")
    target = get_target("openvino-cpu")
    for int8 in ("off", "weights"):
        art = target.lower(tmp_path / "m.onnx", tmp_path / int8, int8=int8)
        lowered = onnx.load(str(art.path("onnx")))
        ops = {n.op_type for n in lowered.graph.node}
        assert "BitShift" not in ops and not lowered.functions
        assert {n.domain for n in lowered.graph.node} <= {""}
        with OpenVinoCpuRunner(art) as runner:
            got = runner.infer(feeds)["y"]
        np.testing.assert_allclose(got, ref["y"], rtol=0, atol=2e-5 * np.abs(ref["y"]).max())
    with pytest.raises(TargetError, match="weights='keep' is not supported"):
        target.lower(tmp_path / "m.onnx", tmp_path / "keep", weights="keep")


def test_function_bodies_use_only_2d_bitshift_broadcasts() -> None:
    """What the exporter's bodies do (the 3-D form above is what they avoid)."""
    from edgestack.exporter import ops

    for op in ops.OPS.values():
        fn = op.function_proto(20)
        consts = {n.output[0]: n for n in fn.node if n.op_type == "Constant"}
        for node in fn.node:
            if node.op_type == "BitShift":
                shift = consts[node.input[1]]
                arr = numpy_helper.to_array(shift.attribute[0].t)
                assert arr.ndim == 1
