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
"""

from __future__ import annotations

import contextlib
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

from edgestack.core import atomic
from edgestack.errors import PackageError
from edgestack.package.format import (
    ARCHIVE_SUFFIX,
    DENSE_FILES,
    SUPPORTED_TARGETS,
    TIERED_TARGETS,
    VARIANT_FILE,
    LayerGraph,
    RuntimeInfo,
    Table,
)
from edgestack.package.tables import gather_rows, lookup_table
from edgestack.package.variants import add_sites, dense_graph

logger = logging.getLogger("edgestack.package")

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


def _name_nodes(graph: Any) -> None:
    """Give every unnamed (or repeated-name) node a unique name: the manifest refers to the
    BitStack nodes by name, and ONNX allows empty and repeated names."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)


def _check_target(target: str) -> str:
    if target not in SUPPORTED_TARGETS:
        raise PackageError(
            f"pack: target {target!r} is not supported for device packages; expected one of "
            f"{', '.join(SUPPORTED_TARGETS)}"
        )
    return target


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


def _level_major(layers: Mapping[str, int]) -> list[tuple[str, int]]:
    top = max(layers.values())
    return [(name, b) for b in range(top) for name, n in layers.items() if b < n]


def _order_from_metadata(model: Any, torch_names: Mapping[str, str],
                         layers: Mapping[str, int]) -> tuple[list[tuple[str, int]] | None, str]:
    """The importance order in manifest layer names, or ``(None, why)``."""
    from edgestack.formats.bitstack import META_BITSTACK_ORDER as ORDER_KEY

    props = {p.key: p.value for p in model.metadata_props}
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
    from edgestack.package.format import LayerInfo, layout_records

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


def gather_tables(model: Any) -> dict[str, Table]:
    """External initializers of at least :data:`TABLE_MIN_BYTES` read only as the data of a
    ``Gather`` on axis 0 (embedding tables), as :class:`~.format.Table` (``dtype``: numpy's
    ``dtype.str``).

    A call reads only the rows its indices name: :func:`pregather_tables` moves the lookups
    with graph-input indices out of the graph (the runtime reads those rows itself); the
    runtime memory-maps the others and hands their pages back after each call. Uses in
    nested graphs count: a table used by anything else is not a table.
    """
    from onnx import TensorProto, helper
    from onnx.helper import tensor_dtype_to_np_dtype

    uses: dict[str, list[tuple[Any, int]]] = {}

    def scan(graph: Any) -> None:
        for nd in graph.node:
            for i, name in enumerate(nd.input):
                uses.setdefault(name, []).append((nd, i))
            for a in nd.attribute:
                for sub in ([a.g] if a.type == a.GRAPH else list(a.graphs)):
                    scan(sub)

    scan(model.graph)

    def gather0(nd: Any, i: int) -> bool:
        axis = next((helper.get_attribute_value(a) for a in nd.attribute if a.name == "axis"), 0)
        return nd.op_type == "Gather" and nd.domain in ("", "ai.onnx") and i == 0 and axis == 0

    out = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL or len(t.dims) < 1 or t.dims[0] < 1:
            continue
        info = {kv.key: kv.value for kv in t.external_data}
        length = int(info.get("length", 0))
        users = uses.get(t.name, [])
        if length >= TABLE_MIN_BYTES and users and all(gather0(nd, i) for nd, i in users):
            out[t.name] = Table(int(info.get("offset", 0)), tuple(t.dims),
                                np.dtype(tensor_dtype_to_np_dtype(t.data_type)).str)
    return out


def pregather_tables(model: Any, tables: dict[str, Table]) -> dict[str, Table]:
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
    from onnx import helper

    g = model.graph
    inputs = {vi.name: vi for vi in g.input}
    outputs = {o.name for o in g.output}
    out: dict[str, dict[str, Any]] = {}
    for name in list(tables):
        users = [nd for nd in g.node if name in nd.input]
        if not users or not all(nd.input[1] in inputs and nd.output[0] not in outputs
                                for nd in users):
            continue
        spec = tables.pop(name)
        lookups = []
        for nd in users:
            ids = inputs[nd.input[1]]
            dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
            et = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
            g.input.append(helper.make_tensor_value_info(nd.output[0], et,
                                                         [*dims, *spec.shape[1:]]))
            lookups.append((nd.input[1], nd.output[0]))
            g.node.remove(nd)
        init = next(t for t in g.initializer if t.name == name)
        g.initializer.remove(init)
        out[name] = replace(spec, lookups=tuple(lookups))
    return out


def activation_bytes(model: Any, input_shapes: Mapping[str, Sequence[int]],
                     bitstack_outputs: Mapping[str, Sequence[int]]) -> int:
    """Estimate of the peak bytes of live intermediate tensors of one run.

    ONNX shape inference with the given input shapes (decoded BitStack weights, whose shapes
    the node attribute gives, are excluded: the planner counts them per layer), then a
    liveness scan in node order: a value lives from its producer to its last consumer.
    """
    import onnx
    from onnx import helper, shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for vi in g.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[vi.name], strict=False):
                d.Clear()
                d.dim_value = int(v)
    for name, shape in bitstack_outputs.items():
        g.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                          list(shape)))
    with contextlib.suppress(Exception):  # an estimate: fall back to what is known
        m = shape_inference.infer_shapes(m, data_prop=True)
    sizes: dict[str, int] = {}
    for vi in list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        try:
            dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except (KeyError, TypeError, ValueError):  # undefined or unknown element type
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if any(d <= 0 for d in dims) and dims:
            continue
        sizes[vi.name] = int(np.dtype(dt).itemsize * math.prod(dims))
    for name in bitstack_outputs:
        sizes.pop(name, None)
    nodes = list(m.graph.node)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in m.graph.output}
    live: dict[str, int] = {}
    peak = 0
    for i, node in enumerate(nodes):
        for name in node.output:
            if name in sizes:
                live[name] = sizes[name]
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= i and name not in outputs:
                del live[name]
    return int(peak)


def read_onnx(src: Path, say: Callable[[str], None], *, load_external_data: bool = True,
              what: str = "pack") -> Any:
    """The ONNX model at ``src`` (its external data loaded unless ``load_external_data`` is
    False: then only checked to exist, for a quick look before slow work); ``what`` starts
    the messages (the command).

    Raises:
        PackageError: ``src`` is not an ``.onnx`` file (a model source: ``edgestack pack
            SOURCE`` or :func:`edgestack.pipeline.pack_model` exports it first), is missing,
            cannot be read as ONNX (text, a truncated or corrupt file, a model without a
            graph), or names an external data file that is missing.
    """
    import onnx

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
        model = onnx.load(str(src), load_external_data=load_external_data)
    except Exception as exc:
        why = " ".join(str(exc).split())[:200]
        raise PackageError(f"{what}: cannot read {src} as ONNX ({type(exc).__name__}: {why}); "
                           f"{fix}") from None
    if not model.graph.output or not (model.graph.node or model.graph.input):
        raise PackageError(f"{what}: {src} holds no ONNX graph (no nodes or outputs: an empty, "
                           f"text or corrupt file); {fix}")
    if not load_external_data:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if not loc or not (src.parent / loc).is_file():
                raise PackageError(f"{what}: {src}: initializer {t.name!r} is stored in the "
                                   f"external data file {loc!r}, which is missing next to it; "
                                   "copy the model with its data file(s), or export it again")
    return model


def _session_info(compiled: Mapping[str, Any]) -> dict[str, Any]:
    """What a compiled package's runtime session needs from ``metadata.compile``, typed into
    the manifest's ``runtime``: the ORT optimizers to turn off, TensorRT's build settings."""
    from edgestack.core.ort import disabled_optimizers

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
    _check_target(target)
    out = Path(out)
    if os.path.lexists(out) and not overwrite:
        raise PackageError(f"pack: {out} already exists; pass --overwrite to replace it")
    return out


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
    model: Any = None,
    golden_outputs: Mapping[str, np.ndarray] | None = None,
    tolerance: tuple[float, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
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
        model: the ONNX ``ModelProto`` to pack (external data loaded) instead of reading
            ``source``.
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

    Raises:
        PackageError: unsupported target, a source that is not an edgestack ONNX file, a
            BitStack node whose inputs are not initializers, or a write failure (nothing
            is left at ``out``).
    """
    say = log or logger.info
    warns: list[str] = []
    if profile is not None:
        if isinstance(profile, str):
            from edgestack.profiles import load_profile

            profile = load_profile(profile)
        if target != profile.target:
            raise PackageError(
                f"pack: profile {profile.name!r} targets {profile.target!r} but the "
                f"package target is {target!r}; packages support "
                f"{', '.join(SUPPORTED_TARGETS)}: use a profile with one of those targets"
            )
    out = check_out(out, target, overwrite)
    archive = out.suffix == ARCHIVE_SUFFIX
    src = Path(source)
    work = atomic.temp_dir("pack")  # removed below; after a kill, by the next run
    try:
        if model is None:
            model = read_onnx(src, say)
        result = _pack_model(model, out, archive=archive, target=target, profile=profile,
                             name=name or src.stem, source=str(source), work=work,
                             golden_inputs=golden_inputs, steps_per_level=steps_per_level,
                             overwrite=overwrite, created=created, say=say, warns=warns,
                             golden_outputs=golden_outputs, tolerance=tolerance,
                             extra=dict(metadata or {}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _pack_model(model: Any, out: Path, *, archive: bool, target: str, profile: Any, name: str,
                source: str, work: Path, golden_inputs: Any, steps_per_level: int,
                overwrite: bool, created: str | None, say: Callable[[str], None],
                warns: list[str], golden_outputs: Mapping[str, np.ndarray] | None = None,
                tolerance: tuple[float, float] | None = None,
                extra: dict[str, Any] | None = None) -> PackResult:
    import onnx
    from onnx import helper, numpy_helper

    from edgestack.formats.bitstack import NODE_LAYER_KEY as LAYER_KEY
    from edgestack.formats.bitstack import BitStackStack
    from edgestack.package.archive import write_archive
    from edgestack.package.writer import PackageWriter

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    stacks: dict[str, BitStackStack] = {}
    attrs: dict[str, LayerGraph] = {}
    removed: set[str] = set()
    new_inputs = []
    bs_outputs: dict[str, list[int]] = {}     # BitStack node output -> weight shape
    uses: dict[str, int] = {}
    _name_nodes(g)
    for node in g.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    for idx, node in enumerate(n for n in g.node
                               if n.domain == "edgestack" and n.op_type == "BitStackWeight"):
        missing = [i for i in node.input[:3] if i not in inits]
        if len(node.input) != 3 or missing:
            raise PackageError(
                f"pack: BitStackWeight node {node.name!r} reads {missing or list(node.input)} "
                "which are not initializers; expected the exporter's layout (signs, u, v "
                "initializers)"
            )
        shared = [i for i in node.input if uses.get(i, 0) != 1]
        if shared:
            raise PackageError(f"pack: initializers {shared} of node {node.name!r} are also "
                               "used by other nodes; a BitStack layer must own its blocks")
        shape = next((list(a.ints) for a in node.attribute if a.name == "shape"), None)
        if not shape:
            raise PackageError(f"pack: BitStackWeight node {node.name!r} has no 'shape'")
        meta = {p.key: p.value for p in node.metadata_props}
        layer = meta.get(LAYER_KEY) or node.name or f"bitstack_{idx}"
        if layer in stacks:
            layer = f"{layer}#{node.name or idx}"
        signs, u, v = (numpy_helper.to_array(inits[i]) for i in node.input)
        try:
            stacks[layer] = BitStackStack(signs, u, v, tuple(shape))
        except Exception as exc:  # FormatError
            raise PackageError(f"pack: node {node.name!r}: {exc}") from None
        dim = f"nb_{idx}"
        for nm, arr, et in zip(node.input, (signs, u, v),
                               (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16,
                                onnx.TensorProto.FLOAT16), strict=True):
            new_inputs.append(helper.make_tensor_value_info(nm, et, [dim, *arr.shape[1:]]))
            removed.add(nm)
        attrs[layer] = LayerGraph(node.name, node.input[0], node.input[1], node.input[2],
                                  node.output[0], meta.get(LAYER_KEY, ""))
        bs_outputs[node.output[0]] = shape

    if stacks and target not in TIERED_TARGETS:
        raise PackageError(
            f"pack: target {target} serves no BitStack tiers (tiered targets: "
            f"{', '.join(TIERED_TARGETS)}); found {len(stacks)} BitStack layer(s). To fix: "
            f"`edgestack compile MODEL --target {target}` materialises them")
    keep = [t for t in g.initializer if t.name not in removed]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.input.extend(new_inputs)
    user_inputs = {vi.name for vi in g.input} - removed

    counts = {n: s.n_blocks for n, s in stacks.items()}
    order: list[tuple[str, int]] = []
    order_source = "none"
    if stacks:
        torch_names = {layer: a.torch_layer or layer for layer, a in attrs.items()}
        got, why = _order_from_metadata(model, torch_names, counts)
        if got is None:
            msg = (f"no usable BitStack importance order ({why}); storing blocks level-major "
                   "in graph order: tiers are valid but not importance-ranked. Re-export with "
                   "this edgestack to keep the measured order")
            logger.warning(msg)
            warns.append(msg)
            order, order_source = _level_major(counts), "level-major"
        else:
            order, order_source = got, "model"

    # golden inputs/outputs at the last tier (every block fed)
    if golden_inputs:
        feeds = dict(golden_inputs)
    else:
        from edgestack.targets.feeds import example_feeds

        feeds = example_feeds(g, batch=1, seq=16, skip=removed)
    unknown = set(feeds) - user_inputs
    if unknown:
        raise PackageError(f"pack: golden inputs {sorted(unknown)} are not graph inputs; "
                           f"the graph takes {sorted(user_inputs)}")
    # write the graph with external weights first: the golden run then loads the file and
    # the later steps work on a proto that no longer holds the weight bytes (no full copy)
    gdir = work / "graph"
    gdir.mkdir()
    onnx.save_model(model, str(gdir / GRAPH_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=WEIGHTS_FILE,
                    size_threshold=EXTERNAL_MIN_BYTES)
    has_weights = (gdir / WEIGHTS_FILE).exists()
    tables = gather_tables(model) if has_weights else {}
    gathered = pregather_tables(model, tables)
    if gathered:  # the graph without those lookups (their bytes stay in the weights file)
        onnx.save_model(model, str(gdir / GRAPH_FILE))
        feeds_run = dict(feeds)
        data = np.memmap(gdir / WEIGHTS_FILE, dtype=np.uint8, mode="r")
        for spec in gathered.values():
            table = lookup_table(data, spec)
            for ids, value in spec.lookups:
                feeds_run[value] = gather_rows(table, feeds[ids], value)
        del data
    else:
        feeds_run = feeds
    if stacks:  # every BitStack layer as a site (forms on-the-fly / int8 / fp32)
        variant = add_sites(model, attrs, {layer: list(st.shape) for layer, st in stacks.items()})
        onnx.save_model(variant, str(gdir / VARIANT_FILE))  # same external data, same offsets
        del variant
        for form, fname in DENSE_FILES.items():  # every layer int8 / fp32: no If
            dense = dense_graph(model, attrs, form, str(gdir))   # None: a generic site
            if dense is not None:
                onnx.save_model(dense, str(gdir / fname))
            del dense
    if golden_outputs is not None:
        golden_out = {k: np.asarray(v) for k, v in golden_outputs.items()}
    else:
        golden_out = _golden_outputs(gdir / GRAPH_FILE, feeds_run, stacks, attrs, say)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    act = activation_bytes(model, {**shapes, **{k: list(np.shape(v)) for k, v in
                                                feeds_run.items()}}, bs_outputs)
    rows = max((int(np.asarray(v).size) for v in feeds.values()
                if np.asarray(v).dtype.kind in "iu"), default=0)

    runtime = RuntimeInfo(activation_bytes=act, input_shapes=shapes,
                          weights_file=WEIGHTS_FILE if has_weights else None,
                          order_source=order_source, steps_per_level=steps_per_level,
                          rows_per_call=rows, tables=tables, gathered=gathered,
                          **_session_info((extra or {}).get("compile") or {}))
    metadata = {"profile": getattr(profile, "name", None)}
    metadata.update({k: v for k, v in (extra or {}).items() if k not in metadata})
    props = {p.key: p.value for p in model.metadata_props}
    method = ""
    key = next((k for k in ("edgestack.method", "method") if k in props), None)  # new, old
    if key is not None:
        try:
            method = str(json.loads(props[key]))
        except ValueError:
            method = props[key]
    elif stacks:
        method = "bitstack"
    tier_counts = choose_tiers(order, counts, steps_per_level) if stacks else []
    dest = out
    if archive:
        dest = work / "pkgdir"
    say(f"pack: writing {out} ({len(stacks)} BitStack layers, {len(order)} blocks, "
        f"{len(tier_counts) or 1} tiers)")
    with PackageWriter(dest, overwrite=overwrite) as w:
        w.begin(name=name, target=target, source=source, method=method, metadata=metadata,
                created=created, runtime=runtime)
        w.add_file(GRAPH_FILE, gdir / GRAPH_FILE, role="graph")
        if stacks:
            w.add_file(VARIANT_FILE, gdir / VARIANT_FILE, role="variant")
            for fname in DENSE_FILES.values():
                if (gdir / fname).exists():
                    w.add_file(fname, gdir / fname, role="variant")
        if has_weights:
            w.add_file(WEIGHTS_FILE, gdir / WEIGHTS_FILE, role="weights")
        if stacks:
            w.add_blocks(order, stacks, graphs=attrs)
            w.set_tiers(tier_counts)
        rtol, atol = tolerance or (1e-3, 1e-4)
        w.add_golden(feeds, golden_out, tier=None, rtol=rtol, atol=atol)
        w.finish()
    if archive:
        write_archive(dest, out, overwrite=overwrite)
    from edgestack.package.reader import Package

    with Package.open(out) as pkg:
        tiers = [{"index": t.index, "records": t.n_records, "bytes": t.bytes,
                  "total_bytes": t.total_bytes} for t in pkg.tiers]
        files = {n: e.size for n, e in pkg.files.items()}
    say(f"pack: wrote {out}")
    return PackResult(out, len(stacks), len(order), tiers, order_source, files, warns)


__all__ = ["pack", "PackResult", "choose_tiers", "activation_bytes", "gather_tables",
           "pregather_tables", "SUPPORTED_TARGETS",
           "GRAPH_FILE", "WEIGHTS_FILE"]
