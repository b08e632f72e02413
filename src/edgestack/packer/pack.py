"""The packer: turn an exported edgestack ONNX model into a device package (host side).

:func:`pack` reads an ONNX file written by :func:`edgestack.exporter.export` (a model source is
compressed and exported first by :func:`edgestack.pipeline.pack_model`, which also stores its
large embedding tables int8; this module imports neither torch nor the exporter) and writes a
package
(:mod:`edgestack.package.format`) with :class:`~edgestack.package.PackageWriter`:

- every ``edgestack.BitStackWeight`` node's ``signs``/``u``/``v`` initializers leave the graph
  and become **graph inputs** whose first dimension is symbolic (``nb_<i>``); their blocks go
  to ``blocks.bin`` in the model's importance order (metadata ``edgestack.bitstack_order``,
  written by the exporter; level-major order with a warning when absent), so every tier is a
  prefix of the block file. ``layers[L].graph`` (:class:`~.format.LayerGraph`) records
  ``node`` (the node name), ``signs``, ``u``, ``v`` (the three input names), ``output`` (the
  decoded weight's value name), ``torch_layer`` (the torch module name) and its ``site``;
- every other initializer of 1024 bytes or more goes to ``model.data`` (ONNX external data,
  role ``weights``), so ``model.onnx`` stays small and the runtime can place the weights;
- tiers: every level boundary (each layer has ``b`` blocks) plus ``steps_per_level - 1``
  evenly spaced points between boundaries, so the tier range is fine-grained;
- golden inputs are made deterministically from the graph's input signature (integer inputs:
  ids in ``[0, 100)``, ``*mask*`` inputs ones, ``*type*`` ids zeros; float inputs: a seeded
  normal; symbolic dims: 1 for the first, 16 for the others) unless given (a model source's
  example inputs are used when pack exports it); golden outputs
  are what ONNX Runtime gives on the packed graph with every block fed (the last tier);
- ``runtime`` (:class:`~.format.RuntimeInfo`) holds what the planner needs without parsing
  the graph:
  ``activation_bytes`` (peak of live intermediate tensors for the golden input shapes, from
  ONNX shape inference and a liveness scan in node order), ``input_shapes``, ``weights_file``.

Every target of :data:`SUPPORTED_TARGETS` is packed: ``ort-cpu``, ``ort-arm`` and
``openvino-cpu`` (the same files, served by ONNX Runtime on x86 or aarch64, or by OpenVINO;
BitStack layers become tiers) and ``tensorrt-gpu`` (one dense tier: its graph is the compiled
one, every layer materialised, and the engine is built on the device; a BitStack node is
refused). :func:`edgestack.pipeline.compile_model` packs a target's lowered graph with the
x86 reference outputs of the source model as the golden outputs.
The package is written atomically (the writer's temporary directory); ``out`` ending in
``.tar`` gives the one-file archive form.

Every graph edit is onnx-ir (``NameFixPass`` names the nodes, ``RemoveUnusedNodesPass`` drops
dead code, ``ShapeInferencePass`` sizes the activations); weights stay lazy, memory-mapped
external tensors from reading the source to writing ``model.data``, so a large model is not
copied in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, ShapeInferencePass

from edgestack.core import atomic
from edgestack.core.ort import disabled_optimizers
from edgestack.errors import PackageError
from edgestack.formats.bitstack import META_BITSTACK_ORDER as ORDER_KEY
from edgestack.formats.bitstack import NODE_LAYER_KEY as LAYER_KEY
from edgestack.formats.bitstack import BitStackStack
from edgestack.formats.int8 import quantize_int8
from edgestack.package.archive import write_archive
from edgestack.package.format import (
    ARCHIVE_SUFFIX,
    DENSE_FILES,
    SUPPORTED_TARGETS,
    TIERED_TARGETS,
    VARIANT_FILE,
    LayerGraph,
    LayerInfo,
    RuntimeInfo,
    Table,
    layout_records,
)
from edgestack.package.reader import Package
from edgestack.package.tables import gather_rows, lookup_table
from edgestack.package.writer import PackageWriter
from edgestack.packer.decoder import (
    cache_outputs,
    contract_of,
    decoder_info,
    golden_prompt,
    positions_of,
    tokenizer_files,
    worst_call_shapes,
)
from edgestack.packer.variants import add_sites, dense_graph
from edgestack.profiles import load_profile
from edgestack.targets.feeds import example_feeds

logger = logging.getLogger("edgestack.packer")

GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.data"
EXTERNAL_MIN_BYTES = 1024
DEFAULT_STEPS_PER_LEVEL = 4

@dataclass
class PackResult:
    """What :func:`pack` wrote."""

    path: Path
    n_layers: int
    n_blocks: int
    tiers: list[dict[str, Any]]
    order_source: str
    files: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    compile: dict[str, Any] | None = None
    """What a target's lowering did (``metadata.compile``), for a compiled package."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "layers": self.n_layers, "blocks": self.n_blocks,
                "tiers": self.tiers, "order_source": self.order_source, "files": self.files,
                "warnings": self.warnings,
                **({"compile": self.compile} if self.compile is not None else {})}


def choose_tiers(order: Sequence[tuple[str, int]], layers: Mapping[str, int],
                 steps_per_level: int = DEFAULT_STEPS_PER_LEVEL) -> list[int]:
    """Record counts of the tiers: the smallest prefix holding block 0 of every layer, every
    level boundary after it, ``steps_per_level - 1`` points between boundaries, and the end.
    """
    first = 1 + max(i for i, (_name, b) in enumerate(order) if b == 0)
    bounds = {first, len(order)}
    for i in range(first, len(order)):
        if order[i][1] > order[i - 1][1]:  # a new level starts: the previous one is complete
            bounds.add(i)
    points = sorted(bounds)
    counts: set[int] = set(points)
    for lo, hi in zip(points, points[1:], strict=False):
        for s in range(1, max(1, steps_per_level)):
            counts.add(lo + round((hi - lo) * s / steps_per_level))
    out = sorted(c for c in counts if first <= c <= len(order))
    if len(out) > 1024:
        keep = np.linspace(0, len(out) - 1, 1024).round().astype(int)
        out = sorted({out[i] for i in keep} | {out[-1]})
    return out


def _order_from_metadata(props: Mapping[str, str], torch_names: Mapping[str, str],
                         layers: Mapping[str, int]) -> tuple[list[tuple[str, int]] | None, str]:
    """The importance order in manifest layer names (from the model's metadata ``props``),
    or ``(None, why)``."""
    raw = props.get(ORDER_KEY)
    if raw is None:
        return None, f"the model has no {ORDER_KEY!r} metadata (exported before it existed, " \
                     "or not compressed by edgestack's bitstack pass)"
    try:
        items = json.loads(raw)
        by_torch = {t: name for name, t in torch_names.items()}
        order = []
        for item in items:
            t, b = str(item[0]), int(item[1])
            name = by_torch.get(t, t if t in layers else None)
            if name is None:
                return None, f"{ORDER_KEY} names layer {t!r} that has no BitStackWeight node"
            if b < layers[name]:  # an export of a lower tier holds fewer blocks
                order.append((name, b))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        return None, f"{ORDER_KEY} is not a JSON list of [layer, block] ({exc})"
    fake = {n: LayerInfo(n, (1, 1), 1, k) for n, k in layers.items()}
    try:
        layout_records(fake, order)
    except PackageError as exc:
        return None, f"{ORDER_KEY} is not a valid block order: {exc}"
    if len(order) != sum(layers.values()):
        return None, f"{ORDER_KEY} lists {len(order)} of {sum(layers.values())} blocks"
    return order, "model"


TABLE_MIN_BYTES = 64 * 1024
"""Smallest external tensor the runtime treats as a lookup table (see :func:`gather_tables`)."""


def gather_tables(model: ir.Model) -> dict[str, Table]:
    """External initializers of at least :data:`TABLE_MIN_BYTES` read only as the data of a
    ``Gather`` on axis 0 (embedding tables), as :class:`~.format.Table` (``dtype``: numpy's
    ``dtype.str``).

    A call reads only the rows its indices name: :func:`pregather_tables` moves the lookups
    with graph-input indices out of the graph (the runtime reads those rows itself); the
    runtime memory-maps the others and hands their pages back after each call. Uses in
    nested graphs count: a table used by anything else is not a table.
    """
    out = {}
    for v in model.graph.initializers.values():
        t, uses = v.const_value, v.uses()
        if (isinstance(t, ir.ExternalTensor) and (t.length or 0) >= TABLE_MIN_BYTES
                and t.shape.rank() >= 1 and t.shape[0] >= 1 and uses
                and all(u.node.op_type == "Gather" and u.node.domain == "" and u.idx == 0
                        and u.node.attributes.get_int("axis", 0) == 0 for u in uses)):
            out[str(v.name)] = Table(t.offset or 0, tuple(int(d) for d in t.shape),
                                     t.dtype.numpy().str)
    return out


def pregather_tables(model: ir.Model, tables: dict[str, Table]) -> dict[str, Table]:
    """Move the lookups of tables whose indices are a graph input out of the graph.

    For every table of ``tables`` (see :func:`gather_tables`; the model already saved with
    external data, so the table's bytes stay in the weights file at their offset) each
    ``Gather(table, ids)`` whose ``ids`` is a graph input is removed and its output becomes
    a graph input: the runtime reads exactly those rows from the weights file with ``pread``
    (no mapping, so no page-cache fault-around: a memory-mapped table read by 128 scattered
    ids made up to 16 pages resident per id) and feeds them. The table's initializer leaves
    the graph. Returns ``{table: the tables entry with its lookups (ids input, value)}``
    and removes those tables from ``tables``; tables read with computed indices stay.
    """
    g = model.graph
    out: dict[str, Table] = {}
    for name in list(tables):
        users = [u.node for u in g.initializers[name].uses()]
        if not all(nd.graph is g and nd.inputs[1] is not None and nd.inputs[1].is_graph_input()
                   and not nd.outputs[0].is_graph_output() for nd in users):
            continue
        spec = tables.pop(name)
        lookups = []
        for nd in users:
            ids, rows = nd.inputs[1], nd.outputs[0]
            assert ids is not None
            fed = ir.val(rows.name, ir.DataType.from_numpy(np.dtype(spec.dtype)),
                         [*(ids.shape or []), *spec.shape[1:]])
            rows.replace_all_uses_with(fed)
            g.inputs.append(fed)
            lookups.append((str(ids.name), str(rows.name)))
        out[name] = replace(spec, lookups=tuple(lookups))
    RemoveUnusedNodesPass()(model)   # the lookups and the tables' initializers
    return out


def share_tables(model: ir.Model) -> list[str]:
    """Make each table an LM head shares with its word embedding (:func:`_tied_uses`) an
    overridable initializer: a graph input too, with the initializer as its default value;
    nobody feeds it. ONNX Runtime does not prepack an overridable initializer, so a session
    with prepacking on keeps one copy of the table (packing the head's ``B`` copied it:
    GPT-2 +147 MiB, bench/prepack_head.py) and still prepacks every other weight. Returns
    the tables' names."""
    g, names = model.graph, []
    for v in list(g.initializers.values()):
        if not v.is_graph_input() and _tied_uses(g, v) is not None:
            g.inputs.append(v)
            names.append(str(v.name))
    return names


def _tied_uses(g: ir.Graph, v: ir.Value) -> tuple[list[ir.Node], list[ir.Node]] | None:
    """``(gathers, heads)`` when ``v`` is read only as the table of main-graph ``Gather``s
    on axis 0 and as the ``B`` of main-graph ``Gemm``s ``x @ v^T`` (``transB=1``, alpha 1,
    no ``C`` or a 1-D bias with beta 1): an LM head tied to its word embedding; else None."""
    gathers, heads = [], []
    for u in v.uses():
        nd, attrs = u.node, u.node.attributes
        if nd.domain != "" or nd.graph is not g:
            return None
        if nd.op_type == "Gather" and u.idx == 0 and attrs.get_int("axis", 0) in (0, -2):
            gathers.append(nd)
        elif (nd.op_type == "Gemm" and u.idx == 1 and attrs.get_int("transB", 0) == 1
              and attrs.get_int("transA", 0) == 0 and attrs.get_float("alpha", 1.0) == 1.0
              and (len(nd.inputs) < 3 or nd.inputs[2] is None or (
                  attrs.get_float("beta", 1.0) == 1.0 and nd.inputs[2].shape is not None
                  and len(nd.inputs[2].shape) == 1))):
            heads.append(nd)
        else:
            return None
    return (gathers, heads) if gathers and heads else None


def _initializer(g: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.val(name, const_value=ir.tensor(array, name=name))
    g.register_initializer(v)
    return v


def quantize_tied_tables(model: ir.Model) -> list[str]:
    """Store each float32 table that an LM head shares with the word embedding
    (:func:`_tied_uses`) as int8, one scale per vocabulary row, in the two layouts its
    readers want: the lookups gather rows of ``<name>.int8`` ``[V, H]`` and multiply by
    ``<name>.row_scale`` ``[V, 1]`` (a ``Gather``-only table, so the runtime reads just the
    rows a call names), and the head is ``DynamicQuantizeMatMul(x, <name>.head_q [H, V],
    <name>.head_scale [V][, bias])`` (the int8 kernels, the form of the BitStack layers' int8
    graph; ONNX Runtime prepacks its ``B``). The float table (GPT-2: 147 MiB) goes; the
    package holds 2 x 1 byte a weight and serves about one. As ONNX Runtime's own int8 model
    does, the head's input is quantized per call (uint8, one scale). In place; returns the
    tables' names."""
    g, names = model.graph, []
    for v in list(g.initializers.values()):
        t = v.const_value
        if (t is None or v.dtype != ir.DataType.FLOAT or len(t.shape) != 2
                or v.is_graph_input() or v.is_graph_output()):
            continue
        found = _tied_uses(g, v)
        if found is None:
            continue
        name = str(v.name)
        q_t, scale = quantize_int8(np.ascontiguousarray(t.numpy().T))   # [H, V], [V]
        codes = _initializer(g, f"{name}.int8", np.ascontiguousarray(q_t.T))
        rows = _initializer(g, f"{name}.row_scale", scale[:, None])
        head_q = _initializer(g, f"{name}.head_q", q_t)
        head_s = _initializer(g, f"{name}.head_scale", scale)
        gathers, heads = found
        for nd in gathers:
            ids, old = nd.inputs[1], nd.outputs[0]
            gq = ir.node("Gather", [codes, ids], {"axis": 0}, name=f"{nd.name}.q")
            cast = ir.node("Cast", [gq.outputs[0]], {"to": ir.DataType.FLOAT},
                           name=f"{nd.name}.cast")
            gs = ir.node("Gather", [rows, ids], {"axis": 0}, name=f"{nd.name}.scale")
            mul = ir.node("Mul", [cast.outputs[0], gs.outputs[0]], name=f"{nd.name}.dequant")
            g.insert_before(nd, [gq, cast, gs, mul])
            out = mul.outputs[0]
            out.dtype, out.shape = ir.DataType.FLOAT, old.shape
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            out.name = old.name
            g.remove(nd, safe=True)
        for nd in heads:
            x, bias, old = nd.inputs[0], (nd.inputs[2] if len(nd.inputs) > 2 else None), \
                nd.outputs[0]
            mm = ir.node("DynamicQuantizeMatMul",
                         [x, head_q, head_s, *([None, bias] if bias is not None else [])],
                         domain="com.microsoft", name=f"{nd.name}.int8")
            g.insert_before(nd, [mm])
            out = mm.outputs[0]
            out.dtype, out.shape = ir.DataType.FLOAT, old.shape
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            out.name = old.name
            g.remove(nd, safe=True)
        del g.initializers[name]
        model.opset_imports.setdefault("com.microsoft", 1)
        names.append(name)
    return names


def _nbytes(v: ir.Value) -> int | None:
    """Bytes of a value whose element type and dimensions are known, else None."""
    dims = list(v.shape) if v.shape is not None else [0]
    try:
        if v.dtype is not None and all(isinstance(d, int) and d > 0 for d in dims):
            return int(v.dtype.itemsize * math.prod(dims))
    except TypeError:  # an element type without a size (string, undefined)
        pass
    return None


def activation_bytes(model: ir.Model, input_shapes: Mapping[str, Sequence[int]],
                     bitstack_outputs: Mapping[str, Sequence[int]]) -> int:
    """Estimate of the peak bytes of live intermediate tensors of one run.

    ONNX shape inference (onnx-ir's ``ShapeInferencePass`` on a copy sharing the tensors)
    with the given input shapes (decoded BitStack weights, whose shapes the node attribute
    gives, are excluded: the planner counts them per layer), then a liveness scan in node
    order: a value lives from its producer to its last consumer.
    """
    m = model.clone()
    g = m.graph
    for v in g.inputs:
        if v.name in input_shapes:
            v.shape = ir.Shape([int(d) for d in input_shapes[v.name]])
    for nd in g:
        for v in nd.outputs:
            if v.name in bitstack_outputs:
                v.dtype, v.shape = ir.DataType.FLOAT, ir.Shape(list(bitstack_outputs[v.name]))
    ShapeInferencePass(check_type=False, strict_mode=False)(m)  # on failure: what is known
    order = {nd: i for i, nd in enumerate(g)}
    live: dict[ir.Value, int] = {}
    peak = 0
    for i, nd in enumerate(g):
        live.update({v: n for v in nd.outputs
                     if v.name not in bitstack_outputs and (n := _nbytes(v)) is not None})
        peak = max(peak, sum(live.values()))
        for v in list(live):
            if not v.is_graph_output() and max((order.get(u.node, -1) for u in v.uses()),
                                               default=-1) <= i:
                del live[v]
    return int(peak)


def read_onnx(src: Path, say: Callable[[str], None], *, what: str = "pack") -> ir.Model:
    """The ONNX model at ``src`` as an onnx-ir model whose external weights stay in their
    files (lazy tensors: read when used, memory-mapped); ``what`` starts the messages (the
    command).

    Raises:
        PackageError: ``src`` is not an ``.onnx`` file (a model source: ``edgestack pack
            SOURCE`` or :func:`edgestack.pipeline.pack_model` exports it first), is missing,
            cannot be read as ONNX (text, a truncated or corrupt file, a model without a
            graph), or names an external data file that is missing.
    """
    if src.suffix != ".onnx":
        raise PackageError(
            f"{what}: {src} is not an .onnx file; expected an ONNX file written by `edgestack "
            "export` (a model source: `edgestack pack SOURCE` or edgestack.pipeline.pack_model "
            "compresses and exports it first)")
    if not src.is_file():
        raise PackageError(f"{what}: {src}: no such ONNX file")
    say(f"{what}: reading {src}")
    fix = "expected an ONNX file written by `edgestack export`: export the model again"
    try:
        model = ir.load(src)
    except Exception as exc:
        why = " ".join(str(exc).split())[:200]
        raise PackageError(f"{what}: cannot read {src} as ONNX ({type(exc).__name__}: {why}); "
                           f"{fix}") from None
    if not model.graph.outputs or not (len(model.graph) or model.graph.inputs):
        raise PackageError(f"{what}: {src} holds no ONNX graph (no nodes or outputs: an empty, "
                           f"text or corrupt file); {fix}")
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor) and not Path(t.path).is_file():
                raise PackageError(f"{what}: {src}: initializer {v.name!r} is stored in the "
                                   f"external data file {str(t.location)!r}, which is missing "
                                   "next to it; copy the model with its data file(s), or "
                                   "export it again")
    return model


def _session_info(compiled: Mapping[str, Any]) -> dict[str, Any]:
    """What a compiled package's runtime session needs from ``metadata.compile``, typed into
    the manifest's ``runtime``: the ORT optimizers to turn off, TensorRT's build settings."""
    options = compiled.get("options") or {}
    return {"disabled_optimizers": tuple(disabled_optimizers(
                options.get("disabled_optimizers"))),
            "engine_build": compiled.get("build")}


def _golden_outputs(graph: Path, feeds: Mapping[str, Any], stacks: Mapping[str, Any],
                    attrs: Mapping[str, LayerGraph],
                    say: Callable[[str], None]) -> dict[str, np.ndarray]:
    """What ONNX Runtime gives on the packed ``graph`` for ``feeds``, every block fed."""
    say("pack: computing golden outputs with ONNX Runtime (every block)")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        full = dict(feeds)
        for layer, st in stacks.items():
            a = attrs[layer]
            full.update({a.signs: st.signs, a.u: st.u, a.v: st.v})
        outs = sess.run(None, full)
    except Exception as exc:
        raise PackageError(f"pack: ONNX Runtime cannot run the packed graph on the golden "
                           f"inputs ({str(exc)[:300]}); check the inputs' names and "
                           "shapes") from None
    return {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def check_out(out: str | os.PathLike[str], target: str, overwrite: bool) -> Path:
    """``out`` as a Path, after checking that ``target`` is packed and that ``out`` may be
    written (checked before any slow work).

    Raises:
        PackageError: an unsupported target, or ``out`` exists without ``overwrite``.
    """
    if target not in SUPPORTED_TARGETS:
        raise PackageError(f"pack: target {target!r} is not supported for device packages; "
                           f"expected one of {', '.join(SUPPORTED_TARGETS)}")
    out = Path(out)
    if os.path.lexists(out) and not overwrite:
        raise PackageError(f"pack: {out} already exists; pass --overwrite to replace it")
    return out


def _block_order(props: Mapping[str, str], attrs: Mapping[str, LayerGraph],
                 counts: Mapping[str, int], warns: list[str]) -> tuple[list[tuple[str, int]], str]:
    """``(the blocks' storage order, where it came from)``: the model's importance order, or
    level-major in graph order (with a warning) when it has no usable one."""
    if not counts:
        return [], "none"
    torch_names = {layer: a.torch_layer or layer for layer, a in attrs.items()}
    order, why = _order_from_metadata(props, torch_names, counts)
    if order is not None:
        return order, "model"
    msg = (f"no usable BitStack importance order ({why}); storing blocks level-major in graph "
           "order: tiers are valid but not importance-ranked. Re-export with this edgestack to "
           "keep the measured order")
    logger.warning(msg)
    warns.append(msg)
    return [(name, b) for b in range(max(counts.values()))
            for name, n in counts.items() if b < n], "level-major"


def _blocks_to_inputs(g: ir.Graph) -> tuple[dict[str, BitStackStack], dict[str, LayerGraph]]:
    """Every ``BitStackWeight`` node's ``signs``/``u``/``v`` initializers become graph inputs
    with a symbolic first dimension ``nb_<i>``: ``(layer -> its stack, layer -> its
    LayerGraph)``."""
    stacks: dict[str, BitStackStack] = {}
    attrs: dict[str, LayerGraph] = {}
    nodes = [nd for nd in g if nd.domain == "edgestack" and nd.op_type == "BitStackWeight"]
    for idx, node in enumerate(nodes):
        parts = [v for v in node.inputs if v is not None]
        missing = [v.name for v in parts if v.const_value is None]
        if len(node.inputs) != 3 or len(parts) != 3 or missing:
            raise PackageError(
                f"pack: BitStackWeight node {node.name!r} reads "
                f"{missing or [v and v.name for v in node.inputs]} which are not initializers; "
                "expected the exporter's layout (signs, u, v initializers)")
        shared = [v.name for v in parts if len(v.uses()) != 1]
        if shared:
            raise PackageError(f"pack: initializers {shared} of node {node.name!r} are also "
                               "used by other nodes; a BitStack layer must own its blocks")
        shape = list(node.attributes.get_ints("shape", []))
        if not shape:
            raise PackageError(f"pack: BitStackWeight node {node.name!r} has no 'shape'")
        torch_layer = node.metadata_props.get(LAYER_KEY, "")
        layer = torch_layer or str(node.name)
        if layer in stacks:
            layer = f"{layer}#{node.name}"
        try:
            signs, u, v = (p.const_value.numpy() for p in parts)  # type: ignore[union-attr]
            stacks[layer] = BitStackStack(signs, u, v, tuple(shape))
        except Exception as exc:  # FormatError
            raise PackageError(f"pack: node {node.name!r}: {exc}") from None
        st = stacks[layer]
        for p, arr, dtype in zip(parts, (st.signs, st.u, st.v), (ir.DataType.UINT8,
                                 ir.DataType.FLOAT16, ir.DataType.FLOAT16), strict=True):
            g.initializers.pop(str(p.name))
            p.const_value, p.dtype = None, dtype
            p.shape = ir.Shape([f"nb_{idx}", *arr.shape[1:]])
            g.inputs.append(p)
        attrs[layer] = LayerGraph(str(node.name), *(str(p.name) for p in parts),
                                  str(node.outputs[0].name), torch_layer)
    return stacks, attrs


def _write_graphs(model: ir.Model, gdir: Path, stacks: Mapping[str, BitStackStack],
                  attrs: dict[str, LayerGraph], golden_inputs: Mapping[str, Any] | None
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Table], dict[str, Table]]:
    """Write ``model.onnx`` with its weights file, the mixed and dense variants into ``gdir``:
    ``(golden inputs, what the packed graph is fed for them, mapped tables, gathered
    tables)``."""
    removed = {n for a in attrs.values() for n in (a.signs, a.u, a.v)}
    user_inputs = {str(v.name) for v in model.graph.inputs} - removed
    # the weights go to their file first: from here on every large initializer is a lazy
    # view of that file (the golden run loads the graph by path, nothing holds a copy)
    ir.external_data.unload_from_model(model, gdir, WEIGHTS_FILE,
                                       size_threshold_bytes=EXTERNAL_MIN_BYTES - 1)
    if not (gdir / WEIGHTS_FILE).stat().st_size:
        (gdir / WEIGHTS_FILE).unlink()
    ir.save(model, gdir / GRAPH_FILE)
    feeds = dict(golden_inputs) if golden_inputs else example_feeds(
        gdir / GRAPH_FILE, batch=1, seq=16, skip=removed)
    unknown = set(feeds) - user_inputs
    if unknown:
        raise PackageError(f"pack: golden inputs {sorted(unknown)} are not graph inputs; "
                           f"the graph takes {sorted(user_inputs)}")
    tables = gather_tables(model)
    gathered = pregather_tables(model, tables)
    shared = share_tables(model)
    feeds_run = dict(feeds)
    if gathered or shared:  # the graph edited: lookups out, shared tables overridable
        ir.save(model, gdir / GRAPH_FILE)
    if gathered:  # what the graph is fed for them (their bytes stay in the weights file)
        data = np.memmap(gdir / WEIGHTS_FILE, dtype=np.uint8, mode="r")
        for spec in gathered.values():
            for ids, value in spec.lookups:
                feeds_run[value] = gather_rows(lookup_table(data, spec), feeds[ids], value)
        del data
    if stacks:  # every BitStack layer as a site (forms on-the-fly / int8 / fp32)
        shapes = {layer: list(st.shape) for layer, st in stacks.items()}
        ir.save(add_sites(model, attrs, shapes), gdir / VARIANT_FILE)  # the same weights
        for form, fname in DENSE_FILES.items():  # every layer int8 / nbits8 / fp32: no If
            dense = dense_graph(model, attrs, form)   # None: a generic site
            if dense is not None:
                ir.save(dense, gdir / fname)
    return feeds, feeds_run, tables, gathered


def _method(props: Mapping[str, str], tiered: bool) -> str:
    """The compression method the model's metadata names (JSON or plain; new key, old key)."""
    key = next((k for k in ("edgestack.method", "method") if k in props), None)
    if key is None:
        return "bitstack" if tiered else ""
    try:
        return str(json.loads(props[key]))
    except ValueError:
        return props[key]


def pack(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    target: str = "ort-cpu",
    profile: Any = None,
    name: str | None = None,
    golden_inputs: Mapping[str, np.ndarray] | None = None,
    steps_per_level: int = DEFAULT_STEPS_PER_LEVEL,
    overwrite: bool = False,
    created: str | None = None,
    log: Callable[[str], None] | None = None,
    model: ir.Model | None = None,
    golden_outputs: Mapping[str, np.ndarray] | None = None,
    tolerance: tuple[float, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_context: int | None = None,
    max_batch: int = 1,
    prefill_chunk: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    tied_tables: str = "int8",
) -> PackResult:
    """Write a device package for ``source`` at ``out`` (a directory, or ``.tar``).

    A model source (folder, ``module:factory``, built-in name) is compressed and exported
    first by :func:`edgestack.pipeline.pack_model` (what ``edgestack pack`` calls), which also
    stores large embedding tables int8; this layer packs ONNX only.

    Args:
        source: an ONNX file written by ``edgestack export`` (any edgestack ONNX; without
            BitStack nodes the package has one tier); with ``model``, only what the manifest
            records as the source.
        out: the package directory, or an archive path ending in ``.tar``.
        target: the package's target: ``ort-cpu``, ``ort-arm`` or ``openvino-cpu`` (see
            :data:`SUPPORTED_TARGETS`).
        profile: a :class:`~edgestack.profiles.Profile` or name; its target must match and
            its name is recorded in the manifest metadata.
        name: the model name in the manifest (default: the source's stem).
        model: the onnx-ir model to pack instead of reading ``source`` (changed: pack edits
            it in place; its external tensors may stay lazy).
        golden_inputs: inputs for the self-test (default: generated, see module doc).
        steps_per_level: tiers between level boundaries (default 4).
        overwrite: replace an existing package at ``out``.
        created: ISO 8601 creation time (fix it for byte-identical packages).
        log: progress callback (default: the ``edgestack.package`` logger).
        golden_outputs: the golden outputs for ``golden_inputs`` (default: what ONNX
            Runtime gives on the packed graph, every block fed), e.g. the source model's
            outputs for a compiled graph.
        tolerance: ``(rtol, atol)`` of the self-test (default ``(1e-3, 1e-4)``).
        metadata: more manifest metadata (free-form extras, e.g. ``{"compile": ...}``: what
            a target's lowering did); ``profile`` is the packer's.
        max_context, max_batch, prefill_chunk: a decoder (a graph with ``edgestack.decoder``
            metadata, see :mod:`edgestack.packer.decoder`): the context (prompt + new
            tokens) and batch the memory plan covers, and the most prompt tokens one call
            feeds (defaults: the model's positions capped at 1024, 1, 64).
        tokenizer: a decoder: a folder with ``tokenizer.json`` (and its configs) to store
            in the package, so ``edgestack run --prompt`` can encode text.
        tied_tables: a float32 table shared by an LM head and the word embedding:
            ``"int8"`` (default; :func:`quantize_tied_tables`; tiered targets) or ``"float"``
            (kept as exported, an overridable initializer: :func:`share_tables`;
            :func:`edgestack.pipeline.compile_model` packs with it).

    Raises:
        PackageError: unsupported target, a source that is not an edgestack ONNX file, a
            BitStack node whose inputs are not initializers, or a write failure (nothing
            is left at ``out``).
    """
    say = log or logger.info
    if isinstance(profile, str):
        profile = load_profile(profile)
    if profile is not None and target != profile.target:
        raise PackageError(
            f"pack: profile {profile.name!r} targets {profile.target!r} but the package target "
            f"is {target!r}; packages support {', '.join(SUPPORTED_TARGETS)}: use a profile "
            "with one of those targets")
    out = check_out(out, target, overwrite)
    work = atomic.temp_dir("pack")  # removed below; after a kill, by the next run
    try:
        if model is None:
            model = read_onnx(Path(source), say)
        NameFixPass()(model)  # the manifest names BitStack nodes: ONNX allows empty, repeated
        contract = contract_of(model.metadata_props)
        given = {k: v for k, v in (("max_context", max_context), ("prefill_chunk",
                 prefill_chunk), ("tokenizer", tokenizer)) if v is not None}
        if max_batch != 1:
            given["max_batch"] = max_batch
        if contract is None and given:
            raise PackageError(f"pack: {', '.join(sorted(given))} apply to a decoder exported "
                               "with a KV cache (`edgestack export MODEL --task "
                               "text-generation`); this graph has no edgestack.decoder metadata")
        tok_files = tokenizer_files(tokenizer) if tokenizer is not None else {}
        if contract is not None and golden_inputs is None:
            golden_inputs = golden_prompt(contract)
        if tied_tables not in ("int8", "float"):
            raise PackageError(f"pack: tied_tables must be 'int8' or 'float', found "
                               f"{tied_tables!r}")
        if tied_tables == "int8" and target in TIERED_TARGETS:
            for tname in quantize_tied_tables(model):
                say(f"pack: the tied LM head / word embedding {tname!r} stored int8 per row")
        stacks, attrs = _blocks_to_inputs(model.graph)
        if stacks and target not in TIERED_TARGETS:
            raise PackageError(
                f"pack: target {target} serves no BitStack tiers (tiered targets: "
                f"{', '.join(TIERED_TARGETS)}); found {len(stacks)} BitStack layer(s). To "
                f"fix: `edgestack compile MODEL --target {target}` materialises them")
        warns: list[str] = []
        counts = {n: s.n_blocks for n, s in stacks.items()}
        order, order_source = _block_order(model.metadata_props, attrs, counts, warns)
        gdir = work / "graph"
        gdir.mkdir()
        feeds, feeds_run, tables, gathered = _write_graphs(model, gdir, stacks, attrs,
                                                           golden_inputs)
        # golden outputs at the last tier (every block fed)
        golden_out = ({k: np.asarray(v) for k, v in golden_outputs.items()}
                      if golden_outputs is not None else
                      _golden_outputs(gdir / GRAPH_FILE, feeds_run, stacks, attrs, say))
        extra = dict(metadata or {})
        shapes = {k: list(np.shape(v)) for k, v in feeds_run.items()}
        excluded = {a.output: stacks[layer].shape for layer, a in attrs.items()}
        dec = None
        if contract is not None:   # the worst call the plan covers; the cache is its own line
            dec = decoder_info(contract, max_context=max_context, max_batch=max_batch,
                               prefill_chunk=prefill_chunk,
                               positions=positions_of(contract, gathered),
                               tokenizer=tuple(tok_files))
            shapes = worst_call_shapes(dec)
            for spec in gathered.values():
                for ids, value in spec.lookups:
                    shapes[value] = [*shapes[ids], *spec.shape[1:]]
            excluded.update(cache_outputs(dec))
        runtime = RuntimeInfo(
            activation_bytes=activation_bytes(model, shapes, excluded),
            input_shapes={k: list(np.shape(v)) for k, v in feeds.items()},
            weights_file=WEIGHTS_FILE if (gdir / WEIGHTS_FILE).exists() else None,
            order_source=order_source, steps_per_level=steps_per_level,
            rows_per_call=max((int(np.asarray(v).size) for v in feeds.values()
                               if np.asarray(v).dtype.kind in "iu"), default=0),
            tables=tables, gathered=gathered, decoder=dec,
            **_session_info(extra.get("compile") or {}))
        tier_counts = choose_tiers(order, counts, steps_per_level) if stacks else []
        dest = work / "pkgdir" if out.suffix == ARCHIVE_SUFFIX else out
        say(f"pack: writing {out} ({len(stacks)} BitStack layers, {len(order)} blocks, "
            f"{len(tier_counts) or 1} tiers)")
        with PackageWriter(dest, overwrite=overwrite) as w:
            w.begin(name=name or Path(source).stem, target=target, source=str(source),
                    method=_method(model.metadata_props, bool(stacks)),
                    metadata={"profile": getattr(profile, "name", None),
                              **{k: v for k, v in extra.items() if k != "profile"}},
                    created=created, runtime=runtime)
            for fname in (GRAPH_FILE, VARIANT_FILE, *DENSE_FILES.values(), WEIGHTS_FILE):
                if (gdir / fname).exists():
                    w.add_file(fname, gdir / fname, role="graph" if fname == GRAPH_FILE else
                               "weights" if fname == WEIGHTS_FILE else "variant")
            for fname, path in tok_files.items():
                w.add_file(fname, path, role="tokenizer")
            if stacks:
                w.add_blocks(order, stacks, graphs=attrs)
                w.set_tiers(tier_counts)
            rtol, atol = tolerance or (1e-3, 1e-4)
            w.add_golden(feeds, golden_out, tier=None, rtol=rtol, atol=atol)
            w.finish()
        if dest != out:
            write_archive(dest, out, overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with Package.open(out) as pkg:
        tiers = [{"index": t.index, "records": t.n_records, "bytes": t.bytes,
                  "total_bytes": t.total_bytes} for t in pkg.tiers]
        files = {n: e.size for n, e in pkg.files.items()}
    say(f"pack: wrote {out}")
    return PackResult(out, len(stacks), len(order), tiers, order_source, files, warns)


__all__ = ["pack", "PackResult", "choose_tiers", "activation_bytes", "gather_tables",
           "pregather_tables", "share_tables", "quantize_tied_tables", "read_onnx", "check_out",
           "SUPPORTED_TARGETS", "GRAPH_FILE", "WEIGHTS_FILE"]
