"""Re-tie weights: a tensor that torch ties (one parameter read by two layers) stored once.

``torch.export`` keeps a tied parameter as one initializer, but the ONNX optimizer folds
``Transpose(W)`` of a ``linear`` into a second, transposed initializer: a GPT-2 or Qwen2
LM head tied to the word embedding is then stored twice (the embedding ``Gather`` reads
``W``, the head ``MatMul`` reads ``W^T``), the tie lost in the file.

Rewrites, for each group of tied parameter names (``groups``; the kept initializer ``W`` is
the first name of the group present in the graph):

- an initializer holding exactly ``W`` under another name: its uses read ``W``; removed;
- an initializer holding exactly ``W^T`` (2-D): its uses read ``Transpose(W)``, one node
  added at the top of the graph; removed.

The graph computes the same values; the file holds ``W`` once. The pass works in place;
:attr:`report` lists per group ``kept``, ``removed`` and the bytes saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir


class RetiePass(ir.passes.InPlacePass):
    """Store each tied tensor once (see the module docstring)."""

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        super().__init__()
        self.groups = [list(g) for g in groups]
        self.report: dict[str, Any] = {"groups": []}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for group in self.groups:
            kept_name = next((n for n in group if n in graph.initializers), None)
            if kept_name is None:
                continue
            kept = graph.initializers[kept_name]
            ref = kept.const_value.numpy() if kept.const_value is not None else None
            if ref is None:
                continue
            entry = {"parameters": group, "kept": kept_name, "removed": [], "bytes_saved": 0}
            for name, value in list(graph.initializers.items()):
                if name == kept_name or value.const_value is None or value.is_graph_input():
                    continue
                how = tensor_relation(value.const_value, ref)
                if how is None:
                    continue
                if how == "same":
                    value.replace_all_uses_with(kept, replace_graph_outputs=True)
                else:
                    node = ir.node("Transpose", [kept], attributes={"perm": [1, 0]},
                                   name=f"retie_transpose_{kept_name}")
                    node.outputs[0].name = f"{kept_name}_transposed"
                    node.outputs[0].type = ir.TensorType(kept.const_value.dtype)
                    node.outputs[0].shape = ir.Shape(list(ref.shape[::-1]))
                    if len(graph):
                        graph.insert_before(graph[0], node)
                    else:
                        graph.append(node)
                    value.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
                graph.initializers.pop(name)
                entry["removed"].append({"name": name, "as": how})
                entry["bytes_saved"] += int(ref.nbytes)
                modified = True
            self.report["groups"].append(entry)
        return ir.passes.PassResult(model, modified)


def tensor_relation(tensor: Any, ref: np.ndarray) -> str | None:
    """``"same"`` when ``tensor`` holds ``ref``, ``"transposed"`` when it holds ``ref.T``."""
    if int(tensor.nbytes) != ref.nbytes or tensor.dtype.numpy() != ref.dtype:
        return None
    shape = tuple(tensor.shape)
    if shape == ref.shape:
        arr = tensor.numpy()
        if np.array_equal(arr, ref):
            return "same"
    if ref.ndim == 2 and shape == ref.shape[::-1] and np.array_equal(tensor.numpy(), ref.T):
        return "transposed"
    return None


__all__ = ["RetiePass", "tensor_relation"]
