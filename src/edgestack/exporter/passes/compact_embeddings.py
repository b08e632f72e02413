"""Compact embeddings: store large gathered float tables as int8 with a per-row scale.

A transformer's word / position / token-type embedding tables are float initializers read only
by ``Gather`` (axis 0). Compressing the linear layers leaves them dense: all-MiniLM-L6-v2's
fp32 word table alone is 47 MB of a 54 MB shift-4 export. This pass quantizes each such table
row by row (symmetric int8, ``scale[r] = max|table[r]| / 127``, round half to even) and
dequantizes only the gathered rows at run time.

Rewrites (``T``: a float32/float16 initializer ``[rows, dim]`` of at least ``min_bytes``
whose every use is input 0 of a main-graph ``Gather`` with ``axis`` 0; ``Tq``: its int8
codes; ``S``: its ``[rows, 1]`` scale in ``T``'s dtype):

- ``Gather(T, ids)`` -> ``Mul(Cast(Gather(Tq, ids), to=T.dtype), Gather(S, ids))``; every
  Gather of the same table shares ``Tq`` and ``S``; ``T`` is removed.

Left alone (and reported under ``skipped`` with the reason): tables also read by another
node (a ``MatMul``/``Gemm``/``Transpose`` reading the same tensor is an LM head with tied
weights: quantizing it would change the head too), tables below ``min_bytes``, graph inputs,
tables of other ranks or dtypes, and Gathers on another axis or inside subgraphs.

``Cast`` + ``Mul`` rather than ``DequantizeLinear``: a per-row scale of gathered rows is not a
per-axis scale of the int8 tensor (it varies along the ids' dims), and ONNX Runtime and
OpenVINO both run the plain form; the product is one float multiply per element, the same as
numpy's ``codes.astype(dtype) * scale`` (:func:`dequantize_rows`), so runners agree exactly.

The model metadata ``edgestack.compact_embeddings`` (:data:`META_COMPACT_EMBEDDINGS`) gets a
JSON list with one entry per table: ``name``, ``bits``, ``rows``, ``cols``, ``bytes_before``,
``bytes_after`` (codes + scale); entries of earlier runs are kept. The pass works in place.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

META_COMPACT_EMBEDDINGS = "edgestack.compact_embeddings"
"""Model metadata key: JSON list of the tables :class:`CompactEmbeddingsPass` quantized."""

DEFAULT_MIN_BYTES = 256 * 1024
"""Tables smaller than this (256 KiB) stay float: the saving is not worth a node chain."""

BITS = 8
_QMAX = 2 ** (BITS - 1) - 1  # 127: symmetric, -128 unused
_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 quantization of a 2-D float table.

    Args:
        table: ``[rows, dim]`` float32 or float16.

    Returns:
        ``(codes, scale)``: int8 ``[rows, dim]`` in ``[-127, 127]`` and ``[rows, 1]`` scale in
        the table's dtype, ``scale = max|row| / 127`` (0 for an all-zero row, whose codes
        are 0). ``|table - dequantize_rows(codes, scale)| <= scale / 2`` up to float rounding.
    """
    t = np.asarray(table)
    scale = (np.abs(t.astype(np.float32)).max(axis=1, keepdims=True) / _QMAX).astype(t.dtype)
    s32 = scale.astype(np.float32)
    safe = np.where(s32 > 0, s32, np.float32(1))
    codes = np.clip(np.rint(t.astype(np.float32) / safe), -_QMAX, _QMAX).astype(np.int8)
    return codes, scale


def dequantize_rows(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``codes.astype(scale.dtype) * scale``: what the rewritten graph computes per row."""
    return codes.astype(scale.dtype) * scale


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a unique name based on ``name`` (the
    targets' passes use it too)."""
    base, k = name, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _node(op: str, inputs: list, name: str, **kw: Any) -> ir.Node:
    attributes = ir.convenience.convert_attributes(kw) if kw else ()
    return ir.Node("", op, inputs, attributes=attributes, name=name)


class CompactEmbeddingsPass(ir.passes.InPlacePass):
    """Quantize large float tables read only by ``Gather`` (axis 0) to int8 per row.

    Args:
        min_bytes: smallest table (in bytes) to quantize (default 256 KiB).

    After a run, :attr:`report` is ``{"tables": [metadata entries], "skipped": {table:
    reason}, "bytes_saved": int}``.
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        super().__init__()
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, found {min_bytes}")
        self.min_bytes = int(min_bytes)
        self.report: dict[str, Any] = {}

    def _match(self, graph: ir.Graph, value: ir.Value) -> list[ir.Node] | str:
        """The Gathers to rewrite, or why ``value`` is left alone."""
        tensor = value.const_value
        if tensor is None or value.is_graph_input():
            return "not a constant initializer (graph input or no value)"
        if value.dtype not in _DTYPES:
            return f"dtype {value.dtype} is not float32/float16"
        if len(tensor.shape) != 2:
            return f"rank {len(tensor.shape)}, expected a 2-D [rows, dim] table"
        if tensor.nbytes < self.min_bytes:
            return f"{tensor.nbytes} bytes < min_bytes {self.min_bytes}"
        gathers, others = [], []
        for use in value.uses():
            node = use.node
            axis = node.attributes.get("axis")
            axis = 0 if axis is None else axis.as_int()
            if (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and use.idx == 0
                    and axis in (0, -2) and node.graph is graph):
                gathers.append(node)
            else:
                others.append(node.op_type)
        if not gathers:
            return ""  # not an embedding table (a layer weight): nothing to report
        if value.is_graph_output():
            return "is a graph output"
        if others:
            tied = {"MatMul", "Gemm", "Transpose"} & set(others)
            why = " (tied weights, e.g. an LM head)" if tied else ""
            return f"also read by {', '.join(sorted(set(others)))}{why}"
        return gathers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        for name, value in list(graph.initializers.items()):
            if value.const_value is None or value.dtype not in _DTYPES \
                    or len(value.const_value.shape) != 2:
                continue  # not a candidate table at all: not reported
            m = self._match(graph, value)
            if isinstance(m, str):
                if m and value.const_value.nbytes >= self.min_bytes:
                    skipped[name] = m
                continue
            table = value.const_value.numpy()
            codes, scale = quantize_rows(table)
            qv = add_initializer(graph, f"{name}_int8", codes)
            sv = add_initializer(graph, f"{name}_scale", scale)
            for i, gather in enumerate(m):
                base = f"{gather.name or name}_compact{i if len(m) > 1 else ''}"
                ids = gather.inputs[1]
                gq = _node("Gather", [qv, ids], f"{base}_gather_q", axis=0)
                cast = _node("Cast", [gq.outputs[0]], f"{base}_cast", to=value.dtype)
                gs = _node("Gather", [sv, ids], f"{base}_gather_scale", axis=0)
                mul = _node("Mul", [cast.outputs[0], gs.outputs[0]], f"{base}_dequant")
                for v, suffix, dtype in ((gq.outputs[0], "q", ir.DataType.INT8),
                                         (cast.outputs[0], "qf", value.dtype),
                                         (gs.outputs[0], "s", value.dtype)):
                    v.name, v.dtype = f"{base}_{suffix}", dtype
                old = gather.outputs[0]
                out = mul.outputs[0]
                out.dtype, out.shape = value.dtype, old.shape
                gq.outputs[0].shape = cast.outputs[0].shape = old.shape
                graph.insert_before(gather, [gq, cast, gs, mul])
                was_output = old.is_graph_output()
                ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
                out.name = old.name if was_output else f"{base}_y"
                graph.remove(gather, safe=True)
            del graph.initializers[name]
            tables.append({"name": name, "bits": BITS, "rows": int(table.shape[0]),
                           "cols": int(table.shape[1]), "bytes_before": int(table.nbytes),
                           "bytes_after": int(codes.nbytes + scale.nbytes)})
        if tables:
            try:
                earlier = json.loads(model.metadata_props.get(META_COMPACT_EMBEDDINGS, "[]"))
            except ValueError:
                earlier = []
            model.metadata_props[META_COMPACT_EMBEDDINGS] = json.dumps(
                (earlier if isinstance(earlier, list) else []) + tables)
        self.report = {"tables": tables, "skipped": skipped,
                       "bytes_saved": sum(t["bytes_before"] - t["bytes_after"]
                                          for t in tables)}
        return ir.passes.PassResult(model, bool(tables))


__all__ = ["CompactEmbeddingsPass", "quantize_rows", "dequantize_rows", "add_initializer",
           "META_COMPACT_EMBEDDINGS", "DEFAULT_MIN_BYTES", "BITS"]
