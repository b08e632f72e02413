"""``export()``: a (compressed) torch model to an ONNX file that keeps the compression.

Steps, each failing with an :class:`~edgestack.errors.ExportError` that names the step:

1. run the model on the example inputs (eval mode, no grad): the torch reference outputs and
   their names (:mod:`edgestack.exporter.signature`);
2. ``torch.export.export`` (non-strict); every ``torch.ops.edgestack`` op in the program must
   have a translation in :data:`edgestack.exporter.ops.OPS`;
3. ``torch.onnx.export`` of that program with the ops' translation table: compressed weights
   become ``edgestack.ShiftWeight`` / ``edgestack.BitStackWeight`` nodes over the packed
   initializers (BitStack layers export their active prefix of blocks);
4. add the ONNX functions of the ops used (``model.functions``), tag each ``edgestack`` node
   with its torch layer (node metadata ``edgestack.layer``), write model metadata, store
   each tied tensor once (:mod:`edgestack.exporter.ties`); for a
   compressed model, store the large embedding tables as int8 per row
   (:mod:`edgestack.exporter.passes.compact_embeddings`, ``compact_embeddings=False`` to
   keep them float);
5. save into a staging folder next to ``out`` (initializers as external data when large),
   run ``onnx.checker.check_model(path, full_check=True)``;
6. parity: ONNX Runtime vs torch (:mod:`edgestack.exporter.parity`); a failed parity is
   reported in the result, never raised. When embedding tables were compacted, the torch
   reference runs with those tables replaced by their stored int8 values times the row
   scale (:func:`compacted_tables`): parity checks the export at the usual tolerance, and
   a note gives what the int8 tables change against the fp32-table torch model;
7. move the files into place (:mod:`edgestack.exporter.output`: the data file is named
   ``<out>.<sha256 prefix>.data``, and the new pair replaces an earlier export so that a
   kill at any instant leaves one whole pair): on any failure ``out`` is left as it was.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

import edgestack
from edgestack.core import atomic
from edgestack.core.compare import error_stats
from edgestack.core.logs import quiet_loggers
from edgestack.core.progress import Progress, Stages
from edgestack.errors import ExportError
from edgestack.exporter import ops as es_ops
from edgestack.exporter import output as files
from edgestack.exporter.parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport, check_parity
from edgestack.exporter.passes import CompactEmbeddingsPass, describe, quantize_rows
from edgestack.exporter.signature import (
    ModelInputs,
    flatten_outputs,
    normalize_inputs,
    unique_names,
)
from edgestack.exporter.ties import META_TIED, retie, tied_weights

# the BitStack order (written when the model has ``edgestack_bitstack_order``) and the layer
# tag of every edgestack node: defined with the format, so the packer needs no exporter
from edgestack.formats.bitstack import META_BITSTACK_ORDER, NODE_LAYER_KEY

logger = logging.getLogger("edgestack.exporter")

EXTERNAL_DATA_THRESHOLD = 100 * 2**20
"""``external_data="auto"`` writes initializers externally above this many bytes (100 MiB)."""

EXTERNAL_MIN_TENSOR_BYTES = 1024
"""Tensors below this size stay inside the ``.onnx`` file even with external data."""

def meta_key(key: str) -> str:
    """A caller's metadata key in the ``edgestack.`` namespace (a key that already names a
    namespace, ``a.b``, is kept)."""
    return key if "." in key else f"edgestack.{key}"


# Model metadata_props keys written by export().
META_VERSION = "edgestack.version"
META_DOMAIN_VERSION = "edgestack.domain_version"
META_LOWRANK = "edgestack.lowrank_layers"
META_COMPRESSION = "edgestack.compression"
META_LAYERS = "edgestack.layers"

_MESSAGE_LINES = 12


@dataclass
class ExportResult:
    """What :func:`export` wrote and measured.

    Attributes:
        path: the ONNX file.
        data_path: the external data file, or None when all weights are inside ``path``.
        input_names, output_names: graph inputs and outputs, in order.
        custom_nodes: ``{op type: count}`` of ``edgestack`` nodes in the graph.
        layers: ``{node name: torch layer name}`` of the ``edgestack`` nodes.
        lowrank_layers: names of the low-rank layers (standard MatMul/Conv chains).
        parity: the parity report, or None when parity was off.
        file_bytes: size of ``path`` plus ``data_path``.
        seconds: wall time per step (``forward``, ``torch_export``, ``onnx``, ``save``,
            ``check``, ``parity``, ``total``).
        compact_embeddings: the tables stored as int8 per row (entries of the model
            metadata ``edgestack.compact_embeddings``: ``name``, ``bits``, ``rows``,
            ``cols``, ``bytes_before``, ``bytes_after``); empty when none were.
        tied_weights: the torch parameters that are one tensor (an LM head tied to the
            input embedding) and how the graph stores them (:func:`tied_weights`; model
            metadata ``edgestack.tied_weights``); empty when none are.
        decoder: a text-generation export's I/O contract
            (:class:`edgestack.core.decoding.DecoderContract`, from
            :func:`edgestack.exporter.decoder.export_decoder`), else None.
    """

    path: Path
    data_path: Path | None
    input_names: list[str]
    output_names: list[str]
    custom_nodes: dict[str, int]
    layers: dict[str, str]
    lowrank_layers: list[str]
    parity: ParityReport | None
    file_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    compact_embeddings: list[dict[str, Any]] = field(default_factory=list)
    tied_weights: list[dict[str, Any]] = field(default_factory=list)
    decoder: Any = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "path": str(self.path),
            "data_path": None if self.data_path is None else str(self.data_path),
            "input_names": self.input_names,
            "output_names": self.output_names,
            "custom_nodes": self.custom_nodes,
            "layers": self.layers,
            "lowrank_layers": self.lowrank_layers,
            "parity": None if self.parity is None else self.parity.to_dict(),
            "file_bytes": self.file_bytes,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "compact_embeddings": [dict(t) for t in self.compact_embeddings],
            "tied_weights": [dict(t) for t in self.tied_weights],
            "decoder": None if self.decoder is None else json.loads(self.decoder.to_json()),
        }

    def summary(self) -> str:
        """A few human-readable lines: file, size, custom nodes, time."""
        nodes = ", ".join(f"{n} x{c}" for n, c in sorted(self.custom_nodes.items())) or "none"
        lines = [
            f"export: {self.path} ({self.file_bytes / 1e6:.2f} MB"
            + (f", weights in {self.data_path.name}" if self.data_path else "") + ")",
            f"  inputs {', '.join(self.input_names)} -> outputs {', '.join(self.output_names)}",
            f"  edgestack nodes: {nodes}"
            + (f"; low-rank layers: {len(self.lowrank_layers)}" if self.lowrank_layers else ""),
        ]
        if self.compact_embeddings:
            lines.append("  int8 embedding tables: " + ", ".join(
                f"{t['name']} ({t['bytes_before'] / 1e6:.1f} -> {t['bytes_after'] / 1e6:.1f} MB)"
                for t in self.compact_embeddings))
        if self.decoder is not None:
            d = self.decoder
            lines.append(f"  decoder with KV cache: {d.num_layers} layers, kv heads "
                         f"{list(d.kv_heads)}, head_dim {d.head_dim}, vocab {d.vocab_size}; "
                         f"cache {d.past_key.replace('{layer}', 'i')}/.value -> "
                         f"{d.present_key.replace('{layer}', 'i')}/.value [batch, kv_heads, "
                         "past_sequence(+sequence), head_dim]")
        for t in self.tied_weights:
            lines.append(f"  tied weights: {' = '.join(t['parameters'])} stored "
                         f"{t['copies']}x ({t['bytes'] / 1e6:.2f} MB each)")
        lines += [
            f"  took {self.seconds.get('total', 0.0):.1f} s",
        ]
        return "\n".join(lines)


def _head(exc: BaseException, lines: int = _MESSAGE_LINES) -> str:
    text = str(exc).strip() or type(exc).__name__
    kept = [ln for ln in text.splitlines() if ln.strip()][:lines]
    return f"{type(exc).__name__}: " + "\n    ".join(kept)


@contextlib.contextmanager
def _export_mode(model: Any) -> Iterator[None]:
    """Eval mode and active BitStack prefixes for the duration of the export, then restore."""
    from edgestack.compress.layers import BitStackWeight  # lazy: torch at import

    training = {m: m.training for m in model.modules()}
    swapped = []
    for m in model.modules():
        if isinstance(m, BitStackWeight) and m.active_blocks < m.n_blocks:
            b = m.active_blocks
            swapped.append((m, m.signs, m.u, m.v))
            m.signs, m.u, m.v = m.signs[:b].clone(), m.u[:b].clone(), m.v[:b].clone()
    model.eval()
    try:
        yield
    finally:
        for m, signs, u, v in swapped:
            m.signs, m.u, m.v = signs, u, v
        for m, flag in training.items():
            m.training = flag


def _lowrank_layers(model: Any) -> list[str]:
    from edgestack.compress.layers import LowRankConv, LowRankLinear  # lazy: torch at import

    return [n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv))]


def _weight_owner(model: Any) -> dict[int, str]:
    """``{id(buffer): layer name}`` for the packed buffers of compressed layers."""
    from edgestack.compress.layers import CompressedLayer  # lazy: torch at import

    owners = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLayer):
            for buf in m.weight_module.buffers():
                owners[id(buf)] = name
    return owners


DynamicAxes = Mapping[str, Mapping[int, str]]
"""``{input name: {axis: dim name}}``: the dynamic axes of an export, named."""


def _axes(inputs: ModelInputs, dynamic: bool | DynamicAxes) -> dict[str, dict[int, str]]:
    """The named dynamic axes: ``dynamic=True`` gives batch (dim 0) of every input and
    sequence (dim 1) of 2-D integer inputs; a mapping is checked against the inputs."""
    import torch

    if isinstance(dynamic, Mapping):
        by_name = inputs.by_name()
        unknown = [n for n in dynamic if n not in by_name]
        if unknown:
            raise ExportError(
                f"export: dynamic names input(s) {', '.join(map(repr, unknown))} that the "
                f"model does not take; expected names among {', '.join(inputs.names)}"
            )
        out: dict[str, dict[int, str]] = {}
        for name, axes in dynamic.items():
            rank = by_name[name].dim()
            bad = [a for a in axes if not 0 <= int(a) < rank]
            if bad:
                raise ExportError(f"export: dynamic axis {bad[0]} of input {name!r} is out of "
                                  f"range for its rank {rank}; expected 0..{rank - 1}")
            out[name] = {int(a): str(d) for a, d in axes.items()}
        return out
    if not dynamic:
        return {}
    out = {}
    for name, t in inputs.by_name().items():
        spec: dict[int, str] = {}
        if t.dim() >= 1:
            spec[0] = "batch"
        if t.dim() == 2 and not torch.is_floating_point(t):
            spec[1] = "sequence"
        out[name] = spec
    return out


def _dynamic_shapes(model: Any, inputs: ModelInputs, axes: dict[str, dict[int, str]]) -> Any:
    """``torch.export`` dynamic shapes for the named ``axes`` (``Dim.DYNAMIC``, so the tracer
    finds relations such as ``total = past + sequence`` itself). Positional inputs follow the
    ``forward`` signature: those that a ``*args`` parameter takes are one nested tuple."""
    from torch.export import Dim

    specs = [{a: Dim.DYNAMIC for a in axes.get(n, {})} or None for n in inputs.names]
    if inputs.kwargs:
        return dict(zip(inputs.names, specs, strict=True))
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for i, p in enumerate(params):
        if p.kind == p.VAR_POSITIONAL:
            return (*specs[:i], tuple(specs[i:]))
    return tuple(specs)


def _name_dynamic_dims(graph: Any, axes: dict[str, dict[int, str]]) -> None:
    """Rename the tracer's symbols (``s43``) of the dynamic input axes to their names
    (``batch``, ``sequence``, ...), also inside output expressions (``s15 + s70``)."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for value in graph.inputs:
        dims = list(value.shape or ())
        for axis, new in axes.get(value.name, {}).items():
            if axis < len(dims) and isinstance(dims[axis], ir.SymbolicDim) and dims[axis].value:
                names.setdefault(dims[axis].value, new)
    if not names:
        return
    token = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def rename(dim: Any) -> Any:
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            new = token.sub(lambda m: names[m.group(1)], dim.value)
            return ir.SymbolicDim(new) if new != dim.value else dim
        return dim

    values = list(graph.inputs) + [v for n in graph.all_nodes() for v in n.outputs]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([rename(d) for d in value.shape])


def _trace_inputs(inputs: ModelInputs, shapes: Any) -> ModelInputs:
    """Inputs for tracing a dynamic export: dynamic dims of size 1 doubled.

    ``torch.export`` specialises any dimension whose example size is 0 or 1 (a batch of one
    would be baked in); repeating those slices gives the tracer a size of 2 instead.
    """
    import torch

    specs = list(shapes.values()) if isinstance(shapes, dict) else list(shapes)
    if specs and isinstance(specs[-1], tuple):  # a *args parameter's nested specs
        specs = [*specs[:-1], *specs[-1]]
    grown = []
    for t, spec in zip(inputs.tensors(), specs, strict=True):
        for dim in (spec or {}):
            if t.shape[dim] == 1:
                t = torch.cat([t, t], dim=dim)
        grown.append(t)
    if inputs.kwargs:
        return ModelInputs((), dict(zip(inputs.names, grown, strict=True)), inputs.names)
    return ModelInputs(tuple(grown), {}, inputs.names)


def _resolve_external(mode: str | bool, nbytes: int) -> bool:
    if mode in ("always", True):
        return True
    if mode in ("never", False):
        return False
    if mode == "auto":
        return nbytes > EXTERNAL_DATA_THRESHOLD
    raise ExportError(
        f"external_data must be 'auto', 'always' or 'never', found {mode!r}"
    )


def _metadata_json(value: Any) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=str, sort_keys=True)


def _edgestack_nodes(graph: Any) -> list[Any]:
    return [n for n in graph.all_nodes() if n.domain == es_ops.DOMAIN]


def _layer_of_node(node: Any, owners_by_name: dict[str, str]) -> str:
    """The torch layer a node decodes: from its initializer inputs, else its name scope."""
    for value in node.inputs:
        if value is not None and value.name in owners_by_name:
            return owners_by_name[value.name]
    # The dynamo exporter records the qualified module names around each node, e.g.
    # ['', 'features', 'features.0', 'features.0.weight_module', 'bitstack_weight'].
    try:
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    suffix = ".weight_module"
    for scope in reversed(scopes if isinstance(scopes, list) else []):
        if isinstance(scope, str) and scope.endswith(suffix):
            return scope[: -len(suffix)]
    return node.name


def _postprocess(model_ir: Any, owners_by_name: dict[str, str], output_names: list[str],
                 lowrank: list[str], metadata: Any, axes: dict[str, dict[int, str]]
                 ) -> tuple[dict[str, int], dict[str, str]]:
    """Add functions, node layer tags, output names and metadata to the exported model."""
    graph = model_ir.graph
    opset = model_ir.opset_imports.get("", None) or graph.opset_imports.get("")
    nodes = _edgestack_nodes(graph)
    counts: dict[str, int] = {}
    layers: dict[str, str] = {}
    for node in nodes:
        op = es_ops.get_op(node.op_type)
        counts[op.name] = counts.get(op.name, 0) + 1
        layer = _layer_of_node(node, owners_by_name)
        node.metadata_props[NODE_LAYER_KEY] = layer
        layers[node.name] = layer
        key = (es_ops.DOMAIN, op.name, "")
        if key not in model_ir.functions:
            model_ir.functions[key] = op.function(opset)
    if nodes:
        model_ir.opset_imports[es_ops.DOMAIN] = es_ops.DOMAIN_VERSION
        graph.opset_imports[es_ops.DOMAIN] = es_ops.DOMAIN_VERSION

    _name_dynamic_dims(graph, axes)
    if len(output_names) == len(graph.outputs):
        taken = {v.name for v in graph.inputs} | set(graph.initializers)
        for value, name in zip(graph.outputs, output_names, strict=True):
            if value.name != name and name not in taken:
                value.name = name

    props = model_ir.metadata_props
    model_ir.producer_name, model_ir.producer_version = "edgestack", edgestack.__version__
    props[META_VERSION] = edgestack.__version__
    props[META_DOMAIN_VERSION] = str(es_ops.DOMAIN_VERSION)
    props[META_LOWRANK] = json.dumps(lowrank)
    props[META_LAYERS] = json.dumps(layers, sort_keys=True)
    if metadata is not None:
        if isinstance(metadata, dict):
            for key, value in metadata.items():
                key = META_COMPRESSION if key == "compression" else meta_key(str(key))
                props[key] = _metadata_json(value)
        else:  # a compression report object
            props[META_COMPRESSION] = _metadata_json(metadata)
    return counts, layers


def _is_compressed(counts: dict[str, int], lowrank: list[str], metadata: Any) -> bool:
    """A compressed export: ``edgestack`` nodes, low-rank layers, or metadata naming a
    compression method other than ``none`` (pruned models have no marker modules)."""
    if counts or lowrank:
        return True
    methods = []
    if isinstance(metadata, dict):
        methods.append(metadata.get("method"))
        metadata = metadata.get("compression")
    if isinstance(metadata, dict):
        methods.append(metadata.get("method"))
    else:
        methods.append(getattr(metadata, "method", None))
    return any(m not in (None, "none") for m in methods)


def _named_tensors(model: Any) -> dict[str, Any]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


@contextlib.contextmanager
def compacted_tables(model: Any, tables: list[dict[str, Any]]) -> Iterator[list[str]]:
    """Run ``model`` with the embedding tables compact export stored as int8: inside the
    block each table's torch tensor holds ``codes * scale`` (exactly what the ONNX graph
    gathers, :func:`~edgestack.exporter.passes.quantize_rows`); restored on exit.

    Args:
        model: the exported torch model.
        tables: :attr:`ExportResult.compact_embeddings` (initializer ``name`` entries; the
            dynamo exporter names initializers after the parameters' qualified names).

    Yields:
        The table names with no torch parameter or buffer of that name and shape (left
        as they are; a parity against them reports the int8 error).
    """
    import torch

    named = _named_tensors(model)
    saved, missing = [], []
    for entry in tables:
        t = named.get(entry["name"])
        if t is None or tuple(t.shape) != (entry["rows"], entry["cols"]):
            missing.append(entry["name"])
            continue
        codes, scale = quantize_rows(t.detach().cpu().numpy())
        saved.append((t, t.detach().clone()))
        with torch.no_grad():
            t.copy_(torch.from_numpy(codes.astype(scale.dtype) * scale))
    try:
        yield missing
    finally:
        with torch.no_grad():
            for t, original in saved:
                t.copy_(original)


def _compacted_reference(model: Any, norm: ModelInputs, tables: list[dict[str, Any]],
                         reference: list[Any]) -> tuple[list[Any], list[str]]:
    """The torch outputs with the compacted tables as stored, and parity notes."""
    with compacted_tables(model, tables) as missing:
        outputs = model(*norm.args, **norm.kwargs)
    quantized = [t.detach().clone() for _, t in flatten_outputs(outputs)]
    names = ", ".join(t["name"] for t in tables)
    notes = [f"reference: torch with {names} replaced by their int8 per-row values as "
             "stored (compact embeddings); the vs-fp32-table drift per output follows"]
    if missing:
        notes.append(f"no torch tensor found for {', '.join(missing)}: compared against "
                     "the fp32 table, the int8 rounding counts as error")
    for i, (q, r) in enumerate(zip(quantized, reference, strict=False)):
        if q.shape != r.shape or not q.numel() or not q.is_floating_point():
            continue
        max_abs, max_rel, cosine = error_stats(q.double().numpy().reshape(-1),
                                               r.double().numpy().reshape(-1))
        notes.append(f"int8 tables vs fp32 tables, output {i}: max_abs {max_abs:.3g}, "
                     f"max_rel {max_rel:.3g}, cosine {cosine:.6f}")
    return quantized, notes


def _initializer_bytes(model_ir: Any) -> int:
    total = 0
    for value in model_ir.graph.initializers.values():
        if value.const_value is not None:
            total += int(value.const_value.nbytes)
    return total


# Third-party loggers that print harmless noise during every export: the onnxscript
# constant folder reports shape-specialised folds it skips, and torch's ONNX registry
# reports that torchvision (unused here) is missing.
_NOISY_LOGGERS = ("onnxscript.optimizer._constant_folding",
                  "torch.onnx._internal.exporter._registration")


def export(
    model: Any,
    inputs: Any,
    out: str | os.PathLike,
    *,
    opset: int = 20,
    dynamic: bool | DynamicAxes = False,
    input_names: Sequence[str] | None = None,
    external_data: str = "auto",
    parity: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    metadata: Any = None,
    compact_embeddings: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Progress = False,
) -> ExportResult:
    """Export a (compressed) torch model to ONNX, keeping compressed weights compressed.

    Args:
        model: a ``torch.nn.Module``; compressed layers (``CompressedLayer`` with shift or
            BitStack weights) become ``edgestack``-domain decode nodes.
        inputs: example inputs, a dict of keyword tensors (graph inputs named after the keys)
            or a tuple of positional tensors.
        out: the ``.onnx`` path to write (its folder must exist); written only when the
            export succeeds.
        opset: default-domain opset (>= 18, the function bodies' minimum).
        dynamic: ``True``: make dim 0 (batch) of every input and dim 1 (sequence) of 2-D
            integer inputs dynamic; or ``{input name: {axis: dim name}}`` naming exactly
            the dynamic axes (the graph's symbolic dims get those names); dims the model
            specialises stay static (see docs/ops.md).
        input_names: ONNX names of positional ``inputs`` (default: the ``forward``
            parameter names); needed for a ``forward(*args)``.
        external_data: ``"auto"`` (external above 100 MiB of initializers), ``"always"`` or
            ``"never"``; external data goes to ``<out>.<sha256 prefix>.data``
            (:mod:`edgestack.exporter.output`).
        parity: run the ONNX Runtime vs torch check on the example inputs.
        atol, rtol: parity tolerances (rule in :mod:`edgestack.exporter.parity`).
        metadata: extra model metadata: a dict (``"compression"`` is stored under
            ``edgestack.compression``; other keys under ``edgestack.<key>`` unless they name
            a namespace of their own, ``a.b``; non-strings as JSON), or a compression report
            object (``to_dict()`` or a dataclass). The model's ``producer_name`` is
            ``edgestack``.
        compact_embeddings: for a compressed model (``edgestack`` nodes, low-rank layers,
            or ``metadata`` naming a method other than ``none``), store float tables of
            256 KiB or more read only by ``Gather`` (word/position embeddings) as int8 with
            a per-row scale (:class:`~edgestack.exporter.passes.CompactEmbeddingsPass`);
            tables shared with an LM head stay float. An uncompressed model is never
            changed. Parity then uses the int8 tables in the torch reference too.
        overwrite: replace an existing ``out`` (only an earlier export: a file that reads as
            ONNX; its own data files go with it, no other file is touched).
        log: progress callback taking one line; default: the ``edgestack.exporter`` logger.
        progress: a tqdm bar on stderr over the steps (forward, torch.export, ONNX
            conversion, save, checker, parity): ``True`` (even when stderr is not a
            terminal), ``False`` (default: none) or ``None`` (when stderr is a terminal);
            see :mod:`edgestack.core.progress`.

    Returns:
        :class:`ExportResult`; ``result.parity.passed`` is False when parity failed (this
        does not raise).

    Raises:
        ExportError: the forward pass fails on the inputs, ``torch.export`` fails, a
            ``torch.ops.edgestack`` op has no ONNX translation, the ONNX conversion fails,
            the checker rejects the model, or ONNX Runtime cannot load it; ``out`` exists
            and ``overwrite`` is false, or is not an earlier export.
    """
    import torch

    say = log or logger.info
    out = Path(out)
    if not isinstance(model, torch.nn.Module):
        raise ExportError(
            f"export: expected a torch.nn.Module, found {type(model).__name__}; wrap functions "
            "in a module"
        )
    if opset < es_ops.MIN_OPSET:
        raise ExportError(
            f"export: opset must be >= {es_ops.MIN_OPSET} (the edgestack function bodies use "
            f"BitwiseAnd and ReduceProd with an axes input), found {opset}; pass opset=20"
        )
    _resolve_external(external_data, 0)  # validate the argument early
    if not out.parent.is_dir():
        raise ExportError(
            f"export: output folder {str(out.parent)!r} does not exist; create it first"
        )
    files.replaced_files(out, overwrite)  # an output it may not replace fails before work
    names = ["forward", "torch.export", "ONNX conversion", "save", "onnx.checker"]
    with Stages([*names, "parity"] if parity else names, progress, "export") as stages:
        norm = normalize_inputs(model, inputs, input_names)
        axes = _axes(norm, dynamic)
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        table = es_ops.translation_table()

        with _export_mode(model), torch.no_grad(), quiet_loggers(_NOISY_LOGGERS), \
                warnings.catch_warnings():
            # torch 2.13's own use of a deprecated pytree API inside torch.export: nothing a
            # caller can act on (it printed on every export from Python)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            # 1. the reference forward pass
            stages.start("forward")
            t0 = time.perf_counter()
            try:
                outputs = model(*norm.args, **norm.kwargs)
            except Exception as exc:
                given = ", ".join(f"{n}: {tuple(t.shape)} {t.dtype}"
                                  for n, t in norm.by_name().items())
                raise ExportError(
                    f"export: the model's forward failed on the example inputs ({given}): "
                    f"{_head(exc, 4)}; expected inputs the model accepts, e.g. what its zoo "
                    "factory returns"
                ) from exc
            flat = flatten_outputs(outputs)
            if not flat:
                raise ExportError(
                    f"export: the model returned no tensors (found {type(outputs).__name__}); "
                    "expected a tensor, a tuple/dict of tensors or a ModelOutput"
                )
            output_names = unique_names([n for n, _ in flat])
            reference = [t.detach().clone() for _, t in flat]
            seconds["forward"] = time.perf_counter() - t0

            # 2. torch.export
            stages.start("torch.export")
            say(f"export: torch.export of {type(model).__name__} "
                f"(inputs {', '.join(norm.names)}; dynamic={bool(axes)})")
            t0 = time.perf_counter()
            owners = _weight_owner(model)
            shapes = _dynamic_shapes(model, norm, axes) if axes else None
            trace = _trace_inputs(norm, shapes) if axes else norm
            try:
                program = torch.export.export(
                    model, trace.args, trace.kwargs or None, dynamic_shapes=shapes, strict=False,
                )
            except Exception as exc:
                raise ExportError(
                    f"export: torch.export failed: {_head(exc)}\n"
                    "expected a model that torch.export can trace; fix the model code named above "
                    "(data-dependent control flow, unsupported Python) or try dynamic=False"
                ) from exc
            seconds["torch_export"] = time.perf_counter() - t0
            _check_translations(program, table)
            owners_by_name = _owners_by_input_name(model, owners)

            # 3. ONNX conversion
            stages.start("ONNX conversion")
            t0 = time.perf_counter()
            say(f"export: converting to ONNX (opset {opset})")
            try:
                onnx_program = torch.onnx.export(
                    program, trace.args, kwargs=trace.kwargs or None, dynamo=True,
                    opset_version=opset, custom_translation_table=table, optimize=True,
                    verbose=False, input_names=list(norm.names), output_names=output_names,
                )
            except Exception as exc:
                raise ExportError(
                    f"export: torch.onnx conversion failed: {_head(exc)}\n"
                    "expected every op of the exported program to have an ONNX translation; "
                    "an unsupported aten op needs a custom_translation_table entry"
                ) from exc
            model_ir = onnx_program.model
            lowrank = _lowrank_layers(model)
            counts, layers = _postprocess(model_ir, owners_by_name, output_names, lowrank,
                                          metadata, axes)
            retie(model, model_ir, say)
            tied = tied_weights(model, model_ir)
            if tied:
                model_ir.metadata_props[META_TIED] = json.dumps(tied)
            tables: list[dict[str, Any]] = []
            parity_notes: list[str] = []
            if compact_embeddings and _is_compressed(counts, lowrank, metadata):
                compact = CompactEmbeddingsPass()
                compact(model_ir)
                for line in describe(compact.report):
                    say(f"export: {line}")
                tables = compact.report["tables"]
                if tables and parity:
                    reference, parity_notes = _compacted_reference(model, norm, tables, reference)
            order = getattr(model, "edgestack_bitstack_order", None)
            if order:
                model_ir.metadata_props[META_BITSTACK_ORDER] = json.dumps(
                    [[str(n), int(b)] for n, b in order])
            seconds["onnx"] = time.perf_counter() - t0

        # 4. save, check, parity in a temporary folder; then move into place
        init_bytes = _initializer_bytes(model_ir)
        external = _resolve_external(external_data, init_bytes)
        tmp = atomic.sibling(out, "swap")  # the next run settles it if this one is killed
        try:
            tmp.mkdir()
        except OSError as exc:
            raise ExportError(f"export: cannot write in {out.parent} ({exc.strerror or exc}); "
                              "choose an output in a writable folder") from None
        try:
            stages.start("save")
            t0 = time.perf_counter()
            tmp_path = tmp / out.name
            data_name = out.name + ".data"
            say(f"export: writing {out} ({init_bytes / 2**20:.1f} MiB of initializers"
                f"{' in an external data file' if external else ''})")
            _save(model_ir, tmp_path, data_name if external else None)
            seconds["save"] = time.perf_counter() - t0

            stages.start("onnx.checker")
            t0 = time.perf_counter()
            try:
                onnx.checker.check_model(str(tmp_path), full_check=True)
            except Exception as exc:
                raise ExportError(
                    f"export: onnx.checker rejected the exported model: {_head(exc, 6)}\n"
                    "expected a valid ONNX model; this is a bug in the exporter or a custom "
                    "translation, please report it with the model"
                ) from exc
            seconds["check"] = time.perf_counter() - t0

            report = None
            if parity:
                stages.start("parity")
                t0 = time.perf_counter()
                report = check_parity(tmp_path, model, inputs, atol, rtol, reference=reference)
                report.notes.extend(parity_notes)
                seconds["parity"] = time.perf_counter() - t0
                say(f"export: parity {'passed' if report.passed else 'FAILED'} "
                    f"(max_abs {report.max_abs:.3g}, max_rel {report.max_rel:.3g})")

            data_path = files.install(tmp, out, data_name if external else None, overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        seconds["total"] = time.perf_counter() - start
        file_bytes = out.stat().st_size + (data_path.stat().st_size if data_path else 0)
        say(f"export: wrote {out} ({file_bytes / 2**20:.2f} MiB) in {seconds['total']:.1f} s")
        return ExportResult(
            path=out, data_path=data_path, input_names=[v.name for v in model_ir.graph.inputs],
            output_names=[v.name for v in model_ir.graph.outputs], custom_nodes=counts,
            layers=layers, lowrank_layers=lowrank, parity=report, file_bytes=file_bytes,
            seconds=seconds, compact_embeddings=tables, tied_weights=tied,
        )


def _save(model_ir: Any, path: Path, data_name: str | None) -> None:
    import onnx_ir as ir

    if data_name is None:
        ir.save(model_ir, path)
    else:
        ir.save(model_ir, path, external_data=data_name,
                size_threshold_bytes=EXTERNAL_MIN_TENSOR_BYTES)


def _check_translations(program: Any, table: dict[Any, Any]) -> None:
    """Refuse ``torch.ops.edgestack`` ops that no ``edgestack`` ONNX op translates."""
    import torch

    missing = set()
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.name()
        if name.startswith(f"{es_ops.DOMAIN}::") and node.target not in table:
            missing.add(name)
    if missing:
        known = ", ".join(f"{op.torch_name} -> {es_ops.DOMAIN}.{op.name}"
                          for op in es_ops.OPS.values())
        raise ExportError(
            f"export: torch op(s) {', '.join(sorted(missing))} have no ONNX translation; "
            f"expected only the translated ops ({known}); add an EdgestackOp for it to "
            "edgestack.exporter.ops.OPS or decompress that layer before export"
        )


def _owners_by_input_name(model: Any, owners: dict[int, str]) -> dict[str, str]:
    """``{ONNX initializer name: torch layer}`` for the packed buffers of compressed layers.

    The dynamo exporter names initializers after the buffers' qualified names
    (``features.0.weight_module.codes``); map those back to their ``CompressedLayer``.
    """
    named = {}
    for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
        if id(buf) in owners:
            named[name] = owners[id(buf)]
    return named


__all__ = ["export", "ExportResult", "compacted_tables", "tied_weights", "DynamicAxes",
           "EXTERNAL_DATA_THRESHOLD", "META_TIED",
           "META_VERSION", "META_DOMAIN_VERSION", "META_LOWRANK", "META_COMPRESSION", "META_LAYERS",
           "META_BITSTACK_ORDER",
           "NODE_LAYER_KEY"]
