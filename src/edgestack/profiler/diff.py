"""Layer-by-layer diff of two models on the same inputs: where do they first diverge?

The two sides are ONNX models (an export, a compiled target's graph, a package's graph) or
torch model sources. Each is run once with every intermediate value captured
(:func:`edgestack.profiler.capture.capture_onnx`: every node output marked as a graph output,
the ``edgestack`` functions inlined; :func:`edgestack.profiler.trace.capture_torch`: a
forward hook on every module). Values are paired

- ONNX with ONNX, and torch with torch: by name (same name and same shape);
- torch with ONNX: a module with the ONNX value its name scope produces
  (:func:`edgestack.profiler.capture.module_values`); modules that cannot be paired so are
  listed with the reason, never guessed;

and every pair is compared with the one comparison rule, :func:`edgestack.core.compare.agree`
(``max_abs <= atol or max_rel <= rtol``, no NaN), in the order A computed them. The first
pair that fails is the earliest divergence: the debugging answer. The final outputs decide
whether the models agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgestack.core.compare import agree
from edgestack.errors import TargetError
from edgestack.exporter.parity import DEFAULT_ATOL, DEFAULT_RTOL
from edgestack.profiler.capture import Capture, capture_onnx
from edgestack.profiler.diff_args import ModelRef, make_feeds, resolve_model
from edgestack.profiler.trace import capture_torch
from edgestack.sources import load_source

RULE = "max_abs <= atol or max_rel <= rtol (max_rel = max|b - a| / max|a|), no NaN"


@dataclass(frozen=True)
class ValueDiff:
    """One pair of values compared (``a`` is the reference).

    Attributes:
        name: A's value (ONNX value name, or torch module name).
        b_name: B's value paired with it (the same name unless one side is torch).
        op: the op (or module class) that produced A's value.
        node: the node (or module) that produced it in A.
        shape: the shape (equal on both sides).
        max_abs, max_rel, cosine, passed: :func:`edgestack.core.compare.agree`.
    """

    name: str
    b_name: str
    op: str
    node: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool


@dataclass
class DiffReport:
    """What :func:`diff_captures` found.

    Attributes:
        a, b: the two models (labels) and their kinds.
        inputs: where the feeds came from; ``input_shapes``: name -> (dtype, shape).
        atol, rtol: the tolerances.
        values: every pair compared, in A's order.
        outputs: the final outputs compared (they decide :attr:`passed`).
        only_a, only_b: values of one side with no counterpart (names).
        shape_mismatch: ``(A name, B name, A shape, B shape)`` of paired values whose
            shapes differ (not compared).
        unmatched: ``(module, why)``: torch modules that could not be paired with an
            ONNX value.
        initializers: ONNX vs ONNX: initializers with the same name and shape whose bytes
            differ (``name``, ``max_abs``), and the counts compared / only in A / only in B.
        first_inputs: for the first failing value (ONNX A): each input of its node and
            what is known of it (passed, failed, graph input, initializer equal/differs).
        notes: anything else a reader needs.
    """

    a: str
    b: str
    a_kind: str
    b_kind: str
    inputs: str
    input_shapes: dict[str, tuple[str, list[int]]]
    atol: float
    rtol: float
    values: list[ValueDiff]
    outputs: list[ValueDiff]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, str, list[int], list[int]]] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    initializers: dict[str, Any] = field(default_factory=dict)
    first_inputs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every final output pair agrees (and there is at least one)."""
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def first_failure(self) -> ValueDiff | None:
        """The earliest value (in A's order) that fails the rule: where the models diverge."""
        return next((v for v in self.values if not v.passed), None)

    def worst(self, top: int = 10) -> list[ValueDiff]:
        """The ``top`` pairs with the largest ``max_rel``."""
        return sorted(self.values, key=lambda v: (-_finite(v.max_rel), v.name))[:top]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """JSON-able dict (inf/NaN as strings); ``worst``: the ``top`` largest differences."""
        first = self.first_failure
        return {
            "passed": self.passed, "a": {"model": self.a, "kind": self.a_kind},
            "b": {"model": self.b, "kind": self.b_kind},
            "inputs": {"source": self.inputs, "arrays": {
                k: {"dtype": d, "shape": s} for k, (d, s) in self.input_shapes.items()}},
            "atol": self.atol, "rtol": self.rtol, "rule": RULE,
            "compared": len(self.values), "failed": sum(not v.passed for v in self.values),
            "first_failure": _row(first) if first else None,
            "first_failure_inputs": self.first_inputs,
            "outputs": [_row(o) for o in self.outputs],
            "worst": [_row(v) for v in self.worst(top)],
            "values": [_row(v) for v in self.values],
            "only_a": list(self.only_a), "only_b": list(self.only_b),
            "shape_mismatch": [{"a": a, "b": b, "a_shape": sa, "b_shape": sb}
                               for a, b, sa, sb in self.shape_mismatch],
            "unmatched": [{"module": m, "why": w} for m, w in self.unmatched],
            "initializers": self.initializers, "notes": list(self.notes),
        }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e300


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return list(v) if isinstance(v, tuple) else v


def _row(v: ValueDiff) -> dict[str, Any]:
    return {k: _clean(x) for k, x in asdict(v).items()}


def _compare(name: str, b_name: str, op: str, node: str, a: np.ndarray, b: np.ndarray,
             atol: float, rtol: float) -> ValueDiff:
    r = agree(b, a, atol, rtol)
    return ValueDiff(name, b_name, op, node, tuple(int(d) for d in np.shape(a)), r.max_abs,
                     r.max_rel, r.cosine, r.passed)


# --------------------------------------------------------------------------- pairing
def _pairs(a: Capture, b: Capture) -> tuple[list[tuple[Any, str]], list[tuple[str, str]],
                                             list[str]]:
    """``[(A entry, B key)]`` in A's order; unmatched ``(module, why)``; notes."""
    notes: list[str] = []
    if a.kind == b.kind:
        return [(e, e.key) for e in a.entries if e.key in b.arrays], [], notes
    onnx_side, torch_side = (a, b) if a.kind == "onnx" else (b, a)
    by_value = {v: m for m, v in onnx_side.modules.items()}
    pairs = []
    used: set[str] = set()
    if a.kind == "onnx":
        for e in a.entries:
            m = by_value.get(e.key)
            if m is not None and m in b.arrays:
                pairs.append((e, m))
                used.add(m)
    else:
        for e in a.entries:
            v = onnx_side.modules.get(e.key)
            if v is not None and v in b.arrays:
                pairs.append((e, v))
                used.add(e.key)
    unmatched = []
    for e in torch_side.entries:
        if e.key in used or e.key in onnx_side.module_aliases:
            continue
        if "#" in e.key:
            why = "a later call of a module that ran more than once (the ONNX name scopes " \
                  "do not tell calls apart)"
        elif e.key.endswith("]") and "[" in e.key:
            why = "one of several tensors the module returns (its ONNX values are not " \
                  "named after them)"
        else:
            why = onnx_side.unmatched_modules.get(
                e.key, "no ONNX node carries this module in its name scopes "
                       "(pkg.torch.onnx.name_scopes): an identity such as dropout in eval "
                       "mode, or nodes rewritten after the export")
        unmatched.append((e.key, why))
    if not onnx_side.modules:
        notes.append(f"{onnx_side.label} has no torch name scopes "
                     "(pkg.torch.onnx.name_scopes node metadata, written by "
                     "torch.onnx.export(dynamo=True) and kept by edgestack export): no module "
                     "can be paired with an ONNX value, so only the final outputs are compared")
    return pairs, unmatched, notes


def _pair_outputs(a: Capture, b: Capture
                  ) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """``[(A name, B name, A key, B key)]`` of the final outputs: by name, else by
    position."""
    bmap = dict(b.outputs)
    common = [(n, n, k, bmap[n]) for n, k in a.outputs if n in bmap]
    if common:
        rest = [n for n, _ in a.outputs if n not in bmap] + [n for n, _ in b.outputs
                                                            if n not in dict(a.outputs)]
        notes = [f"outputs of one side only (not compared): {rest}"] if rest else []
        return common, notes
    if len(a.outputs) == len(b.outputs) and a.outputs:
        return ([(na, nb, ka, kb) for (na, ka), (nb, kb) in
                 zip(a.outputs, b.outputs, strict=True)],
                [f"no output name is shared ({[n for n, _ in a.outputs]} vs "
                 f"{[n for n, _ in b.outputs]}): outputs paired by position"])
    raise TargetError(f"A's outputs {[n for n, _ in a.outputs]} and B's outputs "
                      f"{[n for n, _ in b.outputs]} share no name and differ in number; "
                      "nothing decides whether the models agree: diff models with the same "
                      "outputs")


# --------------------------------------------------------------------------- diff
def diff_captures(a: Capture, b: Capture, *, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, inputs: str = "",
                  feeds: Mapping[str, np.ndarray] | None = None) -> DiffReport:
    """Compare two captures (A is the reference; see the module docstring).

    Args:
        a, b: the captures.
        atol, rtol: tolerances of :func:`edgestack.core.compare.agree`.
        inputs: where the feeds came from (for the report).
        feeds: the feeds (their dtypes and shapes go in the report).

    Raises:
        TargetError: the final outputs cannot be paired.
    """
    pairs, unmatched, notes = _pairs(a, b)
    values, mismatch = [], []
    for e, bkey in pairs:
        x, y = a.arrays[e.key], b.arrays[bkey]
        if np.shape(x) != np.shape(y):
            mismatch.append((e.key, bkey, list(np.shape(x)), list(np.shape(y))))
            continue
        values.append(_compare(e.key, bkey, e.op, e.node, x, y, atol, rtol))
    paired_b = {bkey for _, bkey in pairs}
    only_a = [e.key for e in a.entries if e.key not in {p[0].key for p in pairs}]
    only_b = [e.key for e in b.entries if e.key not in paired_b]
    out_pairs, out_notes = _pair_outputs(a, b)
    outputs = [_compare(na, nb, "output", "", a.arrays[ka], b.arrays[kb], atol, rtol)
               for na, nb, ka, kb in out_pairs]
    report = DiffReport(
        a.label, b.label, a.kind, b.kind, inputs,
        {k: (str(np.asarray(v).dtype), list(np.shape(v))) for k, v in (feeds or {}).items()},
        atol, rtol, values, outputs, only_a, only_b, mismatch, unmatched,
        notes=a.notes + b.notes + notes + out_notes)
    if a.kind == b.kind == "onnx":
        report.initializers = _initializers(a, b)
    report.first_inputs = _first_inputs(report, a, b)
    if a.kind != b.kind and not values:
        report.notes.append("no intermediate value could be paired (see unmatched)")
    return report


def _initializers(a: Capture, b: Capture) -> dict[str, Any]:
    differ, compared = [], 0
    for name, x in a.initializers.items():
        y = b.initializers.get(name)
        if y is None or x.shape != y.shape:
            continue
        compared += 1
        if x.dtype != y.dtype or not np.array_equal(x, y):
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            differ.append({"name": name, "max_abs": float(diff.max()) if diff.size else 0.0})
    return {"compared": compared, "differ": differ,
            "only_a": sum(n not in b.initializers for n in a.initializers),
            "only_b": sum(n not in a.initializers for n in b.initializers)}


def _first_inputs(report: DiffReport, a: Capture, b: Capture) -> list[dict[str, Any]]:
    """What is known of each input of the first failing value's node in A."""
    first = report.first_failure
    entry = a.entry(first.name) if first is not None else None
    if entry is None or not entry.inputs:
        return []
    compared = {v.name: v for v in report.values}
    differ = {d["name"]: d["max_abs"] for d in report.initializers.get("differ", [])}
    out = []
    for name in entry.inputs:
        if not name:
            continue
        if name in compared:
            v = compared[name]
            what = f"{'passed' if v.passed else 'FAILED'} (max_abs {v.max_abs:.3g})"
        elif name in a.graph_inputs:
            what = "graph input (the same feed on both sides)"
        elif name in a.initializers:
            if name in differ:
                what = f"initializer, DIFFERS in B (max_abs {differ[name]:.3g})"
            elif name in b.initializers and b.initializers[name].shape == \
                    a.initializers[name].shape:
                what = "initializer, equal in B"
            else:
                what = "initializer, not in B with this shape"
        else:
            what = "not compared (no counterpart in B)"
        out.append({"name": name, "what": what})
    return out


def diff_models(a: str | ModelRef, b: str | ModelRef, *, inputs: str | None = None,
                seed: int = 0, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                threads: int = 1) -> DiffReport:
    """Run two models on the same inputs and compare every value they share.

    Args:
        a, b: ONNX files, folders with ``model.onnx``, or torch model sources
            (:func:`edgestack.profiler.diff_args.resolve_model`); A is the reference.
        inputs: an ``.npz`` of inputs (default: example inputs generated from the first ONNX
            side's input signature with ``seed``; two torch sides: A's example inputs).
        seed: seed of the generated inputs.
        atol, rtol: tolerances of the comparison rule.
        threads: ONNX Runtime intra-op threads.

    Raises:
        TargetError: a model or the inputs are unusable (the message says which and why).
        EdgestackError: a torch model source cannot be loaded.
    """
    refs = [r if isinstance(r, ModelRef) else resolve_model(r, which)
            for r, which in ((a, "A"), (b, "B"))]
    feeds, source = make_feeds(refs, inputs, seed)
    sources = {i: load_source(r.spec) for i, r in enumerate(refs) if r.kind == "torch"}
    if not feeds:   # two torch sides: A's own example inputs
        feeds = {k: v.detach().cpu().numpy() for k, v in sources[0].inputs.items()}
    caps = []
    for i, r in enumerate(refs):
        if r.kind == "onnx":
            caps.append(capture_onnx(r.path, feeds, r.label, threads))
        else:
            caps.append(capture_torch(sources[i].model, feeds, r.label))
    return diff_captures(caps[0], caps[1], atol=atol, rtol=rtol, inputs=source, feeds=feeds)


def render_text(report: DiffReport, top: int = 10) -> str:
    """The report for a terminal: the verdict, the first divergence and its node's inputs,
    the final outputs, the ``top`` largest differences."""
    lines = [f"A: {report.a} ({report.a_kind})", f"B: {report.b} ({report.b_kind})",
             f"inputs: {report.inputs}: " + ", ".join(
                 f"{k} {d} {s}" for k, (d, s) in report.input_shapes.items()),
             f"rule: {RULE}; atol {report.atol:g}, rtol {report.rtol:g}",
             f"compared {len(report.values)} values present in both (same shape), "
             f"{sum(not v.passed for v in report.values)} fail; only in A: "
             f"{len(report.only_a)}, only in B: {len(report.only_b)}, other shapes: "
             f"{len(report.shape_mismatch)}"
             + (f", torch modules not paired: {len(report.unmatched)}"
                if report.unmatched else "")]
    if report.a_kind != report.b_kind:
        lines.append("torch modules are paired with the ONNX value their name scope produces "
                     "(shown as A name ~ B name)")
    first = report.first_failure
    if first is None:
        lines.append("first divergence: none (every compared value agrees)")
    else:
        lines.append(f"first divergence: {_name(first)} = {first.op} (node {first.node}): "
                     f"max_abs {first.max_abs:.4g}, max_rel {first.max_rel:.4g}, "
                     f"cosine {first.cosine:.6f}")
        lines += [f"  input {i['name']}: {i['what']}" for i in report.first_inputs]
    init = report.initializers
    if init.get("differ"):
        lines.append(f"initializers that differ ({len(init['differ'])} of "
                     f"{init['compared']} with the same name and shape): " + ", ".join(
                         f"{d['name']} (max_abs {d['max_abs']:.3g})" for d in init["differ"][:8])
                     + (", ..." if len(init["differ"]) > 8 else ""))
    lines.append("final outputs:")
    lines += _table(report.outputs)
    if report.values and top:
        lines.append(f"largest differences (top {min(top, len(report.values))} by max_rel):")
        lines += _table(report.worst(top))
    if report.unmatched:
        shown = report.unmatched[:8]
        lines.append("torch modules not paired with an ONNX value: " + "; ".join(
            f"{m}: {w}" for m, w in shown) + ("; ..." if len(report.unmatched) > 8 else ""))
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"result: the final outputs {'AGREE' if report.passed else 'DIFFER'}")
    return "\n".join(lines)


def _name(v: ValueDiff) -> str:
    return v.name if v.b_name == v.name else f"{v.name} ~ {v.b_name}"


def _table(rows: list[ValueDiff]) -> list[str]:
    table = [("value", "op", "shape", "max_abs", "max_rel", "cosine", "ok")]
    for v in rows:
        table.append((_name(v), v.op, "x".join(map(str, v.shape)) or "scalar",
                      f"{v.max_abs:.3g}", f"{v.max_rel:.3g}", f"{v.cosine:.6f}",
                      "yes" if v.passed else "NO"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in table]


__all__ = ["DiffReport", "RULE", "ValueDiff", "diff_captures", "diff_models", "render_text"]
