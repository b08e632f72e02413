"""The edgestack op domain: torch op, numpy reference and ONNX function agree."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgestack.compress.layers import BitStackWeight
from edgestack.errors import ExportError
from edgestack.exporter import ops

from exporter_models import random_shift, random_stack

SHAPES = [(7, 5), (13, 3, 3, 3), (1, 9), (6, 4, 5)]


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("zero", [False, True])
def test_shift_three_implementations_agree_exactly(bits: int, zero: bool) -> None:
    rng = np.random.default_rng(bits * 10 + zero)
    for shape in SHAPES:
        codes = random_shift(rng, shape, bits, zero)
        ref = ops.SHIFT_WEIGHT.reference(codes.codes, codes.scale, bits=bits, zero=int(zero),
                                         shape=shape)
        np.testing.assert_array_equal(ref, codes.decode())
        got_torch = torch.ops.edgestack.shift_weight(
            torch.from_numpy(codes.codes), torch.from_numpy(codes.scale), bits, zero,
            list(shape)).numpy()
        model = ops.SHIFT_WEIGHT.node_model(
            [codes.codes, codes.scale], {"bits": bits, "zero": int(zero), "shape": shape})
        got_onnx = _ort(model, {"codes": codes.codes, "scale": codes.scale})
        assert got_onnx.shape == got_torch.shape == ref.shape == shape
        assert got_onnx.dtype == np.float32
        np.testing.assert_array_equal(got_torch, ref)
        np.testing.assert_array_equal(got_onnx, ref)


def test_shift_encoded_weight_roundtrip_through_onnx() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((11, 3, 3)).astype(np.float32)
    from edgestack.formats import ShiftCodes

    codes = ShiftCodes.encode(w, 4, True)
    model = ops.SHIFT_WEIGHT.node_model([codes.codes, codes.scale],
                                        {"bits": 4, "zero": 1, "shape": w.shape})
    got = _ort(model, {"codes": codes.codes, "scale": codes.scale})
    np.testing.assert_array_equal(got, codes.decode())
    assert (got == 0).any()  # zero codes decode to zero


@pytest.mark.parametrize("n_blocks", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_bitstack_three_implementations_agree(n_blocks: int, k: int) -> None:
    rng = np.random.default_rng(n_blocks * 7 + k)
    for shape in [(7, 5), (13, 3, 3, 3), (1, 9), (5, 3, 7)]:
        stack = random_stack(rng, shape, n_blocks, k)
        ref = ops.BITSTACK_WEIGHT.reference(stack.signs, stack.u, stack.v, shape=shape)
        np.testing.assert_array_equal(ref, stack.decode())
        got_torch = torch.ops.edgestack.bitstack_weight(
            torch.from_numpy(stack.signs), torch.from_numpy(stack.u),
            torch.from_numpy(stack.v), list(shape)).numpy()
        model = ops.BITSTACK_WEIGHT.node_model([stack.signs, stack.u, stack.v],
                                               {"shape": shape})
        got_onnx = _ort(model, {"signs": stack.signs, "u": stack.u, "v": stack.v})
        assert got_onnx.shape == got_torch.shape == ref.shape == shape
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got_torch, ref, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(got_onnx, ref, rtol=0, atol=1e-6 * scale)


def test_bitstack_function_serves_any_block_prefix() -> None:
    rng = np.random.default_rng(5)
    stack = random_stack(rng, (9, 2, 3), 4, 2)
    for b in range(1, 5):
        pre = stack.prefix(b)
        model = ops.BITSTACK_WEIGHT.node_model([pre.signs, pre.u, pre.v], {"shape": (9, 2, 3)})
        got = _ort(model, {"signs": pre.signs, "u": pre.u, "v": pre.v})
        np.testing.assert_allclose(got, stack.decode(b), atol=1e-5)
        module = BitStackWeight(stack, active_blocks=b)
        np.testing.assert_allclose(module().numpy(), stack.decode(b), atol=1e-5)
    # different prefixes really differ, so the checks above can fail
    assert not np.allclose(stack.decode(1), stack.decode(4))


def test_functions_use_standard_ops_and_2d_bitshift_broadcasts() -> None:
    for op in ops.OPS.values():
        fn = op.function_proto()
        assert fn.domain == ops.DOMAIN and fn.name == op.name
        assert {o.domain for o in fn.opset_import} == {""}
        assert {n.domain for n in fn.node} == {""}
        assert list(fn.input) == [name for name, _ in op.inputs]
        assert list(fn.output) == ["weight"]
        assert sorted(fn.attribute) == sorted(name for name, _ in op.attributes)
        producers = {out: n for n in fn.node for out in n.output}
        shifts = [n for n in fn.node if n.op_type == "BitShift"]
        # ShiftWeight unpacks with 2-D BitShifts; BitStackWeight with a sign-table Gather
        assert bool(shifts) == (op.name == "ShiftWeight"), f"{op.name}: {len(shifts)} BitShift"
        for node in shifts:
            data, amount = (producers[i] for i in node.input)
            assert data.op_type == "Reshape"
            target = onnx.numpy_helper.to_array(producers[data.input[1]].attribute[0].t)
            assert target.tolist() == [-1, 1]
            shift_const = onnx.numpy_helper.to_array(amount.attribute[0].t)
            assert shift_const.shape == (8,) and shift_const.dtype == np.uint8
        refs = {a.ref_attr_name for n in fn.node for a in n.attribute if a.ref_attr_name}
        assert refs == {name for name, _ in op.attributes}


def test_function_opsets_and_minimum() -> None:
    rng = np.random.default_rng(2)
    codes = random_shift(rng, (3, 4), 3, False)
    for opset in (18, 21):
        model = ops.SHIFT_WEIGHT.node_model([codes.codes, codes.scale],
                                            {"bits": 3, "zero": 0, "shape": (3, 4)}, opset=opset)
        assert model.functions[0].opset_import[0].version == opset
        got = _ort(model, {"codes": codes.codes, "scale": codes.scale})
        np.testing.assert_array_equal(got, codes.decode())
    with pytest.raises(ExportError, match="opset >= 18, found opset 17"):
        ops.SHIFT_WEIGHT.function(17)


def test_registry_schemas_and_translation_table() -> None:
    ops.register_schemas()
    ops.register_schemas()  # idempotent
    for op in ops.OPS.values():
        schema = onnx.defs.get_schema(op.name, ops.DOMAIN_VERSION, ops.DOMAIN)
        assert [i.name for i in schema.inputs] == [n for n, _ in op.inputs]
        assert set(schema.attributes) == {n for n, _ in op.attributes}
    table = ops.translation_table()
    assert table[torch.ops.edgestack.shift_weight.default] is ops.SHIFT_WEIGHT.translation
    assert table[torch.ops.edgestack.bitstack_weight.default] is ops.BITSTACK_WEIGHT.translation
    assert ops.get_op("ShiftWeight") is ops.SHIFT_WEIGHT
    with pytest.raises(ExportError, match="unknown op edgestack.Nope; domain edgestack v1 has "
                                          "BitStackWeight, ShiftWeight"):
        ops.get_op("Nope")


def test_function_bodies_on_openvino() -> None:
    import onnx.inliner
    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(3)
    cases = []
    for bits in (2, 3, 4, 5):
        for zero in (False, True):
            c = random_shift(rng, (13, 3, 3, 3), bits, zero)
            cases.append((ops.SHIFT_WEIGHT, [c.codes, c.scale],
                          {"bits": bits, "zero": int(zero), "shape": c.shape}, c.decode(), 0.0))
    for nb, k in ((1, 1), (3, 2)):
        s = random_stack(rng, (7, 3, 5), nb, k)
        cases.append((ops.BITSTACK_WEIGHT, [s.signs, s.u, s.v], {"shape": s.shape}, s.decode(),
                      1e-5))
    for op, arrays, attrs, ref, atol in cases:
        # OpenVINO's ONNX frontend does not read model-local functions: inline first.
        model = onnx.inliner.inline_local_functions(op.node_model(arrays, attrs))
        compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled(arrays)[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=atol)


def test_bitstack_sign_table_is_msb_first() -> None:
    from edgestack.formats import unpack_bits

    table = ops.SIGN_TABLE
    assert table.shape == (256, 8) and set(np.unique(table)) == {-1.0, 1.0}
    for byte in (0, 1, 0x80, 0xA5, 255):
        bits = unpack_bits(np.array([byte], np.uint8), 8)
        assert table[byte].tolist() == (bits.astype(np.float32) * 2 - 1).tolist()
