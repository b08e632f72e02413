"""Inline model-local functions (the ``edgestack`` op bodies) into the main graph.

Rewrites (onnx-ir's stock passes, no protobuf):

- every node that calls a function in ``model.functions`` -> the function body's standard
  ops (``onnx_ir.passes.common.InlinePass``: attributes substituted, names made unique);
- the inlined functions go with it, and the ``edgestack`` opset import
  (``RemoveUnusedOpsetsPass``).

Needed by OpenVINO (its ONNX frontend does not read model-local functions) and wherever the
decode must stay in the graph (``weights=keep``) for a runtime without function support.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedOpsetsPass


class InlineFunctionsPass(ir.passes.InPlacePass):
    """Inline all model-local functions; ``report``: how many calls were inlined."""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        calls = sum(1 for n in model.graph if n.op_identifier() in model.functions)
        if not calls and not model.functions:
            self.report = {"inlined_calls": 0}
            return ir.passes.PassResult(model, False)
        InlinePass()(model)
        model.functions.clear()        # what no call used (e.g. after materialisation)
        RemoveUnusedOpsetsPass()(model)
        model.opset_imports.pop("edgestack", None)
        self.report = {"inlined_calls": calls}
        return ir.passes.PassResult(model, True)
