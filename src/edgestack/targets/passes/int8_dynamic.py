"""Dynamic int8 matmuls: run int8-weight layers with integer kernels.

Activations are quantized per call (``DynamicQuantizeLinear``: uint8, per tensor), weights are
the exact int8 codes from :class:`ShiftToInt8Pass`; this is the graph ONNX Runtime's
``quantize_dynamic`` produces, which ORT fuses into ``DynamicQuantizeMatMul`` (x86 VNNI/AVX2,
ARM dot-product kernels). Weights stay exact; the activation rounding is the only error
(int8 tolerance).

Rewrites (``q``: an int8 initializer ``[out, in]`` read by a ``DequantizeLinear`` tagged
``edgestack.int8``, ``s`` its per-channel scale):

- ``MatMul(x, Transpose(DQ(q, s), perm=[1, 0]))`` ->
  ``Mul(Cast(MatMulInteger(xq, q^T, xzp), float), Mul(xs, s))`` with
  ``xq, xs, xzp = DynamicQuantizeLinear(x)``;
- ``Gemm(x, DQ(q, s), C, transB=1, alpha=beta=1)`` -> the same plus ``Add(C)``.

Matmuls reading the same activation share one ``DynamicQuantizeLinear``.
Other consumers (Conv, a DQ read twice) keep the exact ``DequantizeLinear`` form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgestack.targets.passes._util import (
    add_initializer,
    attrs,
    const_array,
    drop_unused_initializers,
    replace_node,
)
from edgestack.targets.passes.shift_int8 import INT8_TAG


def _node(op: str, inputs: list, name: str, n_out: int = 1, **kw) -> ir.Node:
    return ir.Node("", op, inputs, attributes=ir.convenience.convert_attributes(kw) if kw
                   else (), name=name, num_outputs=n_out)


class DynamicInt8MatMulPass(ir.passes.InPlacePass):
    """Rewrite ``MatMul``/``Gemm`` on tagged int8 weights to dynamic integer matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict = {}

    def _match(self, dq: ir.Node) -> tuple[ir.Node, ir.Node | None] | str:
        uses = list(dq.outputs[0].uses())
        if len(uses) != 1:
            return f"weight read by {len(uses)} nodes"
        user = uses[0].node
        if user.op_type == "Gemm":
            a = attrs(user)
            if (uses[0].idx != 1 or a.get("transB", 0) != 1 or a.get("transA", 0) != 0
                    or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
                return "Gemm form not supported"
            return user, None
        if user.op_type == "Transpose" and attrs(user).get("perm") in ([1, 0], None):
            tuses = list(user.outputs[0].uses())
            if len(tuses) == 1 and tuses[0].node.op_type == "MatMul" and tuses[0].idx == 1:
                return tuses[0].node, user
        return f"consumer {user.op_type} is not a MatMul/Gemm on the transposed weight"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        done, skipped, shared = 0, {}, 0
        # one DynamicQuantizeLinear per activation, shared by every matmul reading it (q/k/v
        # read the same hidden state), as quantize_dynamic does: fewer passes over x.
        quantized: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        for dq in list(graph):
            if dq.op_type != "DequantizeLinear" or dq.meta.get(INT8_TAG) != "shift":
                continue
            q, s = const_array(dq.inputs[0]), const_array(dq.inputs[1])
            if q is None or q.ndim != 2:
                skipped[dq.name] = "not a 2-D weight"
                continue
            m = self._match(dq)
            if isinstance(m, str):
                skipped[dq.name] = m
                continue
            mm, tr = m
            base = dq.name.removesuffix("_dq")
            x = mm.inputs[0]
            qt = add_initializer(graph, f"{base}_qT", np.ascontiguousarray(q.T))
            sv = add_initializer(graph, f"{base}_ws", s.astype(np.float32))
            new: list[ir.Node] = []
            if id(x) in quantized:
                xq, xs, xzp = quantized[id(x)]
                shared += 1
            else:
                dql = _node("DynamicQuantizeLinear", [x], f"{base}_dql", 3)
                xq, xs, xzp = dql.outputs
                for v, suffix in zip(dql.outputs, ("xq", "xs", "xzp"), strict=True):
                    v.name = f"{base}_{suffix}"
                quantized[id(x)] = (xq, xs, xzp)
                new.append(dql)
            mmi = _node("MatMulInteger", [xq, qt, xzp], f"{base}_mmi")
            mmi.outputs[0].name = f"{base}_acc"
            cast = _node("Cast", [mmi.outputs[0]], f"{base}_cast", to=ir.DataType.FLOAT)
            cast.outputs[0].name = f"{base}_accf"
            scl = _node("Mul", [xs, sv], f"{base}_scale")
            scl.outputs[0].name = f"{base}_xws"
            mul = _node("Mul", [cast.outputs[0], scl.outputs[0]], f"{base}_deq")
            mul.outputs[0].name = f"{base}_y"
            new += [mmi, cast, scl, mul]
            out = mul.outputs[0]
            if mm.op_type == "Gemm" and len(mm.inputs) > 2 and mm.inputs[2] is not None:
                add = _node("Add", [out, mm.inputs[2]], f"{base}_bias")
                add.outputs[0].name = f"{base}_yb"
                new.append(add)
                out = add.outputs[0]
            out.dtype = ir.DataType.FLOAT
            replace_node(graph, mm, out, new)
            if tr is not None:
                graph.remove(tr, safe=True)
            graph.remove(dq, safe=True)
            done += 1
        drop_unused_initializers(model)
        self.report = {"rewritten": done, "shared_activation_quantizers": shared,
                       "kept_dequantize": skipped}
        return ir.passes.PassResult(model, bool(done))
