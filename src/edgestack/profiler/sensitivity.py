"""Per-layer sensitivity: which layers lose the most quality when compressed, by method.

Each scored unit is compressed alone with the method and its options
(``compress(model, method, layers={...})``), every other layer left fp32, and the model is
scored with the evaluator ``edgestack quality`` uses
(:func:`edgestack.compress.quality.choose_evaluator`: the sentence-embedding cosine vs fp32
for a text encoder, a task metric on the user's file, else the first output's cosine); the
drop of that metric vs the fp32 model's own score
(:func:`edgestack.compress.quality.metric_drop`) ranks the units. A unit is one layer, or for
``prune`` one prunable structure (an attention block's heads, an MLP's channels: the producer
layers and their consumer), since pruning a single layer has no meaning.

What makes it fast enough for every layer of a model:

- the calibration batches run once: the input statistics of every scored layer are
  collected by the first unit's pass and shared with the others
  (:class:`edgestack.compress.api.StatsCache`; valid because the layers upstream of each
  scored layer stay fp32);
- ``shift``, ``bitstack`` and ``lowrank`` without a fine-tune replace only the touched layer,
  so only that layer is deep-copied (and put back after scoring); pruning, which resizes its
  neighbours, and fine-tunes, which train the whole model, work on a deep copy of the model
  per unit.

The cost per unit is then the pass on one layer plus one evaluation of the model.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from edgestack.compress import compress
from edgestack.compress.api import StatsCache, progress_iter, select_layers
from edgestack.compress.calib import model_text_calib
from edgestack.compress.options import check_options
from edgestack.compress.prune import find_structures
from edgestack.compress.quality import metric_drop
from edgestack.compress.walk import get_module, replace_module
from edgestack.errors import CompressError

#: Methods that replace only the layers they compress (the one-layer deep copy is enough).
LAYER_LOCAL = ("shift", "bitstack", "lowrank")


@dataclass(frozen=True)
class Unit:
    """What one row compresses.

    Attributes:
        name: the layer's module name, or the prune structure's name.
        layers: the module names the pass may touch (``compress(layers=...)``).
        kind: ``linear`` / ``conv1d`` / ``conv2d``, or ``heads`` / ``channels`` (prune).
        shape: the weight shape ``[out, in, *kernel]``, or ``[units, unit size]`` (prune).
        params: weights of ``layers`` in all.
    """

    name: str
    layers: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    params: int


@dataclass
class LayerSensitivity:
    """One row: the model with only ``name`` compressed.

    Attributes:
        name, layers, kind, shape, params: the :class:`Unit`.
        bits_per_weight: stored bits per weight of the unit's layers after the pass (a layer
            the pass left dense counts 32).
        metric: the value of the report's metric with only this unit compressed.
        drop: the metric's drop vs the fp32 model (absolute for cosine and accuracy,
            relative for perplexity; can be negative for a task metric, where compressing
            a layer may help by chance).
        scores: every value the evaluator returned (e.g. ``cosine_min``, Spearman).
        seconds: time of the pass and the evaluation.
        note: why the pass left the unit dense, when it did.
    """

    name: str
    layers: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    params: int
    bits_per_weight: float
    metric: float
    drop: float
    scores: dict[str, float]
    seconds: float
    note: str = ""


@dataclass
class SensitivityReport:
    """Per-layer sensitivity of a model to one method (see the module docstring).

    Attributes:
        method, options: what each unit was compressed with (``layers`` excluded).
        metric: the key of the metric ranked (``cosine_mean``, ``accuracy``, ``perplexity``).
        reference: the fp32 model's own scores.
        rows: one per unit, largest drop first.
        not_scored: ``(layer, why)`` of supported layers left out (``skip``, ``patterns``,
            unsupported types, layers of no prune structure).
        calibration_runs: how many times the calibration batches were run.
        seconds: wall time in all.
        notes: anything else worth saying (e.g. a pass's warnings, once).
    """

    method: str
    options: dict[str, Any]
    metric: str
    reference: dict[str, float]
    rows: list[LayerSensitivity]
    not_scored: list[tuple[str, str]] = field(default_factory=list)
    calibration_runs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``rows`` in rank order; shapes and layers as lists)."""
        def row(r: LayerSensitivity) -> dict[str, Any]:
            d = asdict(r)
            d["layers"], d["shape"] = list(r.layers), list(r.shape)
            return d

        return {"method": self.method, "options": _jsonable(self.options),
                "metric": self.metric, "reference": dict(self.reference),
                "rows": [row(r) for r in self.rows],
                "not_scored": [{"layer": n, "why": w} for n, w in self.not_scored],
                "calibration_runs": self.calibration_runs, "seconds": round(self.seconds, 2),
                "notes": list(self.notes)}

    def table(self, top: int | None = None) -> str:
        """The rows (the ``top`` first, all when None) as a markdown table."""
        lines = [f"| # | layer | shape | params | bits/weight | {self.metric} | drop |",
                 "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        for i, r in enumerate(self.rows[:top] if top else self.rows, 1):
            name = r.name + (f" ({r.note})" if r.note else "")
            lines.append(f"| {i} | {name} | {'x'.join(map(str, r.shape))} | {r.params} | "
                         f"{r.bits_per_weight:.3f} | {r.metric:.6g} | {r.drop:.3g} |")
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return value


def find_units(model: nn.Module, method: str, skip: tuple[str, ...] = (),
               patterns: Sequence[str] = ()) -> tuple[list[Unit], list[tuple[str, str]]]:
    """The units :func:`layer_sensitivity` scores, in model order, and the supported layers
    it leaves out with the reason.

    Args:
        model: the fp32 model.
        method: the compression method (``prune``: structures; else layers).
        skip: module-name prefixes left out (the ``skip`` option).
        patterns: ``fnmatch`` patterns; when given, only units whose name or one of whose
            layers matches one of them are scored.

    Raises:
        CompressError: no unit is left (the message lists some unit names).
    """
    layers, skipped, _unsupported, _ = select_layers(model, skip)
    not_scored = [(s.name, s.reason) for s in skipped]
    usable = {lay.name: lay for lay in layers}
    units: list[Unit] = []
    if method == "prune":
        structures, _refused = find_structures(model)
        in_unit: set[str] = set()
        for st in structures:
            names = tuple(lay.name for lay in st.layers)
            if all(n in usable for n in names):
                params = sum(int(usable[n].module.weight.numel()) for n in names)
                units.append(Unit(st.name, names, f"{st.unit}s", (st.n_units, st.unit_size),
                                  params))
                in_unit.update(names)
        not_scored += [(n, "not in a prunable structure (or one with a skipped layer)")
                       for n in usable if n not in in_unit]
    else:
        for lay in layers:
            w = lay.module.weight
            shape = tuple(w.shape[::-1]) if lay.transposed else tuple(w.shape)
            units.append(Unit(lay.name, (lay.name,), lay.kind, tuple(int(d) for d in shape),
                              int(w.numel())))
    if patterns:
        def hit(u: Unit) -> bool:
            return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (u.name, *u.layers))

        not_scored += [(n, f"no --layers pattern matches ({', '.join(patterns)})")
                       for u in units if not hit(u) for n in u.layers]
        units = [u for u in units if hit(u)]
    if not units:
        names = ", ".join(list(usable)[:8]) + (", ..." if len(usable) > 8 else "") or "none"
        what = "prunable structures" if method == "prune" else "layers"
        raise CompressError(
            f"sensitivity: no {what} to score"
            + (f" match the patterns {list(patterns)}" if patterns else "")
            + f"; the model's compressible layers are: {names}; pass fnmatch patterns "
            "such as 'encoder.layer.0.*' (or fewer --skip prefixes)")
    return units, not_scored


def layer_sensitivity(
    model: nn.Module,
    method: str,
    score: Callable[[nn.Module], Mapping[str, float]],
    *,
    calib: list[dict[str, Any]] | None = None,
    patterns: Sequence[str] = (),
    progress: bool = False,
    **options: Any,
) -> SensitivityReport:
    """Compress one unit (layer, or prune structure) at a time and measure the model's drop.

    Args:
        model: the fp32 torch model; it is left as it was found (only touched layers are
            swapped for a copy, and put back).
        method: ``shift``, ``bitstack``, ``lowrank`` or ``prune``.
        score: ``score(model) -> {metric: value}``, e.g. the ``.score`` of
            :func:`edgestack.compress.quality.choose_evaluator`'s evaluator.
        calib: calibration inputs, as for :func:`edgestack.compress.compress`.
        patterns: ``fnmatch`` patterns restricting the units scored (default: all).
        progress: a tqdm bar over the units (stderr).
        **options: the method's options (:func:`edgestack.compress.method_options`), but not
            ``layers``: that is what this function sets.

    Returns:
        The :class:`SensitivityReport`, rows ranked by drop (largest first).

    Raises:
        CompressError: a bad method or option, or no unit to score.
    """
    t0 = time.perf_counter()
    if "layers" in options:
        raise CompressError("sensitivity: the layers option is what sensitivity sets for "
                            "each unit; restrict the units with patterns=[...] instead")
    if method not in LAYER_LOCAL + ("prune",):
        raise CompressError(f"sensitivity: expected a method among "
                            f"{', '.join(LAYER_LOCAL + ('prune',))}, found {method!r}")
    opts = check_options(method, **options)
    units, not_scored = find_units(model, method, opts["skip"], patterns)
    model.eval()
    if opts["extra_texts"]:   # resolved once, so every unit sees the same calibration set
        calib = list(calib or []) + model_text_calib(model, opts["extra_texts"], calib)
    given = {k: v for k, v in options.items() if k != "extra_texts"}
    reference = dict(score(model))
    layer_local = method in LAYER_LOCAL and not opts.get("finetune_steps")
    cache = StatsCache(watch=[n for u in units for n in u.layers])
    rows, notes = [], []
    for unit in progress_iter(units, progress, f"sensitivity ({method})"):
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if layer_local:
                report, scores = _local(model, unit, method, calib, cache, given, score)
            else:
                m = copy.deepcopy(model)
                report = compress(m, method, calib=calib, layers=unit.layers,
                                  stats_cache=cache, **given)
                scores = dict(score(m))
                del m
        for w in caught:
            if str(w.message) not in notes:
                notes.append(str(w.message))
        done = {lay.name: lay.compressed_bytes for lay in report.layers}
        sizes = {n: _numel(model, n) for n in unit.layers}
        nbytes = sum(done.get(n, 4 * k) for n, k in sizes.items())
        left = [s.reason for s in report.skipped if s.name in unit.layers]
        key, drop = metric_drop(scores, reference)
        rows.append(LayerSensitivity(
            unit.name, unit.layers, unit.kind, unit.shape, unit.params,
            round(8 * nbytes / max(1, unit.params), 4), scores[key], _round(drop), scores,
            round(time.perf_counter() - t1, 3),
            f"left dense: {left[0]}" if not done and left else ""))
    rows.sort(key=lambda r: (-r.drop if math.isfinite(r.drop) else -math.inf, r.name))
    key = metric_drop(reference, reference)[0]
    return SensitivityReport(method, {k: v for k, v in opts.items() if k != "layers"}, key,
                             reference, rows, not_scored, cache.runs,
                             time.perf_counter() - t0, notes)


def _local(model: nn.Module, unit: Unit, method: str, calib: Any, cache: StatsCache,
           options: dict[str, Any], score: Callable[[nn.Module], Mapping[str, float]]
           ) -> tuple[Any, dict[str, float]]:
    """Compress ``unit`` in ``model`` on a copy of its layers only, score, put them back."""
    originals = {n: get_module(model, n) for n in unit.layers}
    attrs = set(vars(model))
    for n, mod in originals.items():
        replace_module(model, n, copy.deepcopy(mod))
    try:
        report = compress(model, method, calib=calib, layers=unit.layers, stats_cache=cache,
                          **options)
        return report, dict(score(model))
    finally:
        for n, mod in originals.items():
            replace_module(model, n, mod)
        for extra in set(vars(model)) - attrs:   # e.g. BitStack's edgestack_bitstack_order
            delattr(model, extra)


def _numel(model: nn.Module, name: str) -> int:
    return int(get_module(model, name).weight.numel())


def _round(x: float) -> float:
    return round(x, 9) if math.isfinite(x) else x


__all__ = ["LAYER_LOCAL", "LayerSensitivity", "SensitivityReport", "Unit", "find_units",
           "layer_sensitivity"]
