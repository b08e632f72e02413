"""Re-tie weights: a tensor that torch ties (one parameter read by two layers) stored once.

``torch.export`` keeps a tied parameter as one initializer, but the ONNX optimizer folds
``Transpose(W)`` of a ``linear`` into a second, transposed initializer: a GPT-2 or Qwen2
LM head tied to the word embedding is then stored twice (the embedding ``Gather`` reads
``W``, the head ``MatMul`` reads ``W^T``), the tie lost in the file.

Rewrites, for each group of tied parameter names (``groups``; the kept initializer ``W`` is
the first name of the group present in the graph):

- an initializer holding exactly ``W`` under another name: its uses read ``W``; removed;
- an initializer holding exactly ``W^T`` (2-D) read as input B of a ``MatMul`` (the head:
  ``logits = h @ W^T``): the ``MatMul`` becomes ``Reshape(Gemm(Reshape(h, [-1, k]), W,
  transB=1), [*h.shape[:-1], n])``, which reads ``W`` as stored. Not ``Transpose(W)``:
  ONNX Runtime constant-folds a transpose of an initializer when it loads the model, which
  would put the second copy back in memory (seen with ORT 1.32);
- any other use of ``W^T`` reads ``Transpose(W)`` (one node at the top of the graph);
- the ``W^T`` initializer is removed;
- a ``Transpose(W, perm=[1, 0])`` node read as input B of a ``MatMul`` (the optimizer left
  the transpose unfolded): that ``MatMul`` becomes the ``Gemm`` form above, and the
  ``Transpose`` goes when nothing else reads it.

The graph computes the same values (the ``Gemm`` sums in its own order: float rounding
differs from the ``MatMul`` by a few ulps); the file holds ``W`` once. The pass works in place;
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
                    for user, index in list(value.uses()):
                        if user.op_type == "MatMul" and user.domain == "" and index == 1 \
                                and user.graph is graph:
                            _gemm_trans_b(graph, user, kept, ref.shape)
                    if value.uses() or value.is_graph_output():
                        node = ir.node("Transpose", [kept], attributes={"perm": [1, 0]},
                                       name=f"retie_transpose_{kept_name}")
                        node.outputs[0].name = f"{kept_name}_transposed"
                        node.outputs[0].type = ir.TensorType(kept.const_value.dtype)
                        node.outputs[0].shape = ir.Shape(list(ref.shape[::-1]))
                        if len(graph):
                            graph.insert_before(graph[0], node)
                        else:
                            graph.append(node)
                        value.replace_all_uses_with(node.outputs[0],
                                                    replace_graph_outputs=True)
                graph.initializers.pop(name)
                entry["removed"].append({"name": name, "as": how})
                entry["bytes_saved"] += int(ref.nbytes)
                modified = True
            for user, _ in list(kept.uses()):
                if _is_transpose_2d(user) and user.graph is graph:
                    t_out = user.outputs[0]
                    for reader, index in list(t_out.uses()):
                        if reader.op_type == "MatMul" and reader.domain == "" and index == 1:
                            _gemm_trans_b(graph, reader, kept, ref.shape)
                            entry["removed"].append({"name": user.name, "as": "transpose node"})
                            modified = True
                    if not t_out.uses() and not t_out.is_graph_output():
                        graph.remove(user, safe=True)
            self.report["groups"].append(entry)
        return ir.passes.PassResult(model, modified)


def _gemm_trans_b(graph: ir.Graph, matmul: ir.Node, w: ir.Value, shape: tuple[int, ...]
                  ) -> None:
    """Replace ``MatMul(h, W^T)`` by ``Reshape(Gemm(Reshape(h, [-1, k]), W, transB=1),
    [*shape(h)[:-1], n])`` (``W`` is ``[n, k]``)."""
    n, k = (int(d) for d in shape)
    h = matmul.inputs[0]
    tag = matmul.name or "matmul"

    def const(name: str, values: list[int]) -> ir.Value:
        node = ir.node("Constant", [], attributes={
            "value": ir.tensor(np.array(values, dtype=np.int64), name=f"{tag}_{name}")})
        new.append(node)
        return node.outputs[0]

    new: list[ir.Node] = []
    flat = ir.node("Reshape", [h, const("rows", [-1, k])], name=f"{tag}_flatten")
    new.append(flat)
    gemm = ir.node("Gemm", [flat.outputs[0], w], attributes={"transB": 1}, name=f"{tag}_gemm")
    new.append(gemm)
    dims = ir.node("Shape", [h], attributes={"end": -1}, name=f"{tag}_lead")
    new.append(dims)
    target = ir.node("Concat", [dims.outputs[0], const("cols", [n])], attributes={"axis": 0},
                     name=f"{tag}_shape")
    new.append(target)
    out = ir.node("Reshape", [gemm.outputs[0], target.outputs[0]], name=f"{tag}_unflatten")
    new.append(out)
    for i, node in enumerate(new):
        for j, v in enumerate(node.outputs):
            v.name = f"{tag}_retie_{i}_{j}"
    old = matmul.outputs[0]
    result = out.outputs[0]
    result.type, result.shape = old.type, old.shape
    graph.insert_before(matmul, new)
    name = old.name
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    old.name = f"{name}_replaced"
    result.name = name  # a graph output (the logits) keeps its name
    graph.remove(matmul, safe=True)


def _is_transpose_2d(node: ir.Node) -> bool:
    if node.op_type != "Transpose" or node.domain != "":
        return False
    perm = node.attributes.get("perm")
    return perm is None or list(perm.as_ints()) == [1, 0]


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
