"""Inline model-local functions (the ``edgestack`` op bodies) into the main graph.

Rewrites:

- every node that calls a function in ``model.functions`` -> the function body's standard
  ops (``onnx.inliner.inline_local_functions``), attributes substituted;
- the now-unused functions and the ``edgestack`` opset import are removed.

Needed by OpenVINO (its ONNX frontend does not read model-local functions) and wherever the
decode must stay in the graph (``weights=keep``) for a runtime without function support.
"""

from __future__ import annotations

import onnx
import onnx.inliner
import onnx_ir as ir


class InlineFunctionsPass(ir.passes.InPlacePass):
    """Inline all model-local functions (through onnx's inliner; the serde is the only
    place this module touches protobuf)."""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        calls = sum(1 for n in model.graph if (n.domain, n.op_type, n.overload)
                    in model.functions)
        if not calls and not model.functions:
            self.report = {"inlined_calls": 0}
            return ir.passes.PassResult(model, False)
        proto = ir.serde.serialize_model(model)
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.functions[:]
        keep = [o for o in proto.opset_import if o.domain != "edgestack"]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
        new = ir.serde.deserialize_model(proto)
        # In place: move the new graph's contents into the given model object.
        model.graph = new.graph
        model.functions.clear()
        model.opset_imports.pop("edgestack", None)
        self.report = {"inlined_calls": calls}
        return ir.passes.PassResult(model, True)
