"""Materialize: constant-fold ``edgestack`` decode nodes into dense float32 initializers.

Rewrites:

- ``edgestack.ShiftWeight(codes, scale)`` and ``edgestack.BitStackWeight(signs, u, v)`` whose
  inputs are all initializers -> one float32 initializer holding the numpy reference decode
  (:mod:`edgestack.formats`), read by the same consumers. Bit-exact with the reference.
- Nodes whose inputs are not constant are left alone (reported as ``kept``).
- Initializers that only fed the folded nodes are removed.

This is the fast choice (no decode per run) at the cost of fp32 weight memory; the
alternative is to keep the nodes (``weights=keep``) and let the runtime decode each run.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgestack.exporter.ops import OPS
from edgestack.targets.passes._util import (
    add_initializer,
    attrs,
    const_array,
    drop_unused_initializers,
    replace_node,
)


class MaterializePass(ir.passes.InPlacePass):
    """Fold every constant ``edgestack`` node into a float32 initializer."""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded, kept = [], []
        for node in list(graph):
            if node.domain != "edgestack" or node.op_type not in OPS:
                continue
            arrays = [const_array(v) for v in node.inputs]
            if any(a is None for a in arrays):
                kept.append(node.name)
                continue
            weight = np.ascontiguousarray(
                OPS[node.op_type].reference(*arrays, **attrs(node)), dtype=np.float32)
            value = add_initializer(graph, f"{node.name or node.op_type}_weight", weight)
            replace_node(graph, node, value, [])
            folded.append(node.name)
        removed = drop_unused_initializers(model)
        self.report = {"folded": len(folded), "kept": kept, "initializers_removed": removed}
        return ir.passes.PassResult(model, bool(folded))
