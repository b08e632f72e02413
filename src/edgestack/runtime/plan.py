"""The memory planner: which tier, and per layer materialised or decoded on the fly.

A plan is computed from the manifest alone (nothing is loaded). Its total is::

    fixed      graph file + weights file (non-BitStack weights, held by the runtime)
             + RUNTIME_OVERHEAD (ONNX Runtime session, kernels, Python objects; measured)
    blocks     per on-the-fly layer: its first nb blocks (signs, u, v), page-rounded, plus
               OTF_LAYER_OVERHEAD (the inlined decode in the session); per materialised
               layer MATERIALIZED_LAYER_OVERHEAD only (its blocks are read record by
               record into one buffer, decoded, and not kept)
    dense      per materialised layer: its int8 [n, m] weight and float scales, its 8-bit
               blockwise codes and scales, or its float32 [m, n] weight, page-rounded
    kv_cache   a decoder (``runtime.decoder``): bytes per token (sum over layers of
               2 x kv_heads x head_dim x itemsize) x max_context x max_batch x KV_ALIVE (the
               past fed in and the present coming out of one step); the activation arena
               is then the packer's estimate at the worst call (a prefill chunk over a cache
               of max_context - prefill_chunk tokens), and a plan under a budget says for
               each tier how many tokens of context fit (:func:`context_fit`)
    margin     the safety margin: SAFETY_FRACTION of the rest, at least SAFETY_MIN (run-to-run
               variation: shared-library code pages that land with the page cache, allocator
               bookkeeping)
    arena      activation_bytes (packer's liveness estimate for the golden input shapes)
             + the transient peak: the largest of (a) ONNX Runtime's decode temporaries of
               the largest on-the-fly layer, DECODE_TEMP_BYTES x (nb + 1) x m x n (the
               BitStackWeight function body makes float32 [nb, m*n] intermediates), and
               (b) materialising one layer: the numpy decode temporaries,
               MATERIALISE_TEMP_BYTES x m x n, plus its blocks' bytes (the read buffer
               holds one record: counted whole, conservative)

The fixed costs (RUNTIME_OVERHEAD, DECODE_TEMP_BYTES) depend on the machine: the ONNX Runtime
build, the C library, how many code pages a session touches. :class:`Costs` carries them;
:mod:`edgestack.runtime.calibrate` measures them for a package on the machine it runs on
(once, cached) and the constants below are only the documented fallback.

Choice (:func:`plan_memory`): layers sorted by decode work (nb x m x n, largest first); for
``j`` materialised layers (a prefix of that list) the total is ``total(j)``. A tier *fits* when
``min_j total(j) <= budget``; the planner picks the **largest tier that fits**, then the
**largest j** whose total fits (every materialised layer saves its decode on every call, so
more materialised layers = less latency). Materialising a large layer can even lower the
total, because it removes that layer's decode temporaries from the arena.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgestack.core.text import printable
from edgestack.errors import BudgetError, PackageError
from edgestack.package.format import DENSE_FILES, FORMS, VARIANT_FILE

PAGE = 4096
MiB = 2**20

RUNTIME_OVERHEAD = 20 * MiB
"""ONNX Runtime session + kernels + the runtime's Python objects, above a process that only
imported :mod:`edgestack.runtime` and onnxruntime (set from measurements on the development
machine; bench/runtime_budgets.py checks the plans against measured peak RSS: see
docs/runtime.md)."""

DECODE_TEMP_BYTES = 14
"""Bytes of ONNX Runtime decode temporaries per weight per block of an on-the-fly layer; the
transient of one on-the-fly decode is ``DECODE_TEMP_BYTES * (nb + 1) * m * n`` (the ``+ 1``:
the decoded weight and the copy a following ``Transpose`` makes; measured on MiniLM)."""

MATERIALIZED_LAYER_OVERHEAD = 100 * 1024
"""Memory per materialised layer beyond its dense weight (session input bookkeeping and
graph-variant copies; measured on MiniLM: about 0.1 MiB per layer)."""

OTF_LAYER_OVERHEAD = 200 * 1024
"""Session memory per on-the-fly layer (ONNX Runtime inlines the BitStackWeight function body
into the graph: ~20 nodes and their kernels per layer; measured 7 MiB for 37 MiniLM layers)."""

MATERIALISE_TEMP_BYTES = 10
"""Bytes of numpy temporaries per weight while materialising a layer: the float32 sum and one
block's float32 magnitudes and unpacked signs (int8 quantization then works row-chunk by
row-chunk)."""

DENSE_ONLY = ("nbits8",)
"""Forms only the dense graph has (every layer in that form, nothing on the fly)."""

SAFETY_FRACTION = 0.05
"""Safety margin of every plan: 5% of the rest, at least :data:`SAFETY_MIN`. It covers what
varies from process to process on one machine: shared-library code pages (their count
depends on the page cache and on what the process imported before: measured 1-3 MB between
the calibration's probe, the bench's probe and an in-process measurement of the same MiniLM
plan), glibc and ONNX Runtime bookkeeping that no line models, and the noise of the
calibration itself. With calibrated costs the measured peak stays within 10% below the plan
(bench/runtime_budgets.py)."""

SAFETY_MIN = 3 * MiB
"""The smallest safety margin, in bytes (see :data:`SAFETY_FRACTION`)."""

KV_ALIVE = 2
"""Copies of the KV cache alive at once during a generation step: the past fed in (the
previous step's present, ``n - 1`` tokens) and the present coming out (``n`` tokens); the
runtime drops the past as soon as the call returns. Measured in fresh processes on the tiny
GPT-2 of tests/runtime/test_generate.py and the gpt2-small-shaped model of
bench/generate.py: see docs/runtime.md."""


@dataclass(frozen=True)
class Costs:
    """The machine-dependent constants of a plan (bytes, or bytes per weight).

    The defaults are the documented constants measured on the development machine;
    :func:`edgestack.runtime.calibrate.calibrate` measures them where the runtime runs.
    ``source`` says which (``"documented constants"`` or ``"calibrated ..."``).
    """

    overhead: int = RUNTIME_OVERHEAD
    decode_temp_bytes: float = DECODE_TEMP_BYTES
    source: str = "documented constants"
    overhead_mixed: int | None = None
    """The overhead with the mixed graph (``model.mixed.onnx``: one ``If`` site per layer);
    None: the same as ``overhead``."""
    overhead_int8: int | None = None
    """The overhead with the int8 graph (``model.int8.onnx``); None: as the mixed graph's."""
    overhead_fp32: int | None = None
    """The overhead with the fp32 graph (``model.fp32.onnx``); None: as the mixed graph's."""
    overhead_nbits8: int | None = None
    """The overhead with the nbits8 graph (``model.nbits8.onnx``); None: as the mixed graph's."""

    def overhead_for(self, graph: str) -> int:
        """The overhead of serving with ``graph`` (``"plain"``, ``"mixed"`` or a dense graph:
        ``"int8"``, ``"nbits8"``, ``"fp32"``)."""
        dense = {"int8": self.overhead_int8, "nbits8": self.overhead_nbits8,
                 "fp32": self.overhead_fp32}
        for value in ((dense[graph],) if graph in dense else ()) + (
                (self.overhead_mixed,) if graph != "plain" else ()):
            if value is not None:
                return value
        return self.overhead

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_COSTS = Costs()


def page_up(n: int) -> int:
    return -(-int(n) // PAGE) * PAGE


@dataclass(frozen=True)
class LayerPlan:
    """One BitStack layer in a plan."""

    name: str
    blocks: int
    n_blocks: int
    mode: str
    block_bytes: int
    dense_bytes: int

    @property
    def bytes(self) -> int:
        """Resident bytes this layer keeps (blocks, plus the materialised weight)."""
        return self.block_bytes + self.dense_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "blocks": self.blocks, "of": self.n_blocks,
                "mode": self.mode, "bytes": self.bytes, "block_bytes": self.block_bytes,
                "dense_bytes": self.dense_bytes}


@dataclass(frozen=True)
class MemoryPlan:
    """A memory plan: what the runtime will load for ``tier`` under ``budget``."""

    tier: int
    n_tiers: int
    budget: int | None
    layers: tuple[LayerPlan, ...]
    graph_bytes: int
    weights_bytes: int
    overhead_bytes: int
    activation_bytes: int
    transient_bytes: int
    budget_source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    costs: Costs = DEFAULT_COSTS
    graph: str = "plain"
    """The graph the plan runs: ``"plain"`` (``model.onnx``, every layer on the fly),
    ``"int8"`` / ``"nbits8"`` / ``"fp32"`` (that dense graph, every layer in that form, when
    the package has it) or ``"mixed"`` (``model.mixed.onnx``, one site per layer; see
    :mod:`edgestack.packer.variants`)."""
    kv_bytes: int = 0
    """A decoder's KV cache at ``kv_tokens`` tokens of ``max_batch`` sequences, times
    :data:`KV_ALIVE` (0 for other models)."""
    kv_tokens: int = 0
    """The context the ``kv_cache`` line covers (the package's ``max_context``)."""
    context_fit: tuple[tuple[int, int], ...] = ()
    """A decoder under a budget: ``(tier, tokens)`` for every tier: the most tokens of
    context (prompt + new, up to ``max_context``) whose cache fits the budget with that
    tier's smallest plan; 0 where the tier does not fit at all."""

    @property
    def layer_bytes(self) -> int:
        return sum(lp.bytes for lp in self.layers)

    @property
    def arena_bytes(self) -> int:
        return self.activation_bytes + self.transient_bytes

    @property
    def expected_bytes(self) -> int:
        """What the plan expects the peak RSS increase to be (everything but the margin)."""
        return (self.graph_bytes + self.weights_bytes + self.overhead_bytes + self.layer_bytes
                + self.arena_bytes + self.kv_bytes)

    @property
    def margin_bytes(self) -> int:
        """The safety margin: :data:`SAFETY_FRACTION` of the rest, at least :data:`SAFETY_MIN`."""
        return margin(self.expected_bytes)

    @property
    def total(self) -> int:
        return self.expected_bytes + self.margin_bytes

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    @property
    def materialized(self) -> frozenset[str]:
        """The layers served from a materialised weight (int8 or fp32)."""
        return frozenset(lp.name for lp in self.layers if lp.mode != "on-the-fly")

    @property
    def modes(self) -> dict[str, str]:
        return {lp.name: lp.mode for lp in self.layers}

    @property
    def mixed(self) -> bool:
        """Whether the plan needs the mixed graph (some layer is not decoded on the fly)."""
        return bool(self.materialized)

    @property
    def blocks(self) -> dict[str, int]:
        return {lp.name: lp.blocks for lp in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier, "n_tiers": self.n_tiers, "budget": self.budget,
            "graph": self.graph,
            "budget_source": self.budget_source, "total": self.total, "fits": self.fits,
            "graph_bytes": self.graph_bytes, "weights_bytes": self.weights_bytes,
            "layer_bytes": self.layer_bytes,
            "arena": {"activations": self.activation_bytes, "transient": self.transient_bytes,
                      "total": self.arena_bytes},
            "overhead_bytes": self.overhead_bytes, "margin_bytes": self.margin_bytes,
            "kv_cache": {"bytes": self.kv_bytes, "tokens": self.kv_tokens,
                         "alive": KV_ALIVE} if self.kv_tokens else None,
            "context_fit": [{"tier": t, "tokens": n} for t, n in self.context_fit],
            "expected_bytes": self.expected_bytes, "costs": self.costs.to_dict(),
            "layers": [lp.to_dict() for lp in self.layers], "notes": list(self.notes),
        }

    def table(self) -> str:
        """A human-readable plan."""
        mb = lambda n: f"{n / MiB:9.2f} MiB"  # noqa: E731
        lines = [f"tier {self.tier} of 0..{self.n_tiers - 1}"
                 + (f", budget {mb(self.budget).strip()} ({self.budget_source})"
                    if self.budget is not None else "")]
        if self.layers:
            w = max(5, *(len(lp.name) for lp in self.layers))
            lines.append(f"  {'layer':<{w}}  blocks  {'mode':<12}  bytes")
            for lp in self.layers:
                lines.append(f"  {lp.name:<{w}}  {lp.blocks:>2}/{lp.n_blocks:<3}  "
                             f"{lp.mode:<12}  {mb(lp.bytes)}")
        lines += [
            f"  BitStack layers      {mb(self.layer_bytes)}",
            f"  graph + weights      {mb(self.graph_bytes + self.weights_bytes)}",
            f"  activation arena     {mb(self.arena_bytes)} (activations "
            f"{mb(self.activation_bytes).strip()}, decode temporaries "
            f"{mb(self.transient_bytes).strip()})",
            *([f"  kv_cache             {mb(self.kv_bytes)} ({self.kv_tokens} tokens x "
               f"{KV_ALIVE}: the past fed in and the present coming out)"]
              if self.kv_tokens else []),
            f"  runtime overhead     {mb(self.overhead_bytes)} ({self.costs.source})",
            f"  safety margin        {mb(self.margin_bytes)}",
            f"  total                {mb(self.total)}"
            + (f" of {mb(self.budget).strip()} budget: "
               f"{'fits' if self.fits else 'DOES NOT FIT'}" if self.budget is not None else ""),
        ]
        if self.context_fit:
            lines.append("  context that fits the budget, per tier: " + ", ".join(
                f"{t}: {n}" for t, n in self.context_fit))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(printable(line) for line in lines)  # layer names are the package's


def _manifest(package: Any) -> Any:
    return getattr(package, "manifest", package)


def layer_forms(info: Any) -> tuple[str, ...]:
    """The forms a packed layer can be served in (its ``graph.site``, written by the packer;
    a layer without a site is served on the fly only)."""
    site = info.graph.site if info.graph is not None else None
    if site is None:
        return ("on-the-fly",)
    return FORMS if site.int8 is not None else ("on-the-fly", "fp32")


def dense_bytes(info: Any, form: str) -> int:
    """Resident bytes of a layer's materialised weight in ``form``."""
    m, n = info.matrix_shape
    if form == "int8":
        return page_up(m * n) + page_up(4 * m)   # int8 weight + per-channel float scale
    if form == "nbits8":
        kb = -(-n // 32)                          # 8-bit codes + a float scale per 32
        return page_up(m * kb * 32) + page_up(4 * m * kb)
    return page_up(4 * m * n) if form == "fp32" else 0


def _layer_costs(manifest: Any, tier: int) -> list[tuple[str, int, int, int, int]]:
    """``(name, nb, n_blocks, block_bytes, work)`` per layer at ``tier``."""
    out = []
    t = manifest.tiers[tier]
    for name, info in manifest.layers.items():  # LayerInfo computes its sizes once
        nb = int(t.blocks[name])
        m, n = info.matrix_shape
        block_bytes = (page_up(nb * info.signs_bytes) + page_up(nb * info.u_bytes)
                       + page_up(nb * info.v_bytes))
        out.append((name, nb, info.n_blocks, block_bytes, nb * m * n))
    return out


FAULT_AROUND = 64 * 1024
"""Bytes the kernel may map around one page fault of a file mapping (Linux
``fault_around_bytes``, 64 KiB by default): a memory-mapped table read at one row can make
that much of it resident."""


def table_bound(row_bytes: int, rows: int, size: int) -> int:
    """Resident bytes of a memory-mapped lookup table after one call that reads ``rows`` rows
    of ``row_bytes`` each: per row its pages plus the kernel's fault-around window, never
    more than the table (the runtime drops the pages after each call)."""
    per_row = (-(-int(row_bytes) // PAGE) + 1) * PAGE + FAULT_AROUND
    return min(page_up(size), int(rows) * per_row)


def graph_sizes(manifest: Any) -> dict[str, int]:
    """Bytes of each graph file the package holds: ``{"plain": ..., "mixed": ..., "int8":
    ..., "fp32": ...}`` (the variants only where the packer wrote them)."""
    graphs = {"plain": sum(e.size for e in manifest.files.values() if e.role == "graph")}
    for name, kind in ((VARIANT_FILE, "mixed"), *((f, k) for k, f in DENSE_FILES.items())):
        entry = manifest.files.get(name)
        if entry is not None and entry.role == "variant":
            graphs[kind] = entry.size
    return graphs


def _fixed(manifest: Any) -> tuple[dict[str, int], int, int]:
    """``({graph: file bytes}, resident weight bytes, activation bytes)``: weights
    are memory-mapped from the package; lookup tables (``runtime.tables``) count the
    pages one call can make resident (:func:`table_bound`), pre-gathered tables
    (``runtime.gathered``) one call's rows, everything else counts whole."""
    rt = manifest.runtime
    weights = sum(e.size for e in manifest.files.values() if e.role == "weights")
    rows = rt.rows_per_call
    if rows:
        for t in rt.tables.values():          # mapped: one call's resident pages
            weights -= t.bytes - table_bound(t.bytes // t.shape[0], rows, t.bytes)
    for t in rt.gathered.values():            # read per call with pread: its rows
        weights -= t.bytes - min(t.bytes, len(t.lookups) * page_up(rows * t.bytes // t.shape[0]))
    return graph_sizes(manifest), weights, rt.activation_bytes


def plan_tier(package: Any, tier: int, budget: int | None = None, *,
              materialize: int | Sequence[str] | None = None,
              budget_source: str = "", costs: Costs = DEFAULT_COSTS,
              form: str = "int8") -> MemoryPlan:
    """The plan of ``tier``; ``materialize`` = how many of the largest layers (or which
    layers) are materialised; default: the most that fit ``budget``, or the fewest-bytes
    choice when no budget is given or nothing fits (so ``plan_tier(m, t).total`` is the
    smallest budget that serves tier ``t``). ``costs``: the machine's fixed costs (see
    :mod:`edgestack.runtime.calibrate`); ``form``: what a materialised layer becomes,
    ``"int8"`` (1 byte a weight; ``"fp32"`` where a layer has no int8 form) or ``"fp32"``.
    Only layers the package can materialise (:func:`layer_forms`) are counted."""
    man = _manifest(package)
    if not 0 <= tier < len(man.tiers):
        raise PackageError(f"tier must be in [0, {len(man.tiers) - 1}], found {tier}")
    if form not in FORMS[1:]:
        raise PackageError(f"form must be one of {', '.join(FORMS[1:])}, found {form!r}")
    infos = man.layers
    work = sorted((c for c in _layer_costs(man, tier)), key=lambda c: -c[4])
    graphs, weights, act = _fixed(man)
    dec = man.runtime.decoder
    kv_tokens = dec.max_context if dec is not None else 0
    kv = kv_cache_bytes(man, kv_tokens)
    order = {name: i for i, name in enumerate(infos)}

    def mode_of(name: str) -> str:
        forms = layer_forms(infos[name])
        return form if form in forms else forms[-1]

    def build(mat: set[str]) -> MemoryPlan:
        layers = []
        otf_temp = 0
        mat_temp = 0
        for name, nb, total, bb, _work in work:
            mode = mode_of(name) if name in mat else "on-the-fly"
            m, n = infos[name].matrix_shape
            if mode == "on-the-fly":
                otf_temp = max(otf_temp, int(costs.decode_temp_bytes * (nb + 1) * m * n))
                kept = bb + OTF_LAYER_OVERHEAD
            else:  # read record by record (one buffer), decoded, not kept
                mat_temp = max(mat_temp, MATERIALISE_TEMP_BYTES * m * n + bb)
                kept = MATERIALIZED_LAYER_OVERHEAD
            layers.append(LayerPlan(name, nb, total, mode, kept, dense_bytes(infos[name], mode)))
        layers.sort(key=lambda lp: order[lp.name])
        modes = {lp.mode for lp in layers}
        only = next(iter(modes)) if len(modes) == 1 else None
        graph = ("plain" if not mat else only if only in FORMS[1:] and only in graphs
                 else "mixed")   # a dense graph when every layer has its form
        return MemoryPlan(tier, len(man.tiers), budget, tuple(layers),
                          graphs.get(graph, graphs["plain"]), weights,
                          costs.overhead_for(graph), act, max(otf_temp, mat_temp),
                          budget_source, costs=costs, graph=graph, kv_bytes=kv,
                          kv_tokens=kv_tokens)

    can = [c[0] for c in work if len(layer_forms(infos[c[0]])) > 1]
    if materialize is not None and not isinstance(materialize, int):
        unknown = set(materialize) - set(infos)
        if unknown:
            raise PackageError(f"materialize names unknown layers {sorted(unknown)[:5]}")
        fixed = set(materialize) - set(can)
        if fixed:
            raise PackageError(f"layers {sorted(fixed)[:5]} can only be decoded on the fly "
                               "(the package has no mixed graph for them); repack the model")
        return build(set(materialize))
    names = can
    if form in DENSE_ONLY:   # all or nothing: the form exists only in its dense graph
        if form not in graphs:
            raise PackageError(f"the package has no {form} graph (a layer without an int8 "
                               "site, or an older package): serve int8 or fp32, or repack")
        if materialize is not None and set(
                names[:materialize] if isinstance(materialize, int) else names) != set(infos):
            raise PackageError(f"form {form!r} serves every layer (its dense graph): "
                               "materialize every layer or pick another form")
        return build(set(infos))
    if isinstance(materialize, int):
        return build(set(names[: max(0, min(materialize, len(names)))]))
    plans = [build(set(names[:j])) for j in range(len(names) + 1)]
    if budget is not None:
        fitting = [p for p in plans if p.total <= budget]
        if fitting:
            return fitting[-1]
    return min(plans, key=lambda p: p.total)


def margin(expected: int) -> int:
    """The safety margin of a plan expecting ``expected`` bytes: :data:`SAFETY_FRACTION` of
    it, at least :data:`SAFETY_MIN`."""
    return max(SAFETY_MIN, int(SAFETY_FRACTION * expected))


def kv_cache_bytes(package: Any, tokens: int) -> int:
    """The ``kv_cache`` line of a decoder package for ``tokens`` of context: bytes per token
    (:attr:`~edgestack.package.format.DecoderInfo.kv_bytes_per_token`) x ``tokens`` x
    ``max_batch`` x :data:`KV_ALIVE`, page-rounded; 0 for other packages."""
    dec = _manifest(package).runtime.decoder
    if dec is None:
        return 0
    return page_up(dec.kv_bytes_per_token * int(tokens) * dec.max_batch * KV_ALIVE)


_BASES: dict[tuple[int, Costs], tuple[Any, tuple[int, ...]]] = {}


def context_fit(package: Any, budget: int, costs: Costs = DEFAULT_COSTS
                ) -> tuple[tuple[int, int], ...]:
    """``(tier, tokens)`` per tier of a decoder package: the most tokens of context (up to
    ``max_context``) whose ``kv_cache`` line fits ``budget`` with the tier's smallest plan
    (its activation arena stays the one computed at ``max_context``); 0 where the tier does
    not fit. Empty for other packages."""
    man = _manifest(package)
    dec = man.runtime.decoder
    if dec is None:
        return ()
    key = (id(man), costs)
    hit = _BASES.get(key)
    if hit is None or hit[0] is not man:   # the rest of each tier's smallest plan, once
        bases = tuple(p.expected_bytes - p.kv_bytes for p in
                      (smallest_plan(man, t, costs) for t in range(len(man.tiers))))
        _BASES.clear()
        _BASES[key] = hit = (man, bases)
    per = dec.kv_bytes_per_token * dec.max_batch * KV_ALIVE
    out = []
    for t, base in enumerate(hit[1]):
        room = min(budget - SAFETY_MIN, int(budget / (1 + SAFETY_FRACTION))) - base
        tokens = 0
        if room > 0:
            tokens = min(dec.max_context, room // per)
            while tokens and (expected := base + kv_cache_bytes(man, tokens)) + margin(
                    expected) > budget:
                tokens -= 1   # page rounding
        out.append((t, int(tokens)))
    return tuple(out)


def smallest_plan(package: Any, tier: int, costs: Costs = DEFAULT_COSTS) -> MemoryPlan:
    """The plan of ``tier`` with the fewest bytes (over the mode choices)."""
    return plan_tier(_manifest(package), tier, costs=costs)


def plan_memory(package: Any, budget: int | None, *, tier: int | None = None,
                budget_source: str = "", prefer: frozenset[str] | None = None,
                materialize: int | Sequence[str] | None = None,
                costs: Costs = DEFAULT_COSTS, form: str = "auto",
                dense: bool = False) -> MemoryPlan:
    """The plan for ``budget`` (see :func:`_plan_memory`); a decoder's plan under a budget
    also says how many tokens of context fit at each tier (:func:`context_fit`)."""
    plan = _plan_memory(package, budget, tier=tier, budget_source=budget_source,
                        prefer=prefer, materialize=materialize, costs=costs, form=form,
                        dense=dense)
    if budget is not None and plan.kv_tokens:
        plan = dataclasses.replace(plan, context_fit=context_fit(package, budget, costs))
    return plan


def _plan_memory(package: Any, budget: int | None, *, tier: int | None = None,
                 budget_source: str = "", prefer: frozenset[str] | None = None,
                 materialize: int | Sequence[str] | None = None,
                 costs: Costs = DEFAULT_COSTS, form: str = "auto",
                 dense: bool = False) -> MemoryPlan:
    """The plan for ``budget``: the largest tier whose plan fits, with the most materialised
    layers that fit (see the module doc); without a budget, the last tier with every layer
    materialised (the fastest). ``tier`` forces a tier; ``prefer`` keeps that set
    of materialised layers when it fits (so a re-tier can keep its session); ``materialize``
    forces the mode choice (a count of the largest layers, or layer names); ``form``: what a
    materialised layer becomes (see :func:`plan_tier`), or ``"auto"``: with a budget, the
    most exact dense form whose plan of the top (or forced) tier fits, float32 (the tier's
    exact weights), else 8-bit weight-only (its quality within rounding: measured on MiniLM
    0.0003 cosine below float32, 1.16 bytes a weight), else int8 (the fastest: about 0.006
    below float32, 1 byte a weight); ``costs``: the
    machine's fixed costs (:mod:`edgestack.runtime.calibrate`; default: the documented
    constants); ``dense``: every layer materialised in one dense graph (what OpenVINO
    serves): ``"auto"`` is then the most exact form that fits, with or without a budget.

    Raises:
        BudgetError: the budget is below the smallest tier's plan (the message gives the
            minimum), or a forced ``tier`` does not fit.
    """
    man = _manifest(package)
    if dense:
        materialize = len(man.layers)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget <= 0):
        raise BudgetError(f"budget must be a positive number of bytes, found {budget!r}")
    candidates = [tier] if tier is not None else list(range(len(man.tiers) - 1, -1, -1))
    if form == "auto":
        form = "int8"
        if (budget is not None and materialize is None or dense) and man.layers:
            for exact_form in ("fp32", "nbits8"):
                if exact_form not in graph_sizes(man):
                    continue
                exact = plan_tier(man, candidates[0], budget, materialize=len(man.layers),
                                  budget_source=budget_source, costs=costs, form=exact_form)
                if exact.fits and exact.graph == exact_form:
                    return exact
    if budget is None and materialize is None and prefer is None:
        materialize = len(man.layers)  # no budget: the fastest plan (every layer materialised)
    for t in candidates:
        if materialize is not None:
            p = plan_tier(man, t, budget, materialize=materialize, budget_source=budget_source,
                          costs=costs, form=form)
            if p.fits:
                return p
            continue
        if prefer is not None:
            p = plan_tier(man, t, budget, materialize=sorted(prefer & set(man.layers)),
                          budget_source=budget_source, costs=costs, form=form)
            if p.fits:
                return p
        p = plan_tier(man, t, budget, budget_source=budget_source, costs=costs, form=form)
        if p.fits:
            return p
    need = (plan_tier(man, candidates[-1], materialize=materialize, costs=costs,
                      form=form).total
            if materialize is not None else smallest_plan(man, candidates[-1], costs).total)
    what = f"tier {tier}" if tier is not None else "the smallest tier (0)"
    raise BudgetError(
        f"memory budget {budget / MiB:.1f} MiB ({budget_source or 'given'}) is below what "
        f"{what} of {man.model.name!r} needs: at least {math.ceil(need / MiB * 10) / 10:.1f} "
        f"MiB ({need} bytes: graph, weights, blocks, activation arena, "
        f"{'KV cache, ' if man.runtime.decoder is not None else ''}runtime overhead). "
        "Give a larger --budget, free memory, or pack a smaller model"
        + (f" (or a shorter --max-context than {man.runtime.decoder.max_context})"
           if man.runtime.decoder is not None else "")
    )


__all__ = ["MemoryPlan", "LayerPlan", "Costs", "DEFAULT_COSTS", "plan_memory", "plan_tier",
           "smallest_plan", "layer_forms", "graph_sizes", "dense_bytes", "FORMS", "DENSE_ONLY",
           "SAFETY_FRACTION", "SAFETY_MIN", "RUNTIME_OVERHEAD", "DECODE_TEMP_BYTES",
           "OTF_LAYER_OVERHEAD", "MATERIALIZED_LAYER_OVERHEAD", "MATERIALISE_TEMP_BYTES",
           "KV_ALIVE", "kv_cache_bytes", "context_fit"]
