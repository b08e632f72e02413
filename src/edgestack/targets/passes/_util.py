"""Helpers shared by the passes: constant inputs, replacing a node's output."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgestack.exporter.passes.compact_embeddings import add_initializer  # noqa: F401 - re-export


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer/constant input (``Constant`` nodes included: onnx-ir's
    ``get_const_tensor``), else ``None``."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def attrs(node: ir.Node) -> dict[str, Any]:
    """Node attributes as plain Python values."""
    out = {}
    for name, a in node.attributes.items():
        v = a.value
        out[name] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def replace_node(graph: ir.Graph, node: ir.Node, new_output: ir.Value,
                 new_nodes: list[ir.Node]) -> None:
    """Put ``new_nodes`` before ``node``, route ``node``'s only output to ``new_output``,
    then drop ``node``."""
    old = node.outputs[0]
    if new_nodes:
        graph.insert_before(node, new_nodes)
    is_output = old in graph.outputs
    ir.convenience.replace_all_uses_with(old, new_output, replace_graph_outputs=True)
    if is_output:
        new_output.name = old.name
    graph.remove(node, safe=True)


def drop_unused_initializers(model: ir.Model) -> int:
    """Remove dead nodes and the initializers nothing reads (onnx-ir's
    ``RemoveUnusedNodesPass``); returns how many initializers went."""
    before = len(model.graph.initializers)
    RemoveUnusedNodesPass()(model)
    return before - len(model.graph.initializers)
