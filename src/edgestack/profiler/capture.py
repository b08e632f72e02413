"""Every intermediate value of one ONNX model run, for ``edgestack diff`` (no torch here).

An ONNX model is captured the way Polygraphy's ``--onnx-outputs mark all`` does: the
model-local functions (the ``edgestack`` op bodies) are inlined
(:class:`~edgestack.targets.passes.InlineFunctionsPass`), so their inner values are visible
too; every node output of the main graph (but ``Constant`` nodes') becomes a graph output;
ONNX Runtime CPU runs the graph as written (graph optimizations off, so no value is fused
away) on the given feeds.

Torch module names map to ONNX values through the ``pkg.torch.onnx.name_scopes`` metadata
that ``torch.onnx.export(dynamo=True)`` puts on each node (:func:`module_values`): a module's
value is the one value produced inside its scope and read outside it. Where that is not
exactly one value, the module is reported as unmatched with the reason; nothing is guessed.
"""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgestack.core.ort import cpu_session
from edgestack.errors import TargetError
from edgestack.targets.passes.inline import InlineFunctionsPass

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
"""Node metadata written by ``torch.onnx.export(dynamo=True)``: the module names (``''`` the
root first) around the node, and the FX node's name last."""

PROTO_LIMIT = 1 << 31
"""Models whose proto reaches this size are handed to ONNX Runtime through a temporary file."""


# --------------------------------------------------------------------------- captures
@dataclass(frozen=True)
class Entry:
    """One captured value.

    Attributes:
        key: how the diff pairs it: an ONNX value name, or a torch module name (``name#2``
            for its second call, ``name[i]`` for its i-th output tensor when it has several).
        op: the producing ONNX op type, or the module's class name.
        node: the producing node's name, or the module name.
        inputs: the producing node's input value names (ONNX), else empty.
    """

    key: str
    op: str
    node: str
    inputs: tuple[str, ...] = ()


@dataclass
class Capture:
    """Every intermediate value of one run of a model (what :mod:`edgestack.profiler.diff`
    compares).

    Attributes:
        label: how reports name the model.
        kind: ``"onnx"`` or ``"torch"``.
        entries: the values in the order they were computed (ONNX: topological order of
            the graph's nodes; torch: the order the modules returned).
        arrays: value key -> array.
        outputs: ``(name, key)`` of the model's final outputs, in order.
        graph_inputs: ONNX input names (empty for torch).
        initializers: ONNX initializer name -> array (empty for torch).
        modules: ONNX: torch module name -> value key, from the name-scope metadata.
        unmatched_modules: ONNX: module name -> why no single value stands for it.
        module_aliases: ONNX: outer module -> the inner module whose value it shares (it is
            compared through that one).
        notes: anything a report should say about this capture.
    """

    label: str
    kind: str
    entries: list[Entry]
    arrays: dict[str, np.ndarray]
    outputs: list[tuple[str, str]]
    graph_inputs: list[str] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    unmatched_modules: dict[str, str] = field(default_factory=dict)
    module_aliases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def entry(self, key: str) -> Entry | None:
        """The entry of ``key``, or None."""
        return next((e for e in self.entries if e.key == key), None)


def _scopes(node: ir.Node) -> tuple[str, ...] | None:
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    return tuple(s for s in scopes[1:-1] if s) if isinstance(scopes, list) else None


def module_values(graph: ir.Graph) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Torch module name -> the ONNX value that is its output, from the name scopes.

    A module's value is the one value produced by a node inside its scope and read by a
    node outside it (or a graph output). A value that several nested modules share (a
    ``Sequential`` and its last layer) goes to the innermost module; the outer ones are its
    aliases.

    Returns:
        ``(matched, unmatched, aliases)``: module -> value name; module -> why not (several
        values leave its scope: several outputs, or a module called twice); outer module
        -> the inner module whose value it shares.
    """
    nodes: dict[str, list[ir.Node]] = {}
    for node in graph:
        for m in _scopes(node) or ():
            nodes.setdefault(m, []).append(node)
    unmatched: dict[str, str] = {}
    owner: dict[str, tuple[int, str]] = {}
    sharing: dict[str, str] = {}
    outputs = {v.name for v in graph.outputs}
    for m, inside in nodes.items():
        members = {id(n) for n in inside}
        leaving = []
        for n in inside:
            for v in n.outputs:
                if v.name in outputs or any(id(user) not in members for user, _ in v.uses()):
                    leaving.append(v.name)
        if len(leaving) != 1:
            unmatched[m] = (f"{len(leaving)} values leave its scope ({', '.join(leaving[:4])}"
                            f"{', ...' if len(leaving) > 4 else ''}): several outputs or "
                            "several calls" if leaving else "no value leaves its scope")
            continue
        sharing[m] = leaving[0]
        if leaving[0] not in owner or len(inside) < owner[leaving[0]][0]:
            owner[leaving[0]] = (len(inside), m)
    matched = {m: v for v, (_, m) in owner.items()}
    aliases = {m: owner[v][1] for m, v in sharing.items() if owner[v][1] != m}
    return matched, unmatched, aliases


def capture_onnx(path: str | Path, feeds: Mapping[str, np.ndarray], label: str | None = None,
                 threads: int = 1) -> Capture:
    """Run an ONNX model on ONNX Runtime CPU with every intermediate value as an output.

    Args:
        path: the ONNX file (external data next to it).
        feeds: the inputs (those the graph takes are used).
        label: how reports name the model (default: the path).
        threads: ONNX Runtime intra-op threads.

    Raises:
        TargetError: ONNX Runtime cannot load or run the model.
    """
    path = Path(path)
    label = label or str(path)
    model = ir.load(str(path))
    # external data into memory: the session gets the model as bytes (or a fresh file)
    ir.external_data.load_to_model(model)
    modules, unmatched, aliases = module_values(model.graph)
    inits = {}
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            inits[name] = np.asarray(v.const_value.numpy())
    InlineFunctionsPass()(model)
    graph = model.graph
    outputs = [v.name for v in graph.outputs]
    marked = set(outputs) | {v.name for v in graph.inputs} | set(inits)
    entries = []
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue   # constants, like initializers, are not computed
        for v in node.outputs:
            if not v.name:
                continue
            entries.append(Entry(v.name, node.op_type, node.name or "", tuple(
                i.name if i is not None else "" for i in node.inputs)))
            if v.name not in marked:
                graph.outputs.append(v)
                marked.add(v.name)
    names = [v.name for v in graph.outputs]
    taken = [v.name for v in graph.inputs if v.name not in inits]
    run_feeds = {k: np.asarray(feeds[k]) for k in taken}
    proto = ir.serde.serialize_model(model)
    try:
        if proto.ByteSize() < PROTO_LIMIT:
            session = cpu_session(proto.SerializeToString(), threads, "disable")
            values = session.run(names, run_feeds)
        else:   # too large for one protobuf message: through a file with external data
            with tempfile.TemporaryDirectory(prefix="edgestack-diff-") as tmp:
                onnx.save_model(proto, f"{tmp}/m.onnx", save_as_external_data=True,
                                location="m.data")
                session = cpu_session(f"{tmp}/m.onnx", threads, "disable")
                values = session.run(names, run_feeds)
    except TargetError:
        raise
    except Exception as exc:  # onnxruntime raises its own types
        head = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TargetError(f"ONNX Runtime cannot run {label} with every value marked as an "
                          f"output: {head}") from exc
    arrays = dict(zip(names, (np.asarray(x) for x in values), strict=True))
    return Capture(label, "onnx", entries, arrays, [(n, n) for n in outputs], taken, inits,
                   modules, unmatched, aliases)


__all__ = ["Capture", "Entry", "capture_onnx", "module_values"]
