"""Shift codes -> int8 weights with a power-of-two per-channel scale (exact).

A shift weight is ``w = ±2^-e * scale[o]``. When the exponents a channel uses span at most
7 levels (``emax - emin <= 6``), ``w = q * s`` exactly with ``q = ±2^(emax - e)`` in int8
(|q| <= 64) and ``s = scale[o] * 2^-emax``: DeepShift 4-bit (7 levels), every 2- and 3-bit
code, and zero-free 4-bit (DenseShift, 8 levels) channels that do not use both the largest
and the smallest level. The product of a power of two and a float32 is exact, so the
dequantized weight equals the reference decode bit for bit (the pass checks it with numpy
and falls back when it does not, e.g. for subnormal scales).

Rewrites:

- ``edgestack.ShiftWeight(codes, scale)`` with constant inputs whose every channel fits ->
  ``DequantizeLinear(q: int8 [shape], s: float [out], axis=0)`` (no zero point: symmetric,
  as TensorRT requires). The node is tagged ``edgestack.int8 = "shift"`` for later passes.
- A node that does not fit (a channel uses 8 levels) is left alone and reported under
  ``fallback`` with the reason; :class:`MaterializePass` then folds it to float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgestack.formats import ShiftCodes
from edgestack.targets.passes._util import (
    add_initializer,
    attrs,
    const_array,
    drop_unused_initializers,
    replace_node,
)

INT8_TAG = "edgestack.int8"


def shift_to_int8(codes: np.ndarray, scale: np.ndarray, bits: int, zero: int,
                  shape: list[int]) -> tuple[np.ndarray, np.ndarray] | str:
    """``(q int8 [shape], s float32 [out])`` with ``q * s[:, None] == decode`` exactly, or a
    string saying why no such pair exists."""
    sc = ShiftCodes(codes, scale, tuple(shape), int(bits), bool(zero))
    c = sc.unpacked_codes().astype(np.int64).reshape(shape[0], -1)
    sign = c >> (sc.bits - 1)
    e = c & ((1 << (sc.bits - 1)) - 1)
    nonzero = ~(e == sc.levels) if sc.zero else np.ones_like(e, dtype=bool)
    big = np.where(nonzero, e, np.iinfo(np.int64).max).min(axis=1)
    small = np.where(nonzero, e, -1).max(axis=1)
    has = nonzero.any(axis=1)
    span = np.where(has, small - big, 0)
    if span.max(initial=0) > 6:
        bad = int(np.argmax(span))
        return (f"channel {bad} uses {int(span[bad]) + 1} exponent levels (2^-{int(big[bad])}.."
                f"2^-{int(small[bad])}); int8 holds at most 7 powers of two")
    emax = np.where(has, small, 0)
    q = np.where(nonzero, (1 << np.maximum(emax[:, None] - e, 0)), 0)
    q = np.where(sign == 1, -q, q).astype(np.int8)
    s = (sc.scale.astype(np.float32) * np.exp2(-emax).astype(np.float32)).astype(np.float32)
    dense = sc.decode().reshape(shape[0], -1)
    got = q.astype(np.float32) * s[:, None]
    if not np.array_equal(got, dense):
        return "int8 * power-of-two scale is not bit-exact here (subnormal scale?)"
    return q.reshape(shape), s


class ShiftToInt8Pass(ir.passes.InPlacePass):
    """Lower fitting ``ShiftWeight`` nodes to ``DequantizeLinear(int8, pow2 scale)``."""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered, fallback = [], {}
        for node in list(graph):
            if node.domain != "edgestack" or node.op_type != "ShiftWeight":
                continue
            codes, scale = (const_array(v) for v in node.inputs)
            if codes is None or scale is None:
                fallback[node.name] = "inputs are not constant"
                continue
            a = attrs(node)
            res = shift_to_int8(codes, scale, a["bits"], a["zero"], a["shape"])
            if isinstance(res, str):
                fallback[node.name] = res
                continue
            q, s = res
            base = node.name or "shift"
            qv = add_initializer(graph, f"{base}_q", q)
            sv = add_initializer(graph, f"{base}_s", s)
            dq = ir.Node("", "DequantizeLinear", [qv, sv], attributes=[ir.AttrInt64("axis", 0)],
                         name=f"{base}_dq", num_outputs=1)
            dq.meta[INT8_TAG] = "shift"
            dq.metadata_props[INT8_TAG] = "shift"
            out = dq.outputs[0]
            out.name = f"{base}_dq_out"
            out.dtype = ir.DataType.FLOAT
            out.shape = ir.Shape(list(q.shape))
            replace_node(graph, node, out, [dq])
            lowered.append(node.name)
        drop_unused_initializers(model)
        self.report = {"lowered": len(lowered), "fallback": fallback}
        return ir.passes.PassResult(model, bool(lowered))
