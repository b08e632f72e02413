"""Size accounting: does the compression survive export?

For each compressed layer of an exported ONNX model, :func:`layer_sizes` adds up the bytes of
the initializers that hold its weight and compares them with the theoretical size of the
format:

============  ==========================================  ==================================
kind          initializers counted                        theoretical bytes
============  ==========================================  ==================================
shift         inputs of the ``edgestack.ShiftWeight``     ``numel*bits/8 + 4*out``
              node (codes, scale)
bitstack      inputs of the ``edgestack.BitStackWeight``  ``nb*(1 + 16k(m+n)/(mn)) * numel/8``
              node (signs, u, v); ``nb`` = stored blocks  (= ``nb*(mn/8 + 2k(m+n))``)
lowrank       the two factor matrices (found through the  ``4*k*(m+n)`` (fp32 factors)
              nodes under ``<layer>.u`` / ``<layer>.v``)
pruned        the layer's (smaller) dense weight          ``4*numel`` of the pruned weight
============  ==========================================  ==================================

``ratio = actual / theoretical``: about 1.0 when the file stores exactly the compressed
arrays (bit padding and per-block byte rounding make it slightly above); 2.0 would mean a
weight is stored twice, and ``32/bits`` a weight stored dense.

Layers are named after the torch modules: ``edgestack`` nodes carry the node metadata
``edgestack.layer`` (written by :func:`edgestack.exporter.export`); low-rank layers are listed
in the model metadata ``edgestack.lowrank_layers``; pruned layers come from the compression
report in ``edgestack.compression`` (method ``prune``). Standard nodes are matched to layers
by the module scopes the torch exporter records (``pkg.torch.onnx.name_scopes``).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgestack.exporter.export import META_COMPRESSION, META_LOWRANK, NODE_LAYER_KEY
from edgestack.exporter.ops import DOMAIN
from edgestack.formats import BitStackStack, ShiftCodes

_PASS_THROUGH = ("Identity", "Cast")


@dataclass
class LayerSize:
    """Stored vs theoretical bytes of one compressed layer.

    Attributes:
        layer: torch module name (the node name when unknown).
        kind: ``shift``, ``bitstack``, ``lowrank`` or ``pruned``.
        node: the ``edgestack`` node's name (None for low-rank and pruned layers).
        shape: dense weight shape when known (from the node's ``shape`` attribute or the
            pruned weight), else None.
        initializers: ``{initializer name: bytes}`` counted for the layer.
        actual_bytes: sum of ``initializers``.
        theoretical_bytes: the format's ideal size (module docstring).
        details: ``bits`` / ``blocks`` and ``k`` / factor shapes.
    """

    layer: str
    kind: str
    node: str | None
    shape: tuple[int, ...] | None
    initializers: dict[str, int]
    actual_bytes: int
    theoretical_bytes: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``actual_bytes / theoretical_bytes``."""
        return self.actual_bytes / self.theoretical_bytes if self.theoretical_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "kind": self.kind, "node": self.node,
            "shape": None if self.shape is None else list(self.shape),
            "initializers": dict(self.initializers), "actual_bytes": self.actual_bytes,
            "theoretical_bytes": round(self.theoretical_bytes, 2),
            "ratio": round(self.ratio, 4), "details": dict(self.details),
        }


@dataclass
class SizeReport:
    """Per-layer sizes of one exported model.

    Attributes:
        layers: one :class:`LayerSize` per compressed layer, in graph order.
        initializer_bytes: bytes of all initializers of the model.
    """

    layers: list[LayerSize]
    initializer_bytes: int

    def layer(self, name: str) -> LayerSize:
        """The row of torch layer ``name``.

        Raises:
            KeyError: no compressed layer of that name.
        """
        for row in self.layers:
            if row.layer == name:
                return row
        raise KeyError(f"no compressed layer named {name!r}; layers: "
                       f"{', '.join(r.layer for r in self.layers) or 'none'}")

    @property
    def compressed_bytes(self) -> int:
        """Bytes of the compressed layers' weights."""
        return sum(r.actual_bytes for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"initializer_bytes": self.initializer_bytes,
                "compressed_bytes": self.compressed_bytes,
                "layers": [r.to_dict() for r in self.layers]}

    def table(self) -> str:
        """Plain-text table: layer, kind, actual, theoretical, ratio."""
        rows = [("layer", "kind", "shape", "actual B", "theory B", "ratio")]
        for r in self.layers:
            shape = "x".join(map(str, r.shape)) if r.shape else "-"
            rows.append((r.layer, r.kind, shape, str(r.actual_bytes),
                         f"{r.theoretical_bytes:.0f}", f"{r.ratio:.3f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        lines.append(f"{len(self.layers)} compressed layer(s): {self.compressed_bytes} B of "
                     f"{self.initializer_bytes} B of initializers")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _as_ir(model: str | Path | onnx.ModelProto | ir.Model) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(str(model))  # external data is mapped lazily, never read here


def _nbytes(value: ir.Value) -> int:
    tensor = value.const_value
    if tensor is not None:
        return int(tensor.nbytes)
    dims = [d if isinstance(d, int) else 0 for d in (value.shape or [])]
    return int(np.prod(dims)) * int(value.dtype.itemsize)


def _source_initializer(value: ir.Value | None, graph: ir.Graph) -> ir.Value | None:
    """The initializer behind ``value``, looking through Identity/Cast nodes."""
    seen = 0
    while value is not None and seen < 8:
        if value.name in graph.initializers:
            return graph.initializers[value.name]
        producer = value.producer()
        if producer is None or producer.op_type not in _PASS_THROUGH or producer.domain != "":
            return None
        value = producer.inputs[0]
        seen += 1
    return None


def _scopes(node: ir.Node) -> list[str]:
    try:
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else []


def _weights_under(graph: ir.Graph, scope: str) -> dict[str, ir.Value]:
    """Initializers of rank >= 2 read by standard nodes whose innermost module is ``scope``."""
    found: dict[str, ir.Value] = {}
    for node in graph.all_nodes():
        scopes = _scopes(node)
        modules = scopes[:-1]  # the last entry names the op itself
        if not modules or modules[-1] != scope:
            continue
        for value in node.inputs:
            init = _source_initializer(value, graph)
            if init is not None and len(init.shape or ()) >= 2:
                found[init.name] = init
    return found


def _edgestack_row(node: ir.Node, graph: ir.Graph) -> LayerSize:
    inits = {}
    for value in node.inputs:
        init = _source_initializer(value, graph)
        if init is not None:
            inits[init.name] = init
    sizes = {name: _nbytes(v) for name, v in inits.items()}
    shape = tuple(int(d) for d in node.attributes["shape"].as_ints())
    layer = node.metadata_props.get(NODE_LAYER_KEY) or node.name
    numel = int(np.prod(shape))
    if node.op_type == "ShiftWeight":
        bits = node.attributes["bits"].as_int()
        theory = ShiftCodes.theoretical_nbytes(shape, bits)
        details: dict[str, Any] = {"bits": bits, "zero": bool(node.attributes["zero"].as_int())}
        kind = "shift"
    else:
        u = node.inputs[1]
        nb, m, k = (int(d) for d in u.shape) if u is not None and u.shape else (0, shape[0], 0)
        n = numel // max(1, m)
        theory = BitStackStack.theoretical_bits_per_weight(m, n, k, nb) * numel / 8
        details = {"blocks": nb, "k": k}
        kind = "bitstack"
    return LayerSize(layer, kind, node.name, shape, sizes, sum(sizes.values()), theory, details)


def _meta_json(model: ir.Model, key: str, default: Any) -> Any:
    try:
        return json.loads(model.metadata_props.get(key, ""))
    except ValueError:
        return default


def layer_sizes(model: str | Path | onnx.ModelProto | ir.Model) -> SizeReport:
    """Stored vs theoretical bytes of every compressed layer of an exported model.

    Args:
        model: an ONNX path (external data is not read), ``ModelProto`` or onnx-ir model.

    Returns:
        The :class:`SizeReport` (``edgestack`` nodes first, then low-rank, then pruned
        layers).
    """
    model_ir = _as_ir(model)
    graph = model_ir.graph
    rows = [_edgestack_row(n, graph) for n in graph.all_nodes() if n.domain == DOMAIN]

    for layer in _meta_json(model_ir, META_LOWRANK, []):
        factors = {**_weights_under(graph, f"{layer}.u"), **_weights_under(graph, f"{layer}.v")}
        sizes = {name: _nbytes(v) for name, v in factors.items()}
        numel = sum(int(np.prod([int(d) for d in v.shape])) for v in factors.values())
        rows.append(LayerSize(
            layer, "lowrank", None, None, sizes, sum(sizes.values()), 4.0 * numel,
            {"factor_shapes": {n: [int(d) for d in v.shape] for n, v in factors.items()}},
        ))

    report = _meta_json(model_ir, META_COMPRESSION, {})
    if isinstance(report, dict) and report.get("method") == "prune":
        for entry in report.get("layers", []):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not name:
                continue
            weights = _weights_under(graph, name)
            if not weights:
                continue
            sizes = {n: _nbytes(v) for n, v in weights.items()}
            v = next(iter(weights.values()))
            shape = tuple(int(d) for d in v.shape)
            numel = sum(int(np.prod([int(d) for d in w.shape])) for w in weights.values())
            rows.append(LayerSize(name, "pruned", None, shape, sizes, sum(sizes.values()),
                                  4.0 * numel, {"original_shape": entry.get("shape")}))

    total = sum(_nbytes(v) for v in graph.initializers.values())
    return SizeReport(rows, total)


__all__ = ["LayerSize", "SizeReport", "layer_sizes"]
